// The engine's f32 matrix product on weights packed into column panels: the outer-product form.
//
// Layout: a weight `[N, K]` (f32, f16 or bf16, kept in its stored type) becomes ceil(N / 16)
// panels; panel p holds columns 16p ..< 16p + 16 as `[K][16]` (element (n, k) at
// `(p · K + k) · 16 + n mod 16`), columns past N zero. One `k` row of a panel is one vector of 16
// output columns, so a micro-kernel broadcasts `x[r, k]` and multiplies the panel row: every
// weight load serves every row of the tile, and a decode step streams each panel once.
//
// Batch invariance by construction: every output element is one chain of fused multiply-adds in
// increasing k from +0, `y = fma(x[r, K-1], w[n, K-1], ... fma(x[r, 0], w[n, 0], +0))`, on every
// path (AVX-512: a panel in one zmm; AVX2: in two ymm; scalar: fmaf). Tiles over rows and panels
// only decide which chains run side by side, never the order inside a chain, so a row's bits are
// the same alone or in any batch, for any thread count and on any path.
#include "simd.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { PANEL = 16 };

static inline size_t element_bytes(int type) { return type == DL_WEIGHT_F32 ? 4 : 2; }

size_t dl_panel_bytes(int weight_type, size_t n, size_t k) {
    return (n + PANEL - 1) / PANEL * PANEL * k * element_bytes(weight_type);
}

void dl_pack_panels(int weight_type, const void *w, size_t ldw, size_t n, size_t k, void *panels, size_t panel_begin,
                    size_t panel_end) {
    size_t size = element_bytes(weight_type);
    for (size_t p = panel_begin; p < panel_end; p++) {
        char *panel = (char *)panels + p * PANEL * k * size;
        for (size_t c = 0; c < PANEL; c++) {
            size_t column = p * PANEL + c;
            if (column >= n) {
                for (size_t kk = 0; kk < k; kk++) memset(panel + (kk * PANEL + c) * size, 0, size);
                continue;
            }
            const char *row = (const char *)w + column * ldw * size;
            if (size == 4) {
                const uint32_t *source = (const uint32_t *)row;
                uint32_t *destination = (uint32_t *)panel + c;
                for (size_t kk = 0; kk < k; kk++) destination[kk * PANEL] = source[kk];
            } else {
                const uint16_t *source = (const uint16_t *)row;
                uint16_t *destination = (uint16_t *)panel + c;
                for (size_t kk = 0; kk < k; kk++) destination[kk * PANEL] = source[kk];
            }
        }
    }
}

void dl_pack_panels_from_columns(int weight_type, const void *v, size_t ldv, size_t n, size_t k, void *panels) {
    size_t size = element_bytes(weight_type);
    for (size_t p = 0; p * PANEL < n; p++) {
        size_t width = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
        char *panel = (char *)panels + p * PANEL * k * size;
        for (size_t kk = 0; kk < k; kk++) {
            memcpy(panel + kk * PANEL * size, (const char *)v + (kk * ldv + p * PANEL) * size, width * size);
            if (width < PANEL) memset(panel + (kk * PANEL + width) * size, 0, (PANEL - width) * size);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar: the chain written out, one element at a time.

static void panels_scalar(int type, const float *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin,
                          size_t n_end, float *y, size_t ldy) {
    size_t size = element_bytes(type);
    for (size_t n = n_begin; n < n_end; n++) {
        const char *panel = (const char *)panels + (n / PANEL) * PANEL * k * size;
        for (size_t r = 0; r < m; r++) {
            float acc = 0;
            for (size_t kk = 0; kk < k; kk++) acc = fmaf(x[r * ldx + kk], weight_at(type, panel, kk * PANEL + n % PANEL), acc);
            y[r * ldy + n] = acc;
        }
    }
}

#ifdef DL_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: tiles of MR rows x NP panels, one zmm accumulator per row and panel.

DL_AVX512 __m512 panel_row512(int type, const void *panel, size_t kk) {
    if (type == DL_WEIGHT_F32) return _mm512_loadu_ps((const float *)panel + kk * PANEL);
    __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)panel + kk * PANEL));
    if (type == DL_WEIGHT_F16) return _mm512_cvtph_ps(half);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/// Panel rows prefetched ahead of a one- or two-row tile (the bf16 kernel's distance in bytes).
enum { F32_PREFETCH_ROWS = 32 };

/// Rows `x[0..<MR]` times panels `p..<p + NP`; writes the columns of those panels below `n_end`.
DL_AVX512 void tile512(const int MR, const int NP, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                       size_t k, size_t p, size_t n_end, float *y, size_t ldy) {
    __m512 acc[12][8];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NP; j++) acc[i][j] = _mm512_setzero_ps();
    const char *base = panels + p * panel_stride;
    size_t row_bytes = PANEL * element_bytes(type);
    for (size_t kk = 0; kk < k; kk++) {
        __m512 wv[8];
        for (int j = 0; j < NP; j++) {
            // Few rows: little arithmetic per weight line, so the stream is prefetched ahead.
            if (MR <= 2) _mm_prefetch(base + j * panel_stride + (kk + F32_PREFETCH_ROWS) * row_bytes, _MM_HINT_T0);
            wv[j] = panel_row512(type, base + j * panel_stride, kk);
        }
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_set1_ps(x[i * ldx + kk]);
            for (int j = 0; j < NP; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int j = 0; j < NP; j++) {
        size_t column = (p + j) * PANEL;
        if (column >= n_end) break;
        __mmask16 mask = n_end - column >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << (n_end - column)) - 1);
        for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(y + i * ldy + column, mask, acc[i][j]);
    }
}

