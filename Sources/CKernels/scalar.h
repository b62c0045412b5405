// Scalar helpers shared by the kernels' plain paths (every kernel file); not public API.
#ifndef DLLAVA_CKERNELS_SCALAR_H
#define DLLAVA_CKERNELS_SCALAR_H

#include "CKernels.h"
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float f16_to_float(uint16_t h) {
    float f;
    dl_widen_f16(&h, &f, 1);
    return f;
}

/// Element `i` of a weight stored as `type`, widened to f32.
static inline float weight_at(int type, const void *w, size_t i) {
    switch (type) {
    case DL_WEIGHT_F32: return ((const float *)w)[i];
    case DL_WEIGHT_F16: return f16_to_float(((const uint16_t *)w)[i]);
    default: return bf16_to_float(((const uint16_t *)w)[i]);
    }
}

/// The fixed tree that adds 16 lanes: s8[i] = l[i] + l[i + 8], s4[i] = s8[i] + s8[i + 4],
/// then (s4[0] + s4[2]) + (s4[1] + s4[3]).
static inline float reduce_lanes16(const float lanes[16]) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = lanes[i] + lanes[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

#endif
