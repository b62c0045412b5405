// Row-major dot-product kernels `y[r, n] = Σ_k x[r, k] · w[n, k]` on weights as stored (f32, f16,
// bf16), for every CPU path: `dl_gemm` (f32 fused multiply-adds; attention's one-query scores,
// whose keys are rows of the cache), `dl_gemm_bf16` (the bf16 precision's `vdpbf16ps` products)
// and `dl_gemm_q8` (8-bit weights). The f32 products with weights use the packed panels of
// panels.c instead.
//
// Batch invariance by construction: every output element is summed in one fixed order that
// depends on K alone, identical on every path (so a row's bits never depend on the other rows of
// the call, on the tile that holds it, on the thread count, nor on the CPU path):
//   lane j in 0..<16 accumulates k = j, j + 16, j + 32, ... < K with fmaf, starting from +0;
//   then s8[i] = lane[i] + lane[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2],
//   y = s2[0] + s2[1].
// AVX-512 holds the 16 lanes in one register, AVX2 in two (lanes 0-7 and 8-15), the scalar path
// in an array. Missing lanes of the last chunk are loaded as zeros, which adds +0 exactly.
#include "CKernels.h"
#include "scalar.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define DL_X86 1
#endif

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


/// A bf16 value with a subnormal read as zero (sign kept), as `vdpbf16ps` reads its inputs.
static inline float bf16_input(uint16_t v) {
    if ((v & 0x7f80) == 0) v &= 0x8000;
    return bf16_to_float(v);
}

