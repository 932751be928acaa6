// CPU kernels are compiled once per instruction set, the way ATen does it: a kernel body lives in a header that
// is included by one small translation unit per capability (`*_default.cpp` with the baseline flags, `*_avx2.cpp`
// with -mavx2 -mfma -mf16c added by setup.py on x86-64). Each copy gets its own namespace through CPU_CAPABILITY,
// which also keeps ATen's Vectorized<T> of the two builds apart (see ATen's Note [CPU_CAPABILITY namespace]).
// The op picks a copy at run time with use_avx2(), which honours ATEN_CPU_CAPABILITY like ATen's own kernels.
#pragma once

#include <ATen/Version.h>

#include <string>

#define KDFORGE_CAT_(a, b) a##_##b
#define KDFORGE_CAT(a, b) KDFORGE_CAT_(a, b)
// KDFORGE_KERNEL(name) -> name_DEFAULT or name_AVX2, depending on the translation unit including the kernel header.
#define KDFORGE_KERNEL(name) KDFORGE_CAT(name, CPU_CAPABILITY)

namespace kdforge {

// True when the AVX2 copies of the kernels were compiled in and this CPU (or ATEN_CPU_CAPABILITY) allows them.
inline bool use_avx2() {
#if defined(KDFORGE_HAVE_AVX2)
  static const bool enabled = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return enabled;
#else
  return false;
#endif
}

// "AVX2" or "DEFAULT": the kernel copy use_avx2() picks, reported by `kdforge info`.
inline const char* cpu_kernel_isa() { return use_avx2() ? "AVX2" : "DEFAULT"; }

}  // namespace kdforge
