// Attention's softmax over one row, `x[i] = exp(x[i] - max) / Σ exp(x[j] - max)`, with one exp
// and one order of additions on every path (so a row's bits never depend on the path):
// - exp(t) for t = x - max <= 0: n = rint(t · log2(e)), r = t - n · ln2 (two fused steps, ln2
//   split in a high and a low part), p = the degree-6 Taylor polynomial of e^r by Horner's rule
//   with fused multiply-adds, then p · 2^n by adding n to the exponent (n >= -124, so the result
//   stays normal); t < -86 gives 0 (e^-86 is within 2^-122 of the row's largest term, 1);
// - the sum: lane j of 16 adds the terms i = j, j + 16, ... in increasing i from +0, then the
//   lanes are added in the fixed tree of scalar.h (s8, s4, then (s4[0] + s4[2]) + (s4[1] + s4[3]));
// - each term is multiplied by 1 / sum.
// A row whose values are all -infinity (fully masked) becomes zeros; a row holding a NaN, NaNs.
//
// The same exp serves the sigmoid-weighted activations (`dl_sigmoid_weighted`): with
// e = exp(-a·|x|) (an argument <= 0), sigmoid(a·x) = 1 / (1 + e) for x >= 0 and e / (1 + e)
// below, so nothing overflows; y = x · sigmoid(a·x), times `up` when given, in that order.
#include "simd.h"
#include <math.h>
#include <string.h>

static const float LOG2E = 1.44269504088896341f, LN2_HIGH = 0.693359375f, LN2_LOW = -2.12194440e-4f;
static const float C6 = 1.0f / 720, C5 = 1.0f / 120, C4 = 1.0f / 24, C3 = 1.0f / 6, C2 = 0.5f, C1 = 1.0f, C0 = 1.0f;
static const float UNDERFLOW = -86.0f;

static inline float exp_scalar(float t) {
    if (t < UNDERFLOW) return 0;
    float n = rintf(t * LOG2E);
    float r = fmaf(n, -LN2_HIGH, t);
    r = fmaf(n, -LN2_LOW, r);
    float p = C6;
    p = fmaf(p, r, C5);
    p = fmaf(p, r, C4);
    p = fmaf(p, r, C3);
    p = fmaf(p, r, C2);
    p = fmaf(p, r, C1);
    p = fmaf(p, r, C0);
    uint32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (uint32_t)((int32_t)n << 23);
    memcpy(&p, &bits, sizeof p);
    return p;
}

static void softmax_scalar(float *x, size_t count, float maximum) {
    float lanes[16] = {0};
    for (size_t i = 0; i < count; i++) {
        x[i] = exp_scalar(x[i] - maximum);
        lanes[i & 15] += x[i];
    }
    float inverse = 1 / reduce_lanes16(lanes);
    for (size_t i = 0; i < count; i++) x[i] *= inverse;
}

static inline float sigmoid_weighted_scalar(float x, float a) {
    if (isnan(x)) return x;
    float e = exp_scalar(-a * fabsf(x));
    float sigmoid = x >= 0 ? 1 / (1 + e) : e / (1 + e);
    return x * sigmoid;
}

#ifdef DL_X86

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), always_inline)) static inline __m512 exp512(__m512 t) {
    __mmask16 underflow = _mm512_cmp_ps_mask(t, _mm512_set1_ps(UNDERFLOW), _CMP_LT_OQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HIGH), t);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LOW), r);
    __m512 p = _mm512_set1_ps(C6);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C0));
    __m512i scaled = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
    return _mm512_maskz_mov_ps((__mmask16)~underflow, _mm512_castsi512_ps(scaled));
}

DL_AVX512_FN void softmax512(float *x, size_t count, float maximum) {
    __m512 m = _mm512_set1_ps(maximum), lanes = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= count; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
        _mm512_storeu_ps(x + i, e);
        lanes = _mm512_add_ps(lanes, e);
    }
    if (i < count) {
        __mmask16 mask = (__mmask16)((1u << (count - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i), m));
        _mm512_mask_storeu_ps(x + i, mask, e);
        lanes = _mm512_add_ps(lanes, _mm512_maskz_mov_ps(mask, e));
    }
    float spilled[16];
    _mm512_storeu_ps(spilled, lanes);
    __m512 inverse = _mm512_set1_ps(1 / reduce_lanes16(spilled));
    for (i = 0; i + 16 <= count; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inverse));
    if (i < count) {
        __mmask16 mask = (__mmask16)((1u << (count - i)) - 1);
        _mm512_mask_storeu_ps(x + i, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), inverse));
    }
}

DL_AVX512_FN void sigmoid_weighted512(float *x, const float *up, size_t count, float a) {
    __m512 minus_a = _mm512_set1_ps(-a), one = _mm512_set1_ps(1), zero = _mm512_setzero_ps();
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 mask = count - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
        __m512 e = exp512(_mm512_mul_ps(minus_a, _mm512_abs_ps(v)));
        __m512 denominator = _mm512_add_ps(one, e);
        __mmask16 negative = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
        __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, negative, e), denominator);
        __m512 y = _mm512_mul_ps(v, sigmoid);
        if (up) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mask, up + i));
        _mm512_mask_storeu_ps(x + i, mask, y);
    }
}
#endif

void dl_sigmoid_weighted(int path, float *x, const float *up, size_t count, float a) {
#ifdef DL_X86
    if (path == DL_PATH_AVX512) {
        sigmoid_weighted512(x, up, count, a);
        return;
    }
#endif
    for (size_t i = 0; i < count; i++) {
        float y = sigmoid_weighted_scalar(x[i], a);
        x[i] = up ? y * up[i] : y;
    }
}

/// The largest of `count` values, or NaN when one is NaN (the maximum is exact in any order).
static float maximum_scalar(const float *x, size_t count) {
    float maximum = -INFINITY;
    for (size_t i = 0; i < count; i++) {
        if (isnan(x[i])) return NAN;
        if (x[i] > maximum) maximum = x[i];
    }
    return maximum;
}

#ifdef DL_X86
DL_AVX512_FN float maximum512(const float *x, size_t count) {
    __m512 maximum = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (size_t i = 0; i < count; i += 16) {
        __mmask16 mask = count - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - i)) - 1);
        __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        maximum = _mm512_max_ps(maximum, v);
    }
    return nan ? NAN : _mm512_reduce_max_ps(maximum);
}
#endif

void dl_softmax(int path, float *x, size_t count) {
    if (count == 0) return;
#ifdef DL_X86
    float maximum = path == DL_PATH_AVX512 ? maximum512(x, count) : maximum_scalar(x, count);
#else
    float maximum = maximum_scalar(x, count);
#endif
    int nan = isnan(maximum);
    if (nan) {
        for (size_t i = 0; i < count; i++) x[i] = NAN;
        return;
    }
    if (maximum == -INFINITY) {
        memset(x, 0, count * sizeof(float));
        return;
    }
#ifdef DL_X86
    if (path == DL_PATH_AVX512) {
        softmax512(x, count, maximum);
        return;
    }
#endif
    softmax_scalar(x, count, maximum);
}
