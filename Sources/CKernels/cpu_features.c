// Every question about the CPU the kernels ask, answered here and nowhere else: which dispatch
// paths this CPU runs (CPUID feature bits read at run time, never the family or model, never the
// build host's), which extensions the fast paths add (AVX512-BF16, AVX512-VNNI, AMX-BF16 with the
// OS's permission for tile data) and F16C for the conversions. The vendor is asked once, for the
// default precision only (never for which instructions run).
#include "simd.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DL_LINUX_X86 1
#endif

#ifdef DL_X86
/// Whether the CPU has `feature` (a name `__builtin_cpu_supports` knows).
#define DL_HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature))
#endif

int dl_kernel_path_available(int path) {
    switch (path) {
    case DL_PATH_SCALAR: return 1;
#ifdef DL_X86
    case DL_PATH_AVX2: return DL_HAS("avx2") && DL_HAS("fma") && DL_HAS("f16c");
    case DL_PATH_AVX512:
        return DL_HAS("avx512f") && DL_HAS("avx512bw") && DL_HAS("avx512vl") && DL_HAS("avx512dq") && DL_HAS("fma") &&
               DL_HAS("f16c");
    case DL_PATH_AVX512_BF16: return dl_kernel_path_available(DL_PATH_AVX512) && DL_HAS("avx512bf16");
#endif
    default: return 0;
    }
}

int dl_kernel_path_best(void) {
    if (dl_kernel_path_available(DL_PATH_AVX512)) return DL_PATH_AVX512;
    if (dl_kernel_path_available(DL_PATH_AVX2)) return DL_PATH_AVX2;
    return DL_PATH_SCALAR;
}

int dl_kernel_q8_vnni_available(void) {
#ifdef DL_X86
    return dl_kernel_path_available(DL_PATH_AVX512) && DL_HAS("avx512vnni");
#else
    return 0;
#endif
}

int dl_cpu_has_f16c(void) {
#ifdef DL_X86
    return DL_HAS("avx") && DL_HAS("f16c");
#else
    return 0;
#endif
}

int dl_cpu_has_avx512bw(void) {
#ifdef DL_X86
    return DL_HAS("avx512f") && DL_HAS("avx512bw");
#else
    return 0;
#endif
}

int dl_cpu_is_amd(void) {
#ifdef DL_LINUX_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    // "AuthenticAMD" in EBX, EDX, ECX.
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
#else
    return 0;
#endif
}

#ifdef DL_LINUX_X86
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_state = -1;  // -1 unknown, 0 unavailable, 1 available

int dl_kernel_amx_available(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state >= 0) return state;
    unsigned a, b, c, d;
    int available = 0;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; then ask Linux for the tile data state.
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) && (d & (1u << 24)) &&
        dl_kernel_path_available(DL_PATH_AVX512))
        available = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    __atomic_store_n(&amx_state, available, __ATOMIC_RELEASE);
    return available;
}
#else
int dl_kernel_amx_available(void) { return 0; }
#endif
