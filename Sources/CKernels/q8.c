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

#include "simd.h"
#include <math.h>
#include <string.h>

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
