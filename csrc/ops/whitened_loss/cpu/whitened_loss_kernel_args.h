// Plain arguments of the whitened-loss CPU row kernel, shared by the op (whitened_loss_cpu.cpp) and the
// per-instruction-set kernel copies. No ATen types here: the kernel copies see only raw pointers.
#pragma once

#include <cstdint>

namespace kdforge::cpu {

enum class WhitenedDtype { Float, BFloat16, Half, Double };

struct WhitenedRowsArgs {
  const void* student;   // [R, D] contiguous, dtype
  const void* teacher;   // [R, D] contiguous, dtype
  void* grad;            // [n, D] contiguous, dtype: grad_scale * dl/dd of selected row i at row i
  const int64_t* index;  // [n] rows of the selection, or nullptr for all R rows (n = R)
  void* row_loss;        // [n] unscaled loss sum of selected row i: float (double for double inputs)
  int64_t dim;           // D
  double beta;
  double eps;
  double grad_scale;     // 1 / (n * D) for "mean", 1 for "sum" and "none"
  bool whiten;
  bool smooth_l1;        // false: mse
  WhitenedDtype dtype;
};

void whitened_loss_rows_DEFAULT(const WhitenedRowsArgs& a, int64_t begin, int64_t end);
void whitened_loss_rows_AVX2(const WhitenedRowsArgs& a, int64_t begin, int64_t end);

}  // namespace kdforge::cpu
