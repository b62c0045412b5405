// Element-wise dtype conversion: the only hot loops that the Swift compiler, which targets
// baseline x86-64, cannot vectorise well (no F16C). Each has a scalar path used as fallback.
#include "simd.h"
#include <string.h>

static float half_to_float_scalar(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1f;
    uint32_t mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exponent = 127 - 15 + 1;
            while ((mantissa & 0x400) == 0) { mantissa <<= 1; exponent--; }
            mantissa &= 0x3ff;
            bits = sign | (exponent << 23) | (mantissa << 13);
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static uint16_t float_to_half_scalar(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000;
    uint32_t exponent = (bits >> 23) & 0xff;
    uint32_t mantissa = bits & 0x7fffff;
    if (exponent == 0xff) return (uint16_t)(sign | 0x7c00 | (mantissa ? 0x200 : 0));
    int32_t e = (int32_t)exponent - 127 + 15;
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        mantissa |= 0x800000;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half_mantissa = mantissa >> shift;
        uint32_t remainder = mantissa & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (remainder > halfway || (remainder == halfway && (half_mantissa & 1))) half_mantissa++;
        return (uint16_t)(sign | half_mantissa);
    }
    uint32_t half = sign | ((uint32_t)e << 10) | (mantissa >> 13);
    uint32_t remainder = mantissa & 0x1fff;
    if (remainder > 0x1000 || (remainder == 0x1000 && (half & 1))) half++;
    return (uint16_t)half;
}

#ifdef DL_X86
__attribute__((target("avx,f16c")))
static void widen_f16_f16c(const uint16_t *source, float *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m128i halves = _mm_loadu_si128((const __m128i *)(source + i));
        _mm256_storeu_ps(destination + i, _mm256_cvtph_ps(halves));
    }
    for (; i < count; i++) destination[i] = half_to_float_scalar(source[i]);
}

__attribute__((target("avx,f16c")))
static void narrow_f16_f16c(const float *source, uint16_t *destination, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m128i halves = _mm256_cvtps_ph(_mm256_loadu_ps(source + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(destination + i), halves);
    }
    for (; i < count; i++) destination[i] = float_to_half_scalar(source[i]);
}

#endif

void dl_widen_f16(const uint16_t *source, float *destination, size_t count) {
#ifdef DL_X86
    if (dl_cpu_has_f16c()) { widen_f16_f16c(source, destination, count); return; }
#endif
    for (size_t i = 0; i < count; i++) destination[i] = half_to_float_scalar(source[i]);
}

void dl_narrow_f16(const float *source, uint16_t *destination, size_t count) {
#ifdef DL_X86
    if (dl_cpu_has_f16c()) { narrow_f16_f16c(source, destination, count); return; }
#endif
    for (size_t i = 0; i < count; i++) destination[i] = float_to_half_scalar(source[i]);
}

void dl_widen_bf16(const uint16_t *source, float *destination, size_t count) {
    uint32_t *out = (uint32_t *)destination;
    for (size_t i = 0; i < count; i++) out[i] = (uint32_t)source[i] << 16;
}

/// Round to nearest even; a NaN stays a (quiet) NaN.
#define DL_NARROW_BF16_LOOP                                                                                  \
    const uint32_t *in = (const uint32_t *)source;                                                          \
    for (size_t i = 0; i < count; i++) {                                                                    \
        uint32_t bits = in[i];                                                                              \
        uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;                                      \
        destination[i] = (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40 : rounded);   \
    }

#ifdef DL_X86
/// The same loop, vectorised by the compiler for AVX-512 (activations are rounded before every
/// bf16 product, and weights when they are packed).
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void narrow_bf16_avx512(const float *source, uint16_t *destination,
                                                                                     size_t count) {
    DL_NARROW_BF16_LOOP
}
#endif

void dl_narrow_bf16(const float *source, uint16_t *destination, size_t count) {
#ifdef DL_X86
    if (dl_cpu_has_avx512bw()) {
        narrow_bf16_avx512(source, destination, count);
        return;
    }
#endif
    DL_NARROW_BF16_LOOP
}
