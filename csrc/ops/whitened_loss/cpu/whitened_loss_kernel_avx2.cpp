// AVX2 + FMA copy of the whitened-loss CPU kernel; setup.py compiles *_avx2.cpp with -mavx2 -mfma -mf16c on x86-64
// and the op only calls it when the CPU has AVX2 (see cpu_capability.h).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "whitened_loss_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (setup.py adds them)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "whitened_loss_kernel.h"
