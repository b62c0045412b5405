// Row-major dot-product kernels `y[r, n] = Σ_k x[r, k] · w[n, k]` on weights as stored (f32, f16,
// bf16), for every CPU path: `dl_gemm` (f32 fused multiply-adds; attention's one-query scores,
// whose keys are rows of the cache), and attention's weighted sum of values `dl_weighted_sum`.
// The products with weights use the packed panels of f32_panels.c and bf16_panels.c instead.
//
// Batch invariance by construction: every output element is summed in one fixed order that
// depends on K alone, identical on every path (so a row's bits never depend on the other rows of
// the call, on the tile that holds it, on the thread count, nor on the CPU path):
//   lane j in 0..<16 accumulates k = j, j + 16, j + 32, ... < K with fmaf, starting from +0;
//   then s8[i] = lane[i] + lane[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2],
//   y = s2[0] + s2[1].
// AVX-512 holds the 16 lanes in one register, AVX2 in two (lanes 0-7 and 8-15), the scalar path
#include "simd.h"
#include <math.h>
#include <stdlib.h>

static void gemm_scalar(int type, const float *x, size_t ldx, const void *w, size_t k, size_t ldw,
                        size_t n_begin, size_t n_end, size_t m, float *y, size_t ldy) {
    float *row = malloc(k * sizeof(float));
    for (size_t n = n_begin; n < n_end; n++) {
        for (size_t kk = 0; kk < k; kk++) row[kk] = weight_at(type, w, n * ldw + kk);
        for (size_t r = 0; r < m; r++) {
            float lanes[16] = {0};
            const float *xr = x + r * ldx;
            for (size_t kk = 0; kk < k; kk++) lanes[kk & 15] = fmaf(xr[kk], row[kk], lanes[kk & 15]);
            y[r * ldy + n] = reduce_lanes16(lanes);
        }
    }
    free(row);
}


#ifdef DL_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: tiles of up to 6 rows x 4 columns, one zmm accumulator per output element.

/// One tile: rows x[0..<MR], weight rows w[n..<n+NR]; writes y[0..<MR][n..<n+NR].
DL_AVX512 void tile512(const int MR, const int NR, int type, const float *x, size_t ldx,
                       const void *w, size_t k, size_t ldw, size_t n, float *y, size_t ldy) {
    __m512 acc[8][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    size_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m512 wv[4];
        for (int j = 0; j < NR; j++) wv[j] = load_w512(type, w, (n + j) * ldw + kk);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * ldx + kk);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (kk < k) {
        __mmask16 mask = (__mmask16)((1u << (k - kk)) - 1);
        __m512 wv[4];
        for (int j = 0; j < NR; j++) wv[j] = load_w512_masked(type, w, (n + j) * ldw + kk, mask);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + kk);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + n + j] = reduce512(acc[i][j]);
}

/// Rows `0..<MR` against columns `n_begin..<n_end` in groups of `NR` (the last group narrower):
/// 4 for up to 6 rows; 3 for 7 or 8 rows (a decode batch in one pass over the weights), which
/// keeps the accumulators in registers.
DL_AVX512 void rows512(const int MR, const int NR, int type, const float *x, size_t ldx, const void *w, size_t k, size_t ldw,
                       size_t n_begin, size_t n_end, float *y, size_t ldy) {
    size_t n = n_begin;
    for (; n + NR <= n_end; n += NR) tile512(MR, NR, type, x, ldx, w, k, ldw, n, y, ldy);
    switch (n_end - n) {
    case 3: tile512(MR, 3, type, x, ldx, w, k, ldw, n, y, ldy); break;
    case 2: tile512(MR, 2, type, x, ldx, w, k, ldw, n, y, ldy); break;
    case 1: tile512(MR, 1, type, x, ldx, w, k, ldw, n, y, ldy); break;
    default: break;
    }
}