/// An f32 result with a subnormal flushed to zero (sign kept).
static inline float flush_subnormal(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/// The weight's element `i` rounded to bf16 as `vcvtne2ps2bf16` does: an f32 subnormal is read
/// as zero, then rounded to nearest even.
static inline uint16_t weight_bf16_at(int type, const void *w, size_t i) {
    if (type == DL_WEIGHT_BF16) return ((const uint16_t *)w)[i];
    float f = flush_subnormal(weight_at(type, w, i));
    uint16_t b;
    dl_narrow_bf16(&f, &b, 1);
    return b;
}

static void gemm_bf16_scalar(int type, const uint16_t *x, size_t ldx, const void *w, size_t k,
                             size_t n_begin, size_t n_end, size_t m, float *y, size_t ldy) {
    uint16_t *row = malloc((k + 1) * sizeof(uint16_t));
    for (size_t n = n_begin; n < n_end; n++) {
        for (size_t kk = 0; kk < k; kk++) row[kk] = weight_bf16_at(type, w, n * k + kk);
        row[k] = 0;
        for (size_t r = 0; r < m; r++) {
            float lanes[16] = {0};
            const uint16_t *xr = x + r * ldx;
            for (size_t kk = 0; kk < k; kk += 2) {
                size_t lane = (kk & 31) / 2;
                uint16_t x1 = kk + 1 < k ? xr[kk + 1] : 0;
                lanes[lane] = flush_subnormal(fmaf(bf16_input(x1), bf16_input(row[kk + 1]), lanes[lane]));
                lanes[lane] = flush_subnormal(fmaf(bf16_input(xr[kk]), bf16_input(row[kk]), lanes[lane]));
            }
            y[r * ldy + n] = reduce_lanes16(lanes);
        }
    }
    free(row);
}

#ifdef DL_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: tiles of up to 6 rows x 4 columns, one zmm accumulator per output element.

#define DL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"), always_inline)) static inline
#define DL_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))) static

DL_AVX512 __m512 load_w512(int type, const void *w, size_t i) {
    if (type == DL_WEIGHT_F32) return _mm512_loadu_ps((const float *)w + i);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (type == DL_WEIGHT_F16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

DL_AVX512 __m512 load_w512_masked(int type, const void *w, size_t i, __mmask16 mask) {
    if (type == DL_WEIGHT_F32) return _mm512_maskz_loadu_ps(mask, (const float *)w + i);
    __m256i half = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)w + i);
    if (type == DL_WEIGHT_F16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

DL_AVX512 float reduce512(__m512 v) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                // [s4[0]+s4[2], s4[1]+s4[3]]
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

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

#define DL_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define DL_AVX2_FN __attribute__((target("avx2,fma,f16c"))) static

DL_AVX2 __m256 load_w256(int type, const void *w, size_t i) {
    if (type == DL_WEIGHT_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (type == DL_WEIGHT_F16) return _mm256_cvtph_ps(half);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/// Elements `i..<i+count` (count < 8 allowed) widened, zeros beyond.
DL_AVX2 __m256 load_w256_partial(int type, const void *w, size_t i, size_t count) {
    float buffer[8] = {0};
    for (size_t e = 0; e < count && e < 8; e++) buffer[e] = weight_at(type, w, i + e);
    return _mm256_loadu_ps(buffer);
}

DL_AVX2 __m256 load_x256_partial(const float *x, size_t count) {
    float buffer[8] = {0};
    for (size_t e = 0; e < count && e < 8; e++) buffer[e] = x[e];
    return _mm256_loadu_ps(buffer);
}

DL_AVX2 float reduce256(__m256 low, __m256 high) {
    __m256 s8 = _mm256_add_ps(low, high);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

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

// ---------------------------------------------------------------------------------------------
// bf16 compute: activations and weights rounded to bf16, products summed in f32 by
// `vdpbf16ps`. Lane j of 16 takes the pairs k = 32t + 2j, 32t + 2j + 1: per pair it adds the odd
// product, then the even one, each as an f32 fused multiply-add with bf16 subnormal inputs read as
// zero and subnormal results flushed to zero (the instruction's definition). The lanes are then
// reduced with the same tree as the f32 path.

#define DL_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"), always_inline)) static inline
#define DL_BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))) static

DL_BF16 __m512i load_w512_bf16(int type, const void *w, size_t i) {
    if (type == DL_WEIGHT_BF16) return _mm512_loadu_si512((const void *)((const uint16_t *)w + i));
    __m512 low, high;
    if (type == DL_WEIGHT_F16) {
        low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
        high = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i + 16)));
    } else {
        low = _mm512_loadu_ps((const float *)w + i);
        high = _mm512_loadu_ps((const float *)w + i + 16);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

DL_BF16 __m512i load_w512_bf16_masked(int type, const void *w, size_t i, __mmask32 mask) {
    if (type == DL_WEIGHT_BF16) return _mm512_maskz_loadu_epi16(mask, (const uint16_t *)w + i);
    __mmask16 lowMask = (__mmask16)mask, highMask = (__mmask16)(mask >> 16);
    __m512 low, high;
    if (type == DL_WEIGHT_F16) {
        low = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lowMask, (const uint16_t *)w + i));
        high = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(highMask, (const uint16_t *)w + i + 16));
    } else {
        low = _mm512_maskz_loadu_ps(lowMask, (const float *)w + i);
        high = _mm512_maskz_loadu_ps(highMask, (const float *)w + i + 16);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}


DL_BF16 void tile_bf16(const int MR, const int NR, int type, const uint16_t *x, size_t ldx,
                       const void *w, size_t k, size_t n, float *y, size_t ldy) {
    __m512 acc[6][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    size_t kk = 0;
    for (; kk + 32 <= k; kk += 32) {
        __m512i wv[4];
        for (int j = 0; j < NR; j++) wv[j] = load_w512_bf16(type, w, (n + j) * k + kk);
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + i * ldx + kk));
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (kk < k) {
        __mmask32 mask = (__mmask32)((k - kk) >= 32 ? 0xffffffffu : ((1u << (k - kk)) - 1));
        __m512i wv[4];
        for (int j = 0; j < NR; j++) wv[j] = load_w512_bf16_masked(type, w, (n + j) * k + kk, mask);
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + kk);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + n + j] = reduce512(acc[i][j]);
}

DL_BF16 void rows_bf16(const int MR, int type, const uint16_t *x, size_t ldx, const void *w, size_t k,
                       size_t n_begin, size_t n_end, float *y, size_t ldy) {
    size_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) tile_bf16(MR, 4, type, x, ldx, w, k, n, y, ldy);
    switch (n_end - n) {
    case 3: tile_bf16(MR, 3, type, x, ldx, w, k, n, y, ldy); break;
    case 2: tile_bf16(MR, 2, type, x, ldx, w, k, n, y, ldy); break;
    case 1: tile_bf16(MR, 1, type, x, ldx, w, k, n, y, ldy); break;
    default: break;
    }
}

DL_BF16_FN void rows_bf16_dispatch(size_t rows, int type, const void *activations, size_t ldx, const void *w, size_t k,
                                   size_t ldw, size_t n_begin, size_t n_end, float *y, size_t ldy) {
    (void)ldw;  // the bf16 path reads whole weight rows (ldw == k)
    const uint16_t *x = activations;
    switch (rows) {
    case 6: rows_bf16(6, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 5: rows_bf16(5, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 4: rows_bf16(4, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 3: rows_bf16(3, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 2: rows_bf16(2, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    default: rows_bf16(1, type, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// Dispatch.

int dl_kernel_path_available(int path) {
    switch (path) {
    case DL_PATH_SCALAR: return 1;
#ifdef DL_X86
    case DL_PATH_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case DL_PATH_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    default: return 0;
    }
}

int dl_kernel_bf16_available(void) {
#ifdef DL_X86
    __builtin_cpu_init();
    return dl_kernel_path_available(DL_PATH_AVX512) && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int dl_kernel_path_best(void) {
    if (dl_kernel_path_available(DL_PATH_AVX512)) return DL_PATH_AVX512;
    if (dl_kernel_path_available(DL_PATH_AVX2)) return DL_PATH_AVX2;
    return DL_PATH_SCALAR;
}

#ifdef DL_X86
/// One of the `*_dispatch` functions above: rows `0..<rows` (at most the path's tile) of `x`
/// against columns `n_begin..<n_end`.
typedef void (*dl_rows_kernel)(size_t rows, int type, const void *x, size_t ldx, const void *w, size_t k, size_t ldw,
                               size_t n_begin, size_t n_end, float *y, size_t ldy);

/// The blocking every vector path shares: blocks of `row_block` rows (their activations stay in
/// cache) against groups of 16 columns (their weights stay in L1) against tiles of `tile_rows`
/// rows; a block's last 7 or 8 rows form one tile when `eight_row_tiles` (a decode batch in one
/// pass over the weights). `x` has elements of `x_size` bytes. Tiles never change the order of a
/// sum, so none of this changes a result's bits.
static void gemm_tiles(dl_rows_kernel kernel, size_t tile_rows, int eight_row_tiles, int type, const void *x, size_t x_size,
                       size_t ldx, size_t m, const void *w, size_t k, size_t ldw, size_t n_begin, size_t n_end,
                       float *y, size_t ldy, size_t row_block) {
    if (row_block < tile_rows) row_block = tile_rows;
    for (size_t r0 = 0; r0 < m; r0 += row_block) {
        size_t r1 = r0 + row_block < m ? r0 + row_block : m;
        for (size_t n0 = n_begin; n0 < n_end; n0 += 16) {
            size_t n1 = n0 + 16 < n_end ? n0 + 16 : n_end;
            for (size_t r = r0; r < r1;) {
                size_t rows = r1 - r < tile_rows ? r1 - r : tile_rows;
                if (eight_row_tiles && (r1 - r == 7 || r1 - r == 8)) rows = r1 - r;
                kernel(rows, type, (const char *)x + r * ldx * x_size, ldx, w, k, ldw, n0, n1, y + r * ldy, ldy);
                r += rows;
            }
        }
    }
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

void dl_gemm_bf16(int path, int weight_type, const uint16_t *x, size_t ldx, size_t m, const void *w, size_t k,
                  size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block) {
    if (m == 0 || n_end <= n_begin) return;
#ifdef DL_X86
    if (path == DL_PATH_AVX512 && dl_kernel_bf16_available()) {
        gemm_tiles(rows_bf16_dispatch, 6, 0, weight_type, x, sizeof(uint16_t), ldx, m, w, k, k, n_begin, n_end, y, ldy, row_block);
        return;
    }
#endif
    (void)row_block;
    gemm_bf16_scalar(weight_type, x, ldx, w, k, n_begin, n_end, m, y, ldy);
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

// ---------------------------------------------------------------------------------------------
// 8-bit weights (q8_0) times activations quantized per block of 32 on the fly.
//
// Per row and column, block b (32 values of K) gives 8 exact int32 group sums
// P[b][j] = Σ_{t<4} xq[32b + 4j + t] · wq[32b + 4j + t]; with s[b] = dx[b] · dw[b] (an f32
// product, dw widened from f16), lane (b mod 2) · 8 + j of 16 accumulates fmaf(P[b][j], s[b], lane)
// over increasing b from +0; the 16 lanes are then reduced with the tree of the f32 path. The group
// sums are exact on every path (VNNI's `vpdpbusd` on x + 128 minus 128 · Σw, or for one row on |x|
// and w signed like x; AVX2's `vpmaddubsw` on |x| and w signed like x; or a plain loop), so every
// path computes the same bits. A lane never
// holds -0, so the zero block that pads an odd block count on the vector paths changes nothing.
//
// An activation record (one row) is `pairs · 64` bytes of int8 quants (block pairs; zeros past K)
// followed by `pairs · 16` floats: block b's scale repeated 8 times from float b · 8 (zero for the
// padding block), the layout the AVX-512 lanes load directly.

typedef struct {
    const int8_t *quants;
    const uint16_t *scales;
} dl_q8_weight;

static inline size_t q8_blocks(size_t k) { return (k + DL_Q8_BLOCK - 1) / DL_Q8_BLOCK; }
static inline size_t q8_pairs(size_t k) { return (q8_blocks(k) + 1) / 2; }

size_t dl_q8_activation_row_bytes(size_t k) { return q8_pairs(k) * 128; }

void dl_quantize_activations_q8(const float *x, size_t ldx, size_t m, size_t k, void *out) {
    size_t blocks = q8_blocks(k), pairs = q8_pairs(k), bytes = dl_q8_activation_row_bytes(k);
    for (size_t r = 0; r < m; r++) {
        uint8_t *record = (uint8_t *)out + r * bytes;
        memset(record, 0, bytes);
        int8_t *quants = (int8_t *)record;
        float *scales = (float *)(record + pairs * 64);
        const float *row = x + r * ldx;
        for (size_t b = 0; b < blocks; b++) {
            size_t begin = b * DL_Q8_BLOCK, end = begin + DL_Q8_BLOCK < k ? begin + DL_Q8_BLOCK : k;
            float amax = 0;
            int finite = 1;
            for (size_t i = begin; i < end; i++) {
                if (!isfinite(row[i])) finite = 0;
                else amax = fmaxf(amax, fabsf(row[i]));
            }
            float scale;
            if (!finite) {
                scale = NAN;
            } else if (!(amax >= 0x1p-100f)) {
                scale = 0;
            } else {
                scale = amax / 127.0f;
                float inverse = 127.0f / amax;
                for (size_t i = begin; i < end; i++) {
                    float q = nearbyintf(row[i] * inverse);
                    quants[i] = (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
                }
            }
            for (int j = 0; j < 8; j++) scales[b * 8 + j] = scale;
        }
    }
}

long dl_quantize_weights_q8(const float *w, size_t rows, size_t k, int8_t *quants, uint16_t *scales) {
    size_t blocks = q8_blocks(k);
    for (size_t r = 0; r < rows; r++) {
        const float *row = w + r * k;
        int8_t *q = quants + r * blocks * DL_Q8_BLOCK;
        memset(q, 0, blocks * DL_Q8_BLOCK);
        for (size_t b = 0; b < blocks; b++) {
            size_t begin = b * DL_Q8_BLOCK, end = begin + DL_Q8_BLOCK < k ? begin + DL_Q8_BLOCK : k;
            float amax = 0;
            for (size_t i = begin; i < end; i++) {
                if (!isfinite(row[i])) return (long)(r * k + i);
                amax = fmaxf(amax, fabsf(row[i]));
            }
            float scale = amax / 127.0f;
            uint16_t half;
            dl_narrow_f16(&scale, &half, 1);
            scales[r * blocks + b] = half;
            float stored = f16_to_float(half);
            if (isinf(stored)) return (long)(r * k + begin);
            if (stored == 0) continue;
            for (size_t i = begin; i < end; i++) {
                float v = nearbyintf(row[i] / stored);
                q[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
            }
        }
    }
    return -1;
}

long dl_q8_find_invalid_quant(const int8_t *quants, size_t count) {
    for (size_t i = 0; i < count; i++)
        if (quants[i] == -128) return (long)i;
    return -1;
}

static void gemm_q8_scalar(const uint8_t *records, size_t m, const dl_q8_weight *w, size_t k, size_t n_begin, size_t n_end,
                           float *y, size_t ldy) {
    size_t blocks = q8_blocks(k), pairs = q8_pairs(k), bytes = dl_q8_activation_row_bytes(k);
    for (size_t n = n_begin; n < n_end; n++) {
        const int8_t *wq = w->quants + n * blocks * DL_Q8_BLOCK;
        for (size_t r = 0; r < m; r++) {
            const int8_t *xq = (const int8_t *)(records + r * bytes);
            const float *xs = (const float *)(records + r * bytes + pairs * 64);
            float lanes[16] = {0};
            for (size_t b = 0; b < blocks; b++) {
                float s = xs[b * 8] * f16_to_float(w->scales[n * blocks + b]);
                for (int j = 0; j < 8; j++) {
                    int32_t sum = 0;
                    for (int t = 0; t < 4; t++) sum += (int32_t)xq[32 * b + 4 * j + t] * (int32_t)wq[32 * b + 4 * j + t];
                    float *lane = &lanes[(b & 1) * 8 + j];
                    *lane = fmaf((float)sum, s, *lane);
                }
            }
            y[r * ldy + n] = reduce_lanes16(lanes);
        }
    }
}

#ifdef DL_X86
/// Weight rows are prefetched this many block pairs (64-byte lines) ahead: with q8's extra
/// arithmetic per byte the hardware prefetcher alone left a single row's product well below the
/// read rate the f16 kernel reaches (measured 1.3x the f16 speed per decoder layer without, 1.5-1.7x
/// with, one thread).
enum { Q8_PREFETCH_PAIRS = 8 };

#define DL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"), always_inline)) static inline
#define DL_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"))) static

/// One tile of `MR` rows (activation records `ldx` bytes apart) by `NR` weight rows from `n`.
DL_VNNI void tile_q8_512(const int MR, const int NR, const uint8_t *x, size_t ldx, const dl_q8_weight *w, size_t k, size_t n,
                         float *y, size_t ldy) {
    size_t blocks = q8_blocks(k), pairs = q8_pairs(k);
    const __m512i offset = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[8][8];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (size_t p = 0; p < pairs; p++) {
        int both = 2 * p + 1 < blocks;
        if (p + Q8_PREFETCH_PAIRS < pairs)
            for (int j = 0; j < NR; j++)
                _mm_prefetch((const char *)(w->quants + (n + j) * blocks * DL_Q8_BLOCK + 64 * (p + Q8_PREFETCH_PAIRS)), _MM_HINT_T0);
        // Several rows: x + 128 (unsigned) against w, less 128 · Σw per column, shared by the rows.
        // One row: |x| against w with x's sign, which saves that correction.
        __m512i xu[8];
        __m512 xs[8];
        __mmask64 negative = 0;
        for (int i = 0; i < MR; i++) {
            __m512i raw = _mm512_loadu_si512((const void *)(x + i * ldx + 64 * p));
            if (MR == 1) {
                xu[i] = _mm512_abs_epi8(raw);
                negative = _mm512_movepi8_mask(raw);
            } else {
                xu[i] = _mm512_xor_si512(raw, offset);
            }
            xs[i] = _mm512_loadu_ps((const float *)(x + i * ldx + pairs * 64) + 16 * p);
        }
        for (int j = 0; j < NR; j++) {
            const int8_t *wr = w->quants + (n + j) * blocks * DL_Q8_BLOCK + 64 * p;
            const uint16_t *sr = w->scales + (n + j) * blocks + 2 * p;
            __m512i wv;
            __m128i halves;
            if (both) {
                wv = _mm512_loadu_si512((const void *)wr);
                uint32_t pair;
                memcpy(&pair, sr, sizeof pair);
                halves = _mm_cvtsi32_si128((int)pair);
            } else {
                wv = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)wr));
                halves = _mm_cvtsi32_si128(sr[0]);
            }
            __m512 dw = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(halves)));
            if (MR == 1) {
                __m512i sums = _mm512_dpbusd_epi32(zero, xu[0], _mm512_mask_sub_epi8(wv, negative, zero, wv));
                acc[0][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(xs[0], dw), acc[0][j]);
                continue;
            }
            __m512i correction = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, wv));
            for (int i = 0; i < MR; i++) {
                __m512i sums = _mm512_dpbusd_epi32(correction, xu[i], wv);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(xs[i], dw), acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + n + j] = reduce512(acc[i][j]);
}

DL_VNNI void rows_q8_512(const int MR, const int NR, const uint8_t *x, size_t ldx, const dl_q8_weight *w, size_t k,
                         size_t n_begin, size_t n_end, float *y, size_t ldy) {
    size_t n = n_begin;
    for (; n + NR <= n_end; n += NR) tile_q8_512(MR, NR, x, ldx, w, k, n, y, ldy);
    if (NR > 4 && n + 4 <= n_end) {
        tile_q8_512(MR, 4, x, ldx, w, k, n, y, ldy);
        n += 4;
    }
    switch (n_end - n) {
    case 3: tile_q8_512(MR, 3, x, ldx, w, k, n, y, ldy); break;
    case 2: tile_q8_512(MR, 2, x, ldx, w, k, n, y, ldy); break;
    case 1: tile_q8_512(MR, 1, x, ldx, w, k, n, y, ldy); break;
    default: break;
    }
}

/// Tiles: one row against 8 columns (8 weight streams in flight: decode of one row), 2 to 4 rows
/// against 4, 7 or 8 rows against 2 (the accumulators stay in registers).
DL_VNNI_FN void rows_q8_512_dispatch(size_t rows, int type, const void *activations, size_t ldx, const void *weight, size_t k,
                                     size_t ldw, size_t n_begin, size_t n_end, float *y, size_t ldy) {
    (void)type, (void)ldw;
    const uint8_t *x = activations;
    const dl_q8_weight *w = weight;
    switch (rows) {
    case 8: rows_q8_512(8, 2, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 7: rows_q8_512(7, 2, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 4: rows_q8_512(4, 4, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 3: rows_q8_512(3, 4, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    case 2: rows_q8_512(2, 4, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    default: rows_q8_512(1, 8, x, ldx, w, k, n_begin, n_end, y, ldy); break;
    }
}

/// AVX2: one block per ymm; even blocks accumulate into lanes 0-7 (`acc[0]`), odd ones into
/// lanes 8-15 (`acc[1]`). `vpmaddubsw` on |x| and w with x's sign cannot saturate: quants lie in
/// -127...127, so a pair sums to at most 2 · 127².
DL_AVX2 void tile_q8_256(const int MR, const int NR, const uint8_t *x, size_t ldx, const dl_q8_weight *w, size_t k, size_t n,
                         float *y, size_t ldy) {
    size_t blocks = q8_blocks(k), pairs = q8_pairs(k);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2][2][2];
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[h][i][j] = _mm256_setzero_ps();
    for (size_t b = 0; b < blocks; b++) {
        int h = (int)(b & 1);
        __m256i xq[2], xa[2];
        __m256 xs[2];
        for (int i = 0; i < MR; i++) {
            xq[i] = _mm256_loadu_si256((const __m256i *)(x + i * ldx + 32 * b));
            xa[i] = _mm256_abs_epi8(xq[i]);
            xs[i] = _mm256_loadu_ps((const float *)(x + i * ldx + pairs * 64) + 8 * b);
        }
        for (int j = 0; j < NR; j++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w->quants + (n + j) * blocks * DL_Q8_BLOCK + 32 * b));
            __m256 dw = _mm256_set1_ps(_cvtsh_ss(w->scales[(n + j) * blocks + b]));
            for (int i = 0; i < MR; i++) {
                __m256i pairsums = _mm256_maddubs_epi16(xa[i], _mm256_sign_epi8(wv, xq[i]));
                __m256i sums = _mm256_madd_epi16(pairsums, ones);
                acc[h][i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(xs[i], dw), acc[h][i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[i * ldy + n + j] = reduce256(acc[0][i][j], acc[1][i][j]);
}

DL_AVX2 void rows_q8_256(const int MR, const uint8_t *x, size_t ldx, const dl_q8_weight *w, size_t k, size_t n_begin, size_t n_end,
                         float *y, size_t ldy) {
    size_t n = n_begin;
    for (; n + 2 <= n_end; n += 2) tile_q8_256(MR, 2, x, ldx, w, k, n, y, ldy);
    if (n < n_end) tile_q8_256(MR, 1, x, ldx, w, k, n, y, ldy);
}

DL_AVX2_FN void rows_q8_256_dispatch(size_t rows, int type, const void *activations, size_t ldx, const void *weight, size_t k,
                                     size_t ldw, size_t n_begin, size_t n_end, float *y, size_t ldy) {
    (void)type, (void)ldw;
    if (rows == 2) rows_q8_256(2, activations, ldx, weight, k, n_begin, n_end, y, ldy);
    else rows_q8_256(1, activations, ldx, weight, k, n_begin, n_end, y, ldy);
}
#endif

int dl_kernel_q8_vnni_available(void) {
#ifdef DL_X86
    __builtin_cpu_init();
    return dl_kernel_path_available(DL_PATH_AVX512) && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

void dl_gemm_q8(int path, const void *activations, size_t m, const int8_t *quants, const uint16_t *scales, size_t k,
                size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block) {
    if (m == 0 || n_end <= n_begin) return;
    if (k == 0) {
        for (size_t r = 0; r < m; r++)
            for (size_t n = n_begin; n < n_end; n++) y[r * ldy + n] = 0;
        return;
    }
    dl_q8_weight weight = {quants, scales};
    size_t record = dl_q8_activation_row_bytes(k);
#ifdef DL_X86
    if (path == DL_PATH_AVX512 && dl_kernel_q8_vnni_available()) {
        gemm_tiles(rows_q8_512_dispatch, 4, 1, 0, activations, 1, record, m, &weight, k, 0, n_begin, n_end, y, ldy, row_block);
        return;
    }
    if ((path == DL_PATH_AVX512 || path == DL_PATH_AVX2) && dl_kernel_path_available(DL_PATH_AVX2)) {
        gemm_tiles(rows_q8_256_dispatch, 2, 0, 0, activations, 1, record, m, &weight, k, 0, n_begin, n_end, y, ldy, row_block);
        return;
    }
#endif
    (void)row_block;
    gemm_q8_scalar(activations, m, &weight, k, n_begin, n_end, y, ldy);
}
