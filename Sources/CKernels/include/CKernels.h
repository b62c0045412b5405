#ifndef DLLAVA_CKERNELS_H
#define DLLAVA_CKERNELS_H

#include <stddef.h>
#include <stdint.h>

/// Widens `count` IEEE half-precision values to single precision.
/// Uses F16C when the CPU has it (checked once at run time), else a scalar loop.
void dl_widen_f16(const uint16_t *source, float *destination, size_t count);

/// Widens `count` bfloat16 values to single precision (exact: a 16-bit shift).
void dl_widen_bf16(const uint16_t *source, float *destination, size_t count);

/// Narrows `count` floats to IEEE half precision, round-to-nearest-even.
void dl_narrow_f16(const float *source, uint16_t *destination, size_t count);

/// Narrows `count` floats to bfloat16, round-to-nearest-even (NaN stays NaN).
void dl_narrow_bf16(const float *source, uint16_t *destination, size_t count);

/// How a weight matrix's elements are stored.
enum { DL_WEIGHT_F32 = 0, DL_WEIGHT_F16 = 1, DL_WEIGHT_BF16 = 2 };

/// The CPU paths of the matrix product. Every path computes the same bits (see f32_rows.c).
/// `DL_PATH_AVX512_BF16` is AVX-512 with AVX512-BF16: the f32 kernels run as on `DL_PATH_AVX512`,
/// the bf16 products on `vdpbf16ps` (bf16_panels.c).
enum { DL_PATH_SCALAR = 1, DL_PATH_AVX2 = 2, DL_PATH_AVX512 = 3, DL_PATH_AVX512_BF16 = 4 };

/// Whether this CPU can run `path` (CPUID, checked at run time).
int dl_kernel_path_available(int path);

/// The fastest path this CPU can run.
int dl_kernel_path_best(void);

/// `y[r, n] = Σ_k x[r, k] · w[n, k]` for rows `0..<m` and columns `n_begin..<n_end`.
/// `x` is `[m, k]` f32 with row stride `ldx`; `w` is `[N, k]` in `weight_type` with row stride `ldw`;
/// `y` has row stride `ldy` (only the given columns are written). Each element is summed in a
/// fixed order that depends on `k` alone, so a row's result is the same whatever rows, columns,
/// `row_block` (rows whose activations are kept in cache together) or path the call uses.
void dl_gemm(int path, int weight_type, const float *x, size_t ldx, size_t m, const void *w, size_t k, size_t ldw,
             size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block);

/// Bytes of a `[n, k]` weight of `weight_type` packed into panels of 16 columns (see f32_panels.c).
size_t dl_panel_bytes(int weight_type, size_t n, size_t k);

/// Packs panels `panel_begin..<panel_end` of the weight `w` (`[n, k]`, row stride `ldw`, in
/// `weight_type`, kept as stored) into `panels`: panel p holds columns `16p..<16p + 16` as
/// `[k][16]`, columns past `n` zero.
void dl_pack_panels(int weight_type, const void *w, size_t ldw, size_t n, size_t k, void *panels, size_t panel_begin,
                    size_t panel_end);

/// Packs the weight whose element (n, k) is `v[k · ldv + n]` (a `[k, n]` matrix read by columns,
/// such as attention's values, in `weight_type`, kept as stored) into panels, as `dl_pack_panels`
/// packs `[n, k]`: a copy of 16-column strips.
void dl_pack_panels_from_columns(int weight_type, const void *v, size_t ldv, size_t n, size_t k, void *panels);

/// `y[r, n] = Σ_k x[r, k] · w[n, k]` for rows `0..<m` and columns `n_begin..<n_end` (`n_begin` a
/// multiple of 16) from the packed `panels` of `w`. Each element is one chain of fused
/// multiply-adds in increasing k from +0 on every path, so a row's result is the same whatever
/// rows, columns, thread count or path the call uses.
void dl_gemm_panels(int path, int weight_type, const float *x, size_t ldx, size_t m, const void *panels, size_t k,
                    size_t n_begin, size_t n_end, float *y, size_t ldy);

