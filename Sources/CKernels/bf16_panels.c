// The bf16 precision's products: weights rounded to bf16 and packed into panels of 16 columns
// (for this file's `vdpbf16ps` kernel and bf16_amx.c's AMX kernel), activations rounded to bf16.
//
// Layout: the weight `[N, K]` rounded to bf16 (as `vcvtne2ps2bf16` rounds: an f32 subnormal read
// as zero, then nearest even; bf16 weights as stored) in panels of 16 columns; panel p holds
// `[Kp / 2][16][2]` with Kp = K rounded up to 32: pair `(k, k + 1)` of column n adjacent (an AMX
// B tile, and one `vdpbf16ps` operand per pair of k). Padding is zero.
//
// Arithmetic of `dl_gemm_bf16_panels` (the outer-product form): each output element is one chain
// over the pairs t = 0, 1, ... < ceil(K / 2) in increasing order from +0. Per pair it adds the odd
// product x[2t+1]·w[2t+1], then the even one x[2t]·w[2t], each as an f32 fused multiply-add whose
// bf16 subnormal inputs are read as zero and whose subnormal result is flushed to zero (sign
// kept): the definition of `vdpbf16ps`, which the AVX-512 kernel runs on a broadcast pair of
// activations against a panel row, one zmm accumulator per row and panel. An odd K's last pair
// has a zero activation and a zero weight. Tiles over rows and panels only choose which chains
// run side by side; K is never split and edge tiles run the same instructions (masked stores
// only), so a row's bits are the same alone or in any batch, for any thread count, and the plain
// path computes the same bits as the AVX-512 one.
#include "simd.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { PANEL = 16, KTILE = 32 };

static inline size_t padded_k(size_t k) { return (k + KTILE - 1) / KTILE * KTILE; }

size_t dl_panel_bytes_bf16(size_t n, size_t k) { return (n + PANEL - 1) / PANEL * PANEL * padded_k(k) * 2; }

/// Row `row` of `w` (`k` values) rounded to bf16 into `out`, through the f32 scratch `widened`.
static void rounded_row(int type, const void *w, size_t row, size_t k, float *widened, uint16_t *out) {
    if (type == DL_WEIGHT_BF16) {
        memcpy(out, (const uint16_t *)w + row, k * 2);
        return;
    }
    if (type == DL_WEIGHT_F16) dl_widen_f16((const uint16_t *)w + row, widened, k);
    else memcpy(widened, (const float *)w + row, k * 4);
    for (size_t i = 0; i < k; i++) {  // a subnormal is read as zero, sign kept
        uint32_t bits;
        memcpy(&bits, widened + i, sizeof bits);
        if ((bits & 0x7f800000u) == 0) {
            bits &= 0x80000000u;
            memcpy(widened + i, &bits, sizeof bits);
        }
    }
    dl_narrow_bf16(widened, out, k);
}

void dl_pack_panels_bf16(int weight_type, const void *w, size_t ldw, size_t n, size_t k, void *panels, size_t panel_begin,
                         size_t panel_end) {
    size_t kp = padded_k(k);
    float *widened = malloc((k ? k : 1) * sizeof(float));
    uint16_t *rounded = malloc((k ? k : 1) * sizeof(uint16_t));
    for (size_t p = panel_begin; p < panel_end; p++) {
        uint16_t *panel = (uint16_t *)panels + p * PANEL * kp;
        memset(panel, 0, PANEL * kp * 2);
        for (size_t c = 0; c < PANEL && p * PANEL + c < n; c++) {
            rounded_row(weight_type, w, (p * PANEL + c) * ldw, k, widened, rounded);
            for (size_t kk = 0; kk < k; kk++) panel[(kk / 2) * 2 * PANEL + c * 2 + (kk & 1)] = rounded[kk];
        }
    }
    free(widened);
    free(rounded);
}

