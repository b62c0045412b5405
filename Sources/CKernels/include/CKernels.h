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

#endif
