// CPU feature probes and switches (see runtime.h).
#include "cpu/runtime.h"

#include <cstdlib>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define VQK_RT_X86 1
#else
#define VQK_RT_X86 0
#endif

namespace vqkernels {
namespace cpu {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

bool hw_avx512() {
#if VQK_RT_X86 && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool hw_avx512_vnni() {
#if VQK_RT_X86 && defined(__GNUC__)
  static const bool ok = hw_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

bool hw_avx512_bf16() {
#if VQK_RT_X86 && defined(__GNUC__)
  static const bool ok = hw_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool hw_amx_bf16() {
#if VQK_RT_X86 && defined(__GNUC__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return hw_avx512() && ((d >> 22) & 1u) != 0;  // CPUID.(7,0):EDX[22] AMX-BF16
  }();
  return ok;
#else
  return false;
#endif
}

bf16_gemm_fn mkl_bf16_gemm() {
  static const bf16_gemm_fn f = [] {
    bf16_gemm_fn r = nullptr;
#if defined(__linux__) || defined(__APPLE__)
    // MKL's, in the process when torch links MKL (x86 builds); its thread switch exists with it (the name
    // alone could be another BLAS's). VQKERNELS_CPU_NO_MKL=1 (read once) hides it, as for sgemm.
    if (!env_flag("VQKERNELS_CPU_NO_MKL") && dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"))
      r = reinterpret_cast<bf16_gemm_fn>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
#endif
    return r;
  }();
  return f;
}

bool has_avx512() { return hw_avx512() && !env_flag("VQKERNELS_CPU_NO_AVX512"); }
bool has_avx512_vnni() { return hw_avx512_vnni() && has_avx512() && !env_flag("VQKERNELS_CPU_NO_VNNI"); }
bool has_avx512_bf16() { return hw_avx512_bf16() && has_avx512() && !env_flag("VQKERNELS_CPU_NO_BF16DP"); }
bool has_amx_bf16() { return hw_amx_bf16() && has_avx512() && !env_flag("VQKERNELS_CPU_NO_AMX"); }

}  // namespace cpu
}  // namespace vqkernels
