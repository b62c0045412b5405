// bf16 products on Intel AMX (`tdpbf16ps`): the bf16 precision's path where the CPU has AMX-BF16
// and the kernel grants the process its tile data (Linux: arch_prctl ARCH_REQ_XCOMP_PERM).
//
// Layout: the bf16 panels of bf16_panels.c, `[Kp / 2][16][2]` per 16 columns (Kp = K rounded up
// to 32), which is the layout of an AMX B tile (16 pairs of rows by 16 columns).
//
// Arithmetic: each output element accumulates, in increasing K-tiles of 32, the tile's 32
// products as `tdpbf16ps` adds them into an f32 accumulator (bf16 subnormal inputs read as zero,
// subnormal results flushed, round to nearest even; its internal order of additions is the
// hardware's). A row's result depends on its own activations, the weights and K only: never on
// the other rows of the tile or call, the thread count or the tiling, so batches stay invariant.
// It is not bit-identical to the `vdpbf16ps` path and its plain twin; tests hold it to the exact
// product within bf16 rounding, and to row and thread invariance bit for bit.
#include "simd.h"
#include <stdlib.h>
#include <string.h>

#if defined(DL_X86) && defined(__linux__)
#define DL_AMX 1
#endif

enum { PANEL = 16, KTILE = 32 };

static inline size_t padded_k(size_t k) { return (k + KTILE - 1) / KTILE * KTILE; }

#ifdef DL_AMX
/// The tile configuration (palette 1): tiles 0-3 accumulators (C[row tile][panel]), 4-5 the row
/// tiles of activations (A), 6-7 the panels' K-tiles (B).
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} dl_tile_config;

#define DL_AMX_FN __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw"))) static

/// Configures row tile 0 with `rows0` rows and row tile 1 with `rows1` (0: unused).
DL_AMX_FN void configure(size_t rows0, size_t rows1) {
    dl_tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    size_t rows[2] = {rows0, rows1};
    for (int i = 0; i < 2; i++) {
        size_t r = rows[i] ? rows[i] : 1;
        config.rows[2 * i] = config.rows[2 * i + 1] = (uint8_t)r;  // C[i][0], C[i][1]
        config.colsb[2 * i] = config.colsb[2 * i + 1] = 64;
        config.rows[4 + i] = (uint8_t)r;  // A[i]
        config.colsb[4 + i] = 64;
        config.rows[6 + i] = 16;  // B[i]: 16 pairs of k
        config.colsb[6 + i] = 64;
    }
    _tile_loadconfig(&config);
}

/// Stores accumulator tile `tile` (`rows` x 16 f32) to columns `column..<min(column + 16, n_end)`.
#define DL_STORE(tile, y, ldy, rows, column, n_end, scratch)                                            \
    do {                                                                                                 \
        if ((column) + PANEL <= (n_end)) {                                                               \
            _tile_stored(tile, (y) + (column), (ldy) * sizeof(float));                                 \
        } else {                                                                                         \
            _tile_stored(tile, scratch, PANEL * sizeof(float));                                         \
            for (size_t i_ = 0; i_ < (rows); i_++)                                                       \
                memcpy((y) + i_ * (ldy) + (column), (scratch) + i_ * PANEL, ((n_end) - (column)) * sizeof(float)); \
        }                                                                                                \
    } while (0)

/// Rows `0..<m` (at most 32) against panels `p_begin..<p_end`. `tail` holds the last K-tile of
/// each row zero-padded (`[32][32]` bf16) when K is not a multiple of 32.
DL_AMX_FN void row_block(const uint16_t *x, size_t ldx, size_t m, const uint16_t *tail, const uint16_t *panels, size_t k,
                         size_t p_begin, size_t p_end, size_t n_end, float *y, size_t ldy) {
    size_t rows0 = m < 16 ? m : 16, rows1 = m > 16 ? m - 16 : 0;
    size_t kp = padded_k(k), tiles = kp / KTILE, full = k / KTILE;
    size_t panel_elements = PANEL * kp;
    float scratch[16 * PANEL];
    for (size_t p = p_begin; p < p_end; p += 2) {
        int two = p + 1 < p_end;
        const uint16_t *b0 = panels + p * panel_elements, *b1 = b0 + panel_elements;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (size_t t = 0; t < tiles; t++) {
            const uint16_t *a0 = t < full ? x + t * KTILE : tail;
            size_t stride = t < full ? ldx * 2 : KTILE * 2;
            _tile_loadd(4, a0, stride);
            if (rows1) _tile_loadd(5, a0 + 16 * (t < full ? ldx : KTILE), stride);
            _tile_loadd(6, b0 + t * KTILE * PANEL, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (rows1) _tile_dpbf16ps(2, 5, 6);
            if (two) {
                _tile_loadd(7, b1 + t * KTILE * PANEL, 64);
                _tile_dpbf16ps(1, 4, 7);
                if (rows1) _tile_dpbf16ps(3, 5, 7);
            }
        }
        size_t column = p * PANEL;
        DL_STORE(0, y, ldy, rows0, column, n_end, scratch);
        if (two) DL_STORE(1, y, ldy, rows0, column + PANEL, n_end, scratch);
        if (rows1) {
            DL_STORE(2, y + 16 * ldy, ldy, rows1, column, n_end, scratch);
            if (two) DL_STORE(3, y + 16 * ldy, ldy, rows1, column + PANEL, n_end, scratch);
        }
    }
}

DL_AMX_FN void gemm_amx(const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin, size_t n_end,
                        float *y, size_t ldy) {
    size_t kp = padded_k(k), full = k / KTILE;
    size_t panel_bytes = PANEL * kp * 2;
    size_t chunk = (512u << 10) / panel_bytes;
    chunk = chunk < 2 ? 2 : chunk & ~(size_t)1;
    size_t p_end = (n_end + PANEL - 1) / PANEL;
    uint16_t tail[32 * KTILE];
    size_t configured0 = 0, configured1 = 0;
    // Columns in chunks that stay in L2 while every block of 32 rows passes over them.
    for (size_t p0 = n_begin / PANEL; p0 < p_end; p0 += chunk) {
        size_t p1 = p0 + chunk < p_end ? p0 + chunk : p_end;
        for (size_t r = 0; r < m; r += 32) {
            size_t rows = m - r < 32 ? m - r : 32;
            size_t rows0 = rows < 16 ? rows : 16, rows1 = rows > 16 ? rows - 16 : 0;
            if (rows0 != configured0 || rows1 != configured1) {
                configure(rows0, rows1);
                configured0 = rows0, configured1 = rows1;
            }
            if (kp != k) {
                memset(tail, 0, sizeof tail);
                for (size_t i = 0; i < rows; i++) memcpy(tail + i * KTILE, x + (r + i) * ldx + full * KTILE, (k - full * KTILE) * 2);
            }
            row_block(x + r * ldx, ldx, rows, tail, panels, k, p0, p1, n_end, y + r * ldy, ldy);
        }
    }
    _tile_release();
}

void dl_gemm_amx(const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin, size_t n_end, float *y,
                 size_t ldy) {
    if (m == 0 || n_end <= n_begin) return;
    gemm_amx(x, ldx, m, panels, k, n_begin, n_end, y, ldy);
}
#else
void dl_gemm_amx(const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin, size_t n_end, float *y,
                 size_t ldy) {
    (void)x, (void)ldx, (void)m, (void)panels, (void)k, (void)n_begin, (void)n_end, (void)y, (void)ldy;
}
#endif
