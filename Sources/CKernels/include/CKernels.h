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

/// The CPU paths of the matrix product. Every path computes the same bits (see gemm.c).
enum { DL_PATH_SCALAR = 1, DL_PATH_AVX2 = 2, DL_PATH_AVX512 = 3 };

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

/// `out[d] = Σ_j p[j] · v[j, d]` for `d` in `0..<width`, `j` in `0..<count` (`v` rows `ldv` apart):
/// attention's weighted sum of values for one query. Each element adds its terms in increasing
/// `j` with fused multiply-adds from +0, the same bits on every path.
void dl_weighted_sum(int path, const float *p, size_t count, const float *v, size_t ldv, size_t width, float *out);

/// Whether this CPU has AVX512-BF16 (`vdpbf16ps`), which `dl_gemm_bf16` uses on the AVX-512 path.
int dl_kernel_bf16_available(void);

/// bf16 compute: as `dl_gemm` with `x` already rounded to bf16 (`[m, k]`, row stride `ldx`),
/// weights rounded to bf16 on the fly (exact for bf16 weights), products summed in f32 in pairs
/// as `vdpbf16ps` does (see gemm.c). Every path computes the same bits; paths other than AVX-512
/// with AVX512-BF16 run the plain scalar emulation.
void dl_gemm_bf16(int path, int weight_type, const uint16_t *x, size_t ldx, size_t m, const void *w, size_t k,
                  size_t n_begin, size_t n_end, float *y, size_t ldy, size_t row_block);

#endif
