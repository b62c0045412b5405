// The machine's own ceilings, for `dllava-bench` to report every product as a fraction of them:
// register-only loops of the products' instructions (12 independent zmm accumulators, enough to
// cover the instructions' latency on two ports) and a read of a buffer much larger than the caches.
// Nothing in the engine calls them.
#include "simd.h"

#ifdef DL_X86
enum { CHAINS = 12 };

/// Sums the accumulators so that the compiler keeps every chain.
#define DL_KEEP(acc, add)                                                  \
    do {                                                                   \
        for (int c = 1; c < CHAINS; c++) acc[0] = add(acc[0], acc[c]);     \
    } while (0)

DL_AVX512_FN float fma_loop(size_t iterations) {
    __m512 acc[CHAINS], a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(0x1p-30f);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    for (size_t i = 0; i < iterations; i++) {
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(a, b, acc[c]);
        __asm__ volatile("" : "+v"(a));
    }
    DL_KEEP(acc, _mm512_add_ps);
    return _mm512_reduce_add_ps(acc[0]);
}

DL_BF16_FN float bf16_loop(size_t iterations) {
    __m512 acc[CHAINS];
    __m512i a = _mm512_set1_epi16(0x3f80), b = _mm512_set1_epi16(0x3000);  // 1 and 2^-31
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps((float)c);
    for (size_t i = 0; i < iterations; i++) {
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)a, (__m512bh)b);
        __asm__ volatile("" : "+v"(a));
    }
    DL_KEEP(acc, _mm512_add_ps);
    return _mm512_reduce_add_ps(acc[0]);
}

DL_VNNI_FN float vnni_loop(size_t iterations) {
    __m512i acc[CHAINS], a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_epi32(c);
    for (size_t i = 0; i < iterations; i++) {
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
        __asm__ volatile("" : "+v"(a));
    }
    DL_KEEP(acc, _mm512_add_epi32);
    return (float)_mm512_reduce_add_epi32(acc[0]);
}

DL_AVX512_FN uint64_t read_avx512(const void *buffer, size_t bytes) {
    const char *p = buffer;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= bytes; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void *)(p + i)));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void *)(p + i + 64)));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void *)(p + i + 128)));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
}
#endif

double dl_ceiling_loop(int instruction, size_t iterations) {
#ifdef DL_X86
    double per_instruction = 0;
    volatile float sink = 0;
    switch (instruction) {
    case DL_CEILING_FMA:
        if (!dl_kernel_path_available(DL_PATH_AVX512)) return 0;
        sink = fma_loop(iterations), per_instruction = 32;
        break;
    case DL_CEILING_BF16:
        if (!dl_kernel_path_available(DL_PATH_AVX512_BF16)) return 0;
        sink = bf16_loop(iterations), per_instruction = 64;
        break;
    case DL_CEILING_VNNI:
        if (!dl_kernel_q8_vnni_available()) return 0;
        sink = vnni_loop(iterations), per_instruction = 128;
        break;
    default: return 0;
    }
    (void)sink;
    return per_instruction * CHAINS * (double)iterations;
#else
    (void)instruction, (void)iterations;
    return 0;
#endif
}

uint64_t dl_ceiling_read(const void *buffer, size_t bytes) {
#ifdef DL_X86
    if (dl_kernel_path_available(DL_PATH_AVX512)) return read_avx512(buffer, bytes);
#endif
    const uint64_t *words = buffer;
    uint64_t sum = 0;
    for (size_t i = 0; i < bytes / 8; i++) sum += words[i];
    return sum;
}