/// `out[d] = Σ_j p[j] · v[j, d]` for `d` in `0..<width`, `j` in `0..<count` (`v` rows `ldv` apart,
/// f32 or bf16 as `value_type` says, widened exactly): attention's weighted sum of values for one
/// query. Each element adds its terms in increasing `j` with fused multiply-adds from +0, the
/// same bits on every path.
void dl_weighted_sum(int path, const float *p, size_t count, int value_type, const void *v, size_t ldv, size_t width,
                     float *out);

/// Softmax of `count` values in place (attention's rows): one exp polynomial and one order of
/// additions on every path (see softmax.c); a row of -infinity becomes zeros, a NaN spreads.
void dl_softmax(int path, float *x, size_t count);

/// In place, `x[i] = x[i] · sigmoid(a · x[i])`, then times `up[i]` when `up` is not NULL: SiLU
/// (a = 1, LLaMA's gate with `up`) and CLIP's quick GELU (a = 1.702). The exp of `dl_softmax` and
/// one order of operations on every path, so the bits never depend on the path (see softmax.c).
void dl_sigmoid_weighted(int path, float *x, const float *up, size_t count, float a);

/// 8-bit weights (q8_0 layout, as llama.cpp's): each weight row is split into blocks of 32
/// along K (the last block padded with zeros); a block holds 32 signed 8-bit values in
/// -127...127 and one f16 scale, its value `scale · q`. Quants are `[N, blocks · 32]` int8, scales
/// `[N, blocks]` f16, both row-major. See q8.c for the arithmetic.
enum { DL_Q8_BLOCK = 32 };

/// Bytes of one row of activations quantized by `dl_quantize_activations_q8` for a `k`-wide input.
size_t dl_q8_activation_row_bytes(size_t k);

/// Quantizes rows `x` (`[m, k]` f32, row stride `ldx`) into `out` (`m` records of
/// `dl_q8_activation_row_bytes(k)` bytes): per block of 32, scale `d = amax / 127` (f32) and
/// `q = round-to-nearest-even(x · (127 / amax))` clamped to -127...127. A block whose largest
/// magnitude is below 2^-100 is all zeros with scale 0; a block holding NaN or infinity has
/// zeros and scale NaN, so the row's results are NaN. Plain scalar code shared by every path.
void dl_quantize_activations_q8(const float *x, size_t ldx, size_t m, size_t k, void *out);

/// Quantizes weight rows `w` (`[rows, k]` f32) into `quants` (`[rows, blocks · 32]`) and
/// `scales` (`[rows, blocks]` f16): per block `d = f16(amax / 127)` (nearest even), then
/// `q = round-to-nearest-even(w / d)` clamped to -127...127 (`q = 0` where `d == 0`).
/// Returns the index of the first element that is not finite or whose block's scale overflows
/// f16, or -1 when all is well.
long dl_quantize_weights_q8(const float *w, size_t rows, size_t k, int8_t *quants, uint16_t *scales);

/// The index of the first quant equal to -128 (outside the format's range), or -1.
long dl_q8_find_invalid_quant(const int8_t *quants, size_t count);

/// Whether this CPU has AVX-512 VNNI (`vpdpbusd`), which `dl_gemm_q8` uses on the AVX-512 path.
int dl_kernel_q8_vnni_available(void);

/// 8-bit product: `y[r, n] = Σ_k x[r, k] · w[n, k]` with `x` quantized by
/// `dl_quantize_activations_q8` (`m` records) and `w` in q8_0 (`quants`, `scales`, `k` the
/// unpadded width), for columns `n_begin..<n_end`. Per block, groups of 4 products are summed
/// exactly in int32, then scaled and added in f32 in one fixed order (q8.c), the same bits on
/// every path and for any rows, columns, `row_block` or thread count. The AVX-512 path uses
/// VNNI where the CPU has it, else the AVX2 kernel.
void dl_gemm_q8(int path, const void *activations, size_t m, const int8_t *quants, const uint16_t *scales, size_t k,
                size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block);

