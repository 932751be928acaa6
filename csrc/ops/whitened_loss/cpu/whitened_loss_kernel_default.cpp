// Baseline-ISA copy of the whitened-loss CPU kernel (see cpu_capability.h).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "whitened_loss_kernel.h"
