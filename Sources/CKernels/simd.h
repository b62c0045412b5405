// Private to the kernels: the per-function target macros, the vector loads and lane reductions
// that several kernel files share, and the row/column blocking of the row-major products. Each
// kernel file includes it; nothing outside Sources/CKernels does. Which CPU runs which target is
// answered by cpu_features.c alone.
#ifndef DLLAVA_CKERNELS_SIMD_H
#define DLLAVA_CKERNELS_SIMD_H

#include "CKernels.h"
#include "scalar.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define DL_X86 1
#endif

/// F16C (with AVX) and AVX-512 F+BW: the conversions' fast loops (cpu_features.c).
int dl_cpu_has_f16c(void);
int dl_cpu_has_avx512bw(void);

#ifdef DL_X86
#define DL_TARGET_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#define DL_TARGET_AVX2 "avx2,fma,f16c"
#define DL_TARGET_BF16 DL_TARGET_AVX512 ",avx512bf16"
#define DL_TARGET_VNNI DL_TARGET_AVX512 ",avx512vnni"

/// `DL_<TARGET>`: an inlined helper compiled for that target; `DL_<TARGET>_FN`: a function the
/// dispatch calls (only after cpu_features.c says the CPU runs the target).
#define DL_AVX512 __attribute__((target(DL_TARGET_AVX512), always_inline)) static inline
#define DL_AVX512_FN __attribute__((target(DL_TARGET_AVX512))) static
#define DL_AVX2 __attribute__((target(DL_TARGET_AVX2), always_inline)) static inline
#define DL_AVX2_FN __attribute__((target(DL_TARGET_AVX2))) static
#define DL_BF16 __attribute__((target(DL_TARGET_BF16), always_inline)) static inline
#define DL_BF16_FN __attribute__((target(DL_TARGET_BF16))) static
#define DL_VNNI __attribute__((target(DL_TARGET_VNNI), always_inline)) static inline
#define DL_VNNI_FN __attribute__((target(DL_TARGET_VNNI))) static

// ---------------------------------------------------------------------------------------------
// AVX-512 loads (f32, f16 widened by vcvtph2ps, bf16 widened by a 16-bit shift) and the fixed
// 16-lane reduction tree of scalar.h.

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


// ---------------------------------------------------------------------------------------------
// AVX2: the same 16 lanes in two ymm registers.

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

/// A kernel file's `*_dispatch` function: rows `0..<rows` (at most the path's tile) of `x`
/// against columns `n_begin..<n_end`.
typedef void (*dl_rows_kernel)(size_t rows, int type, const void *x, size_t ldx, const void *w, size_t k, size_t ldw,
                               size_t n_begin, size_t n_end, float *y, size_t ldy);

/// The blocking every vector path shares: blocks of `row_block` rows (their activations stay in
/// cache) against groups of 16 columns (their weights stay in L1) against tiles of `tile_rows`
/// rows; a block's last 7 or 8 rows form one tile when `eight_row_tiles` (a decode batch in one
/// pass over the weights). `x` has elements of `x_size` bytes. Tiles never change the order of a
/// sum, so none of this changes a result's bits.
static inline void gemm_tiles(dl_rows_kernel kernel, size_t tile_rows, int eight_row_tiles, int type, const void *x, size_t x_size,
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

#endif