/// Rows `0..<MR` against panels `p_begin..<p_end`, `NP` at a time (fewer for the last).
DL_AVX512 void rows512(const int MR, const int NP, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                       size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    size_t p = p_begin;
    for (; p + NP <= p_end; p += NP) tile512(MR, NP, type, x, ldx, panels, panel_stride, k, p, n_end, y, ldy);
    for (; p < p_end; p++) tile512(MR, 1, type, x, ldx, panels, panel_stride, k, p, n_end, y, ldy);
}

/// Up to 6 rows run against 4 panels at a time (enough independent chains for one decode row),
/// 7 to 12 rows against 2: at most 24 accumulators, in registers.
DL_AVX512_FN void rows512_dispatch(size_t rows, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                                   size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    switch (rows) {
#define DL_CASE(R, NP) case R: rows512(R, NP, type, x, ldx, panels, panel_stride, k, p_begin, p_end, n_end, y, ldy); break;
    DL_CASE(12, 2) DL_CASE(11, 2) DL_CASE(10, 2) DL_CASE(9, 2) DL_CASE(8, 2) DL_CASE(7, 2)
    DL_CASE(6, 4) DL_CASE(5, 4) DL_CASE(4, 4) DL_CASE(3, 4) DL_CASE(2, 4)
    default: rows512(1, 4, type, x, ldx, panels, panel_stride, k, p_begin, p_end, n_end, y, ldy); break;
#undef DL_CASE
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: a panel row in two ymm (columns 0-7 and 8-15); tiles of MR rows x NP panels.

DL_AVX2 __m256 panel_half256(int type, const void *panel, size_t i) {
    if (type == DL_WEIGHT_F32) return _mm256_loadu_ps((const float *)panel + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)panel + i));
    if (type == DL_WEIGHT_F16) return _mm256_cvtph_ps(half);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

DL_AVX2 void store_columns256(float *y, __m256 v, size_t count) {
    if (count >= 8) {
        _mm256_storeu_ps(y, v);
        return;
    }
    float buffer[8];
    _mm256_storeu_ps(buffer, v);
    for (size_t e = 0; e < count; e++) y[e] = buffer[e];
}

DL_AVX2 void tile256(const int MR, const int NP, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                     size_t k, size_t p, size_t n_end, float *y, size_t ldy) {
    __m256 acc[6][2][2];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NP; j++) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
    const char *base = panels + p * panel_stride;
    for (size_t kk = 0; kk < k; kk++) {
        __m256 wv[2][2];
        for (int j = 0; j < NP; j++) {
            wv[j][0] = panel_half256(type, base + j * panel_stride, kk * PANEL);
            wv[j][1] = panel_half256(type, base + j * panel_stride, kk * PANEL + 8);
        }
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_broadcast_ss(x + i * ldx + kk);
            for (int j = 0; j < NP; j++) {
                acc[i][j][0] = _mm256_fmadd_ps(xv, wv[j][0], acc[i][j][0]);
                acc[i][j][1] = _mm256_fmadd_ps(xv, wv[j][1], acc[i][j][1]);
            }
        }
    }
    for (int j = 0; j < NP; j++) {
        size_t column = (p + j) * PANEL;
        if (column >= n_end) break;
        size_t count = n_end - column < PANEL ? n_end - column : PANEL;
        for (int i = 0; i < MR; i++) {
            store_columns256(y + i * ldy + column, acc[i][j][0], count);
            if (count > 8) store_columns256(y + i * ldy + column + 8, acc[i][j][1], count - 8);
        }
    }
}