/// Whether this CPU has AMX-BF16 and the OS grants this process tile data (requested once).
int dl_kernel_amx_available(void);

/// Whether the CPU's vendor is AMD (CPUID leaf 0). AMD's Zen 4 and 5 run `vdpbf16ps` (64 FLOPs an
/// instruction) at the rate of an f32 FMA (32 FLOPs); the Intel Xeons measured without AMX run it at
/// half that rate, where bf16 products are slower than f32 ones (docs/PERFORMANCE.md).
int dl_cpu_is_amd(void);

/// Bytes of a `[n, k]` weight packed by `dl_pack_panels_bf16`.
size_t dl_panel_bytes_bf16(size_t n, size_t k);

/// Packs panels `panel_begin..<panel_end` of `w` (`[n, k]`, row stride `ldw`) rounded to bf16 into
/// AMX B-tile order: panel p is `[Kp / 2][16][2]` (Kp = k rounded up to 32), zeros past `n` and `k`.
void dl_pack_panels_bf16(int weight_type, const void *w, size_t ldw, size_t n, size_t k, void *panels, size_t panel_begin,
                         size_t panel_end);

/// Packs the weight whose element (n, k) is `v[k · ldv + n]` (a `[k, n]` matrix read by columns,
/// such as attention's values, in `weight_type`) as `dl_pack_panels_bf16` packs `[n, k]`.
void dl_pack_panels_bf16_from_columns(int weight_type, const void *v, size_t ldv, size_t n, size_t k, void *panels);

/// bf16 product: `y[r, n] = Σ_k x[r, k] · w[n, k]` for rows `0..<m` of `x` (rounded to bf16,
/// `[m, k]`, row stride `ldx`) and columns `n_begin..<n_end` (`n_begin` a multiple of 16) from the
/// `dl_pack_panels_bf16` panels of `w`. Each element is one chain over the pairs of k in increasing
/// order, each pair added as `vdpbf16ps` adds it (see bf16_panels.c); `DL_PATH_AVX512_BF16` runs
/// that instruction, every other path a plain twin with the same bits. A row's result is the same
/// whatever rows, columns, thread count or path the call uses.
void dl_gemm_bf16_panels(int path, const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin,
                         size_t n_end, float *y, size_t ldy);

/// bf16 product on AMX: `y[r, n]` for rows `0..<m` of `x` (bf16, `[m, k]`, row stride `ldx`) and
/// columns `n_begin..<n_end` (`n_begin` a multiple of 16) from `dl_pack_panels_bf16` panels.
/// Each element accumulates K-tiles of 32 in increasing order with `tdpbf16ps`, so a row's result
/// never depends on the other rows, the columns or the thread count (see bf16_amx.c). Call only when
/// `dl_kernel_amx_available()`.
void dl_gemm_amx(const uint16_t *x, size_t ldx, size_t m, const void *panels, size_t k, size_t n_begin, size_t n_end, float *y,
                 size_t ldy);

/// The instructions whose register-only peak `dl_ceiling_loop` measures: AVX-512 f32 FMA
/// (32 flops each), AVX512-BF16 `vdpbf16ps` (64 flops) and AVX512-VNNI `vpdpbusd` (128 integer ops).
enum { DL_CEILING_FMA = 1, DL_CEILING_BF16 = 2, DL_CEILING_VNNI = 3 };

/// Runs `iterations` rounds of 12 independent `instruction`s on registers only (see ceilings.c)
/// and returns the operations done, or 0 when this CPU lacks the instruction. Time it per thread.
double dl_ceiling_loop(int instruction, size_t iterations);

/// Reads `bytes` of `buffer` once with wide loads (a multiple of 256 bytes is read in full) and
/// returns a sum of them: a STREAM-like read for the memory bandwidth ceiling.
uint64_t dl_ceiling_read(const void *buffer, size_t bytes);

/// Makes glibc keep freed memory for reuse: no `mmap` for large allocations and no trimming below
/// 2 GB of free heap (see `AllocatorTuning`); nothing elsewhere.
void dl_reuse_freed_memory(void);

#endif
