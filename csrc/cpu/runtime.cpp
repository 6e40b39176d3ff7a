// CPU feature probes and switches (see runtime.h).
#include "cpu/runtime.h"

#include <cstdlib>

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

bool has_avx512() { return hw_avx512() && !env_flag("VQKERNELS_CPU_NO_AVX512"); }
bool has_avx512_vnni() { return hw_avx512_vnni() && has_avx512() && !env_flag("VQKERNELS_CPU_NO_VNNI"); }
bool has_avx512_bf16() { return hw_avx512_bf16() && has_avx512() && !env_flag("VQKERNELS_CPU_NO_BF16DP"); }

}  // namespace cpu
}  // namespace vqkernels