DL_AVX2 void rows256(const int MR, const int NP, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                     size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    size_t p = p_begin;
    for (; p + NP <= p_end; p += NP) tile256(MR, NP, type, x, ldx, panels, panel_stride, k, p, n_end, y, ldy);
    if (p < p_end) tile256(MR, 1, type, x, ldx, panels, panel_stride, k, p, n_end, y, ldy);
}

/// Up to 3 rows against 2 panels, 4 to 6 rows against 1: at most 12 accumulators.
DL_AVX2_FN void rows256_dispatch(size_t rows, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                                 size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    switch (rows) {
#define DL_CASE(R, NP) case R: rows256(R, NP, type, x, ldx, panels, panel_stride, k, p_begin, p_end, n_end, y, ldy); break;
    DL_CASE(6, 1) DL_CASE(5, 1) DL_CASE(4, 1) DL_CASE(3, 2) DL_CASE(2, 2)
    default: rows256(1, 2, type, x, ldx, panels, panel_stride, k, p_begin, p_end, n_end, y, ldy); break;
#undef DL_CASE
    }
}

typedef void (*dl_panel_rows_kernel)(size_t rows, int type, const float *x, size_t ldx, const char *panels, size_t panel_stride,
                                     size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy);

/// The blocking the vector paths share: the columns in chunks of panels small enough to stay in
/// L2 while every row tile passes over them; the rows in tiles of `tile_rows`. Neither changes a
/// chain's order. f16 and bf16 panels serving many row tiles are first widened, a chunk at a time,
/// into an f32 scratch (exact), so each weight is converted once per call rather than once per
/// row tile: the conversions otherwise take issue slots from the fused multiply-adds.
static void panels_tiled(dl_panel_rows_kernel kernel, size_t tile_rows, int type, const float *x, size_t ldx, size_t m,
                         const void *panels, size_t k, size_t n_begin, size_t n_end, float *y, size_t ldy) {
    size_t panel_stride = PANEL * k * element_bytes(type);
    int widens = type != DL_WEIGHT_F32 && m >= 4 * tile_rows;
    size_t chunk = (512u << 10) / (PANEL * k * (widens ? 4 : element_bytes(type)) + 1);
    chunk = chunk < 2 ? 2 : chunk & ~(size_t)1;
    float *scratch = widens ? malloc(chunk * PANEL * k * sizeof(float)) : NULL;
    if (widens && !scratch) widens = 0;
    size_t p_end = (n_end + PANEL - 1) / PANEL;
    for (size_t p0 = n_begin / PANEL; p0 < p_end; p0 += chunk) {
        size_t p1 = p0 + chunk < p_end ? p0 + chunk : p_end;
        if (widens) {
            const uint16_t *source = (const uint16_t *)((const char *)panels + p0 * panel_stride);
            if (type == DL_WEIGHT_F16) dl_widen_f16(source, scratch, (p1 - p0) * PANEL * k);
            else dl_widen_bf16(source, scratch, (p1 - p0) * PANEL * k);
        }
        for (size_t r = 0; r < m;) {
            size_t rows = m - r < tile_rows ? m - r : tile_rows;
            if (widens) {  // the scratch's panel 0 is panel p0: columns shift by 16 · p0
                size_t shift = p0 * PANEL;
                kernel(rows, DL_WEIGHT_F32, x + r * ldx, ldx, (const char *)scratch, PANEL * k * sizeof(float), k, 0, p1 - p0,
                       n_end - shift, y + r * ldy + shift, ldy);
            } else {
                kernel(rows, type, x + r * ldx, ldx, panels, panel_stride, k, p0, p1, n_end, y + r * ldy, ldy);
            }
            r += rows;
        }
    }
    free(scratch);
}
#endif

void dl_gemm_panels(int path, int weight_type, const float *x, size_t ldx, size_t m, const void *panels, size_t k,
                    size_t n_begin, size_t n_end, float *y, size_t ldy) {
    if (m == 0 || n_end <= n_begin) return;
#ifdef DL_X86
    if (path == DL_PATH_AVX512) {
        panels_tiled(rows512_dispatch, 12, weight_type, x, ldx, m, panels, k, n_begin, n_end, y, ldy);
        return;
    }
    if (path == DL_PATH_AVX2) {
        panels_tiled(rows256_dispatch, 6, weight_type, x, ldx, m, panels, k, n_begin, n_end, y, ldy);
        return;
    }
#endif
    panels_scalar(weight_type, x, ldx, m, panels, k, n_begin, n_end, y, ldy);
}