DL_AVX512_FN void rows512_dispatch(size_t rows, int type, const void *activations, size_t ldx, const void *w, size_t k, size_t ldw,
                                   size_t n_begin, size_t n_end, float *y, size_t ldy) {
    const float *x = activations;
    switch (rows) {
    case 8: rows512(8, 3, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 7: rows512(7, 3, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 6: rows512(6, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 5: rows512(5, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 4: rows512(4, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 3: rows512(3, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    case 2: rows512(2, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    default: rows512(1, 4, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy); break;
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: the same 16 lanes in two ymm registers; tiles of up to 2 rows x 3 columns.


DL_AVX2 void tile256(const int MR, const int NR, int type, const float *x, size_t ldx,
                     const void *w, size_t k, size_t ldw, size_t n, float *y, size_t ldy) {
    __m256 low[2][3], high[2][3];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) { low[i][j] = _mm256_setzero_ps(); high[i][j] = _mm256_setzero_ps(); }
    size_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
        __m256 wl[3], wh[3];
        for (int j = 0; j < NR; j++) {
            wl[j] = load_w256(type, w, (n + j) * ldw + kk);
            wh[j] = load_w256(type, w, (n + j) * ldw + kk + 8);
        }
        for (int i = 0; i < MR; i++) {
            __m256 xl = _mm256_loadu_ps(x + i * ldx + kk), xh = _mm256_loadu_ps(x + i * ldx + kk + 8);
            for (int j = 0; j < NR; j++) {
                low[i][j] = _mm256_fmadd_ps(xl, wl[j], low[i][j]);
                high[i][j] = _mm256_fmadd_ps(xh, wh[j], high[i][j]);
            }
        }
    }
    if (kk < k) {
        size_t rest = k - kk, restHigh = rest > 8 ? rest - 8 : 0;
        __m256 wl[3], wh[3];
        for (int j = 0; j < NR; j++) {
            wl[j] = load_w256_partial(type, w, (n + j) * ldw + kk, rest);
            wh[j] = load_w256_partial(type, w, (n + j) * ldw + kk + 8, restHigh);
        }
        for (int i = 0; i < MR; i++) {
            __m256 xl = load_x256_partial(x + i * ldx + kk, rest);
            __m256 xh = load_x256_partial(x + i * ldx + kk + 8, restHigh);
            for (int j = 0; j < NR; j++) {
                low[i][j] = _mm256_fmadd_ps(xl, wl[j], low[i][j]);
                high[i][j] = _mm256_fmadd_ps(xh, wh[j], high[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + n + j] = reduce256(low[i][j], high[i][j]);
}

DL_AVX2 void rows256(const int MR, int type, const float *x, size_t ldx, const void *w, size_t k, size_t ldw,
                     size_t n_begin, size_t n_end, float *y, size_t ldy) {
    size_t n = n_begin;
    for (; n + 3 <= n_end; n += 3) tile256(MR, 3, type, x, ldx, w, k, ldw, n, y, ldy);
    switch (n_end - n) {
    case 2: tile256(MR, 2, type, x, ldx, w, k, ldw, n, y, ldy); break;
    case 1: tile256(MR, 1, type, x, ldx, w, k, ldw, n, y, ldy); break;
    default: break;
    }
}

DL_AVX2_FN void rows256_dispatch(size_t rows, int type, const void *activations, size_t ldx, const void *w, size_t k, size_t ldw,
                                 size_t n_begin, size_t n_end, float *y, size_t ldy) {
    const float *x = activations;
    if (rows == 2) rows256(2, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy);
    else rows256(1, type, x, ldx, w, k, ldw, n_begin, n_end, y, ldy);
}
#endif

void dl_gemm(int path, int weight_type, const float *x, size_t ldx, size_t m, const void *w, size_t k, size_t ldw,
             size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block) {
    if (m == 0 || n_end <= n_begin) return;
    if (k == 0) {
        for (size_t r = 0; r < m; r++)
            for (size_t n = n_begin; n < n_end; n++) y[r * ldy + n] = 0;
        return;
    }
#ifdef DL_X86
    if (path == DL_PATH_AVX512) {
        gemm_tiles(rows512_dispatch, 6, 1, weight_type, x, sizeof(float), ldx, m, w, k, ldw, n_begin, n_end, y, ldy, row_block);
        return;
    }
    if (path == DL_PATH_AVX2) {
        gemm_tiles(rows256_dispatch, 2, 0, weight_type, x, sizeof(float), ldx, m, w, k, ldw, n_begin, n_end, y, ldy, row_block);
        return;
    }
#endif
    (void)row_block;
    gemm_scalar(weight_type, x, ldx, w, k, ldw, n_begin, n_end, m, y, ldy);
}

// ---------------------------------------------------------------------------------------------
// Attention's weighted sum `out[d] = Σ_j p[j] · v[j, d]` (one query): each element accumulates
// over j in increasing order with fused multiply-adds from +0, on every path.

#ifdef DL_X86
/// 16 values of row `j` from column `d` (f32, or bf16 widened by a 16-bit shift), masked.
DL_AVX512_FN inline __m512 values512(int type, const void *v, size_t i, __mmask16 mask) {
    if (type == DL_WEIGHT_F32) return _mm512_maskz_loadu_ps(mask, (const float *)v + i);
    __m256i halves = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)v + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

DL_AVX512_FN void weighted_sum512(const float *p, size_t count, int type, const void *v, size_t ldv, size_t width, float *out) {
    for (size_t d = 0; d < width; d += 16) {
        __mmask16 mask = width - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (width - d)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (size_t j = 0; j < count; j++) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), values512(type, v, j * ldv + d, mask), acc);
        _mm512_mask_storeu_ps(out + d, mask, acc);
    }
}

/// 8 values of row `j` from column `d` (f32, or bf16 widened by a 16-bit shift).
DL_AVX2_FN inline __m256 values256(int type, const void *v, size_t i) {
    if (type == DL_WEIGHT_F32) return _mm256_loadu_ps((const float *)v + i);
    __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)v + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

DL_AVX2_FN void weighted_sum256(const float *p, size_t count, int type, const void *v, size_t ldv, size_t width, float *out) {
    size_t d = 0;
    for (; d + 8 <= width; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (size_t j = 0; j < count; j++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), values256(type, v, j * ldv + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
    for (; d < width; d++) {
        float acc = 0;
        for (size_t j = 0; j < count; j++) acc = fmaf(p[j], weight_at(type, v, j * ldv + d), acc);
        out[d] = acc;
    }
}
#endif

void dl_weighted_sum(int path, const float *p, size_t count, int value_type, const void *v, size_t ldv, size_t width,
                     float *out) {
#ifdef DL_X86
    if (path == DL_PATH_AVX512) { weighted_sum512(p, count, value_type, v, ldv, width, out); return; }
    if (path == DL_PATH_AVX2) { weighted_sum256(p, count, value_type, v, ldv, width, out); return; }
#endif
    for (size_t d = 0; d < width; d++) {
        float acc = 0;
        for (size_t j = 0; j < count; j++) acc = fmaf(p[j], weight_at(value_type, v, j * ldv + d), acc);
        out[d] = acc;
    }
}