void dl_pack_panels_bf16_from_columns(int weight_type, const void *v, size_t ldv, size_t n, size_t k, void *panels) {
    size_t kp = padded_k(k), panel_count = (n + PANEL - 1) / PANEL;
    memset(panels, 0, panel_count * PANEL * kp * 2);
    float *widened = malloc((n ? n : 1) * sizeof(float));
    uint16_t *rounded = malloc((n ? n : 1) * sizeof(uint16_t));
    for (size_t kk = 0; kk < k; kk++) {
        rounded_row(weight_type, v, kk * ldv, n, widened, rounded);
        for (size_t column = 0; column < n; column++) {
            uint16_t *panel = (uint16_t *)panels + (column / PANEL) * PANEL * kp;
            panel[(kk / 2) * 2 * PANEL + (column % PANEL) * 2 + (kk & 1)] = rounded[column];
        }
    }
    free(widened);
    free(rounded);
}


static inline size_t pair_count(size_t k) { return (k + 1) / 2; }

/// A bf16 value with a subnormal read as zero (sign kept), as `vdpbf16ps` reads its inputs.
static inline float bf16_input(uint16_t v) {
    if ((v & 0x7f80) == 0) v &= 0x8000;
    return bf16_to_float(v);
}

/// An f32 result with a subnormal flushed to zero (sign kept), as `vdpbf16ps` writes it.
static inline float flush_subnormal(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/// The plain twin: the chain written out, one element at a time.
static void bf16_panels_scalar(const uint16_t *x, size_t ldx, size_t m, const uint16_t *panels, size_t k, size_t n_begin,
                               size_t n_end, float *y, size_t ldy) {
    size_t panel_elements = PANEL * padded_k(k), pairs = pair_count(k);
    for (size_t n = n_begin; n < n_end; n++) {
        const uint16_t *column = panels + (n / PANEL) * panel_elements + (n % PANEL) * 2;
        for (size_t r = 0; r < m; r++) {
            const uint16_t *xr = x + r * ldx;
            float acc = 0;
            for (size_t t = 0; t < pairs; t++) {
                uint16_t odd = 2 * t + 1 < k ? xr[2 * t + 1] : 0;
                acc = flush_subnormal(fmaf(bf16_input(odd), bf16_input(column[t * 2 * PANEL + 1]), acc));
                acc = flush_subnormal(fmaf(bf16_input(xr[2 * t]), bf16_input(column[t * 2 * PANEL]), acc));
            }
            y[r * ldy + n] = acc;
        }
    }
}

#ifdef DL_X86
/// Weight lines are prefetched this many pairs (64-byte panel rows) ahead when few rows share a
/// tile: then each panel row serves little arithmetic and the stream must not stall.
enum { BF16_PREFETCH_PAIRS = 16 };

/// Activations `x[i · ldx + 2t]` and `x[i · ldx + 2t + 1]` as one 32-bit pair in every lane.
DL_BF16 __m512i broadcast_pair(const uint16_t *x) {
    uint32_t pair;
    memcpy(&pair, x, sizeof pair);
    return _mm512_set1_epi32((int)pair);
}

/// Rows `x[0..<MR]` times panels `p..<p + NP`; writes the columns of those panels below `n_end`.
DL_BF16 void tile_bf16(const int MR, const int NP, const uint16_t *x, size_t ldx, const uint16_t *panels,
                       size_t panel_elements, size_t k, size_t p, size_t n_end, float *y, size_t ldy) {
    __m512 acc[14][8];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NP; j++) acc[i][j] = _mm512_setzero_ps();
    const uint16_t *base = panels + p * panel_elements;
    size_t full = k / 2;
    for (size_t t = 0; t < full; t++) {
        __m512i wv[8];
        for (int j = 0; j < NP; j++) {
            const uint16_t *row = base + j * panel_elements + t * 2 * PANEL;
            if (MR <= 2) _mm_prefetch((const char *)(row + BF16_PREFETCH_PAIRS * 2 * PANEL), _MM_HINT_T0);
            wv[j] = _mm512_loadu_si512((const void *)row);
        }
        for (int i = 0; i < MR; i++) {
            __m512i xv = broadcast_pair(x + i * ldx + 2 * t);
            for (int j = 0; j < NP; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (k & 1) {  // the last pair: x[K-1] and a zero (never the next row's first value)
        __m512i wv[8];
        for (int j = 0; j < NP; j++) wv[j] = _mm512_loadu_si512((const void *)(base + j * panel_elements + full * 2 * PANEL));
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_set1_epi32((int)x[i * ldx + k - 1]);
            for (int j = 0; j < NP; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    for (int j = 0; j < NP; j++) {
        size_t column = (p + j) * PANEL;
        if (column >= n_end) break;
        __mmask16 mask = n_end - column >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << (n_end - column)) - 1);
        for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(y + i * ldy + column, mask, acc[i][j]);
    }
}

/// Rows `0..<MR` against panels `p_begin..<p_end`, `NP` at a time (the rest one by one).
DL_BF16 void rows_bf16(const int MR, const int NP, const uint16_t *x, size_t ldx, const uint16_t *panels, size_t panel_elements,
                       size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    size_t p = p_begin;
    for (; p + NP <= p_end; p += NP) tile_bf16(MR, NP, x, ldx, panels, panel_elements, k, p, n_end, y, ldy);
    for (; p < p_end; p++) tile_bf16(MR, 1, x, ldx, panels, panel_elements, k, p, n_end, y, ldy);
}

/// One or two rows run against 8 panels (8 weight streams in flight: decode), 3 to 6 rows against
/// 4, 7 to 12 against 2, 13 and 14 against 2: at most 28 accumulators, in registers.
DL_BF16_FN void rows_bf16_dispatch(size_t rows, const uint16_t *x, size_t ldx, const uint16_t *panels, size_t panel_elements,
                                   size_t k, size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    switch (rows) {
#define DL_CASE(R, NP) case R: rows_bf16(R, NP, x, ldx, panels, panel_elements, k, p_begin, p_end, n_end, y, ldy); break;
    DL_CASE(14, 2) DL_CASE(13, 2) DL_CASE(12, 2) DL_CASE(11, 2) DL_CASE(10, 2) DL_CASE(9, 2) DL_CASE(8, 3) DL_CASE(7, 3)
    DL_CASE(6, 4) DL_CASE(5, 4) DL_CASE(4, 4) DL_CASE(3, 4) DL_CASE(2, 8)
    default: rows_bf16(1, 8, x, ldx, panels, panel_elements, k, p_begin, p_end, n_end, y, ldy); break;
#undef DL_CASE
    }
}

/// The columns in chunks of panels that stay in L2 while every tile of 14 rows passes over them.
static void bf16_panels_tiled(const uint16_t *x, size_t ldx, size_t m, const uint16_t *panels, size_t k, size_t n_begin,
                              size_t n_end, float *y, size_t ldy) {
    enum { TILE_ROWS = 14 };
    size_t panel_elements = PANEL * padded_k(k);
    size_t chunk = (512u << 10) / (panel_elements * 2);
    chunk = chunk < 8 ? 8 : chunk;
    size_t p_end = (n_end + PANEL - 1) / PANEL;
    for (size_t p0 = n_begin / PANEL; p0 < p_end; p0 += chunk) {
        size_t p1 = p0 + chunk < p_end ? p0 + chunk : p_end;
        for (size_t r = 0; r < m;) {
            size_t rows = m - r < TILE_ROWS ? m - r : TILE_ROWS;
            rows_bf16_dispatch(rows, x + r * ldx, ldx, panels, panel_elements, k, p0, p1, n_end, y + r * ldy, ldy);
            r += rows;
        }
    }
}
#endif

void dl_gemm_bf16_panels(int path, const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin,
                         size_t n_end, float *y, size_t ldy) {
    if (m == 0 || n_end <= n_begin) return;
#ifdef DL_X86
    if (path == DL_PATH_AVX512_BF16 && dl_kernel_path_available(DL_PATH_AVX512_BF16)) {
        bf16_panels_tiled(x, ldx, m, panels, k, n_begin, n_end, y, ldy);
        return;
    }
#endif
    bf16_panels_scalar(x, ldx, m, panels, k, n_begin, n_end, y, ldy);
}
