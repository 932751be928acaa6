// kdforge::whitened_loss and kdforge::whitened_loss_backward, CPU implementations.
// The row math and its derivation are in whitened_loss_kernel.h; this file checks arguments, allocates, splits rows
// over threads with at::parallel_for and reduces the per-row losses in a fixed order (the result does not depend on
// the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../../../cpu_capability.h"
#include "../../../kdforge.h"
#include "../whitened_loss_backward.h"
#include "whitened_loss_kernel_args.h"

namespace kdforge::cpu {
namespace {

WhitenedDtype to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return WhitenedDtype::Float;
    case at::kBFloat16: return WhitenedDtype::BFloat16;
    case at::kHalf: return WhitenedDtype::Half;
    case at::kDouble: return WhitenedDtype::Double;
    default: TORCH_CHECK(false, "whitened_loss: unsupported dtype ", t);
  }
}

// Ask for transparent huge pages on a large, not yet touched output buffer. The gradient is as big as the student
// (50 MB at 16k x 768 fp32) and written once; with 4 KiB pages that is ~12k page faults, which cost more than the
// kernel itself on virtual machines. Best effort: a no-op where THP is off, on other systems, or for small buffers.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::tuple<at::Tensor, at::Tensor> whitened_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& index, c10::string_view loss,
                                                     double beta, bool whiten, double eps,
                                                     c10::string_view reduction) {
  const int64_t R = check_whitened_loss_args(student, teacher, index, beta, eps);
  const bool smooth_l1 = parse_loss(loss) == LossKind::SmoothL1;
  const Reduction red = parse_reduction(reduction);
  const bool mean = red == Reduction::Mean;
  const int64_t D = student.size(-1);

  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  at::Tensor idx;
  int64_t n = R;
  if (index.has_value()) {
    idx = index->contiguous();
    n = idx.numel();
    // Validate before the parallel loop so the message names the first bad position.
    const int64_t* p = idx.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < R, "whitened_loss: index[", i, "] = ", p[i], " is out of range for ", R,
                  " rows (student ", shape_str(student), " viewed as [", R, ", ", D, "]); indices are flat row ",
                  "positions in [0, ", R, ")");
    }
  }

  // The gradient has the student's shape when every row is used; with an index it holds the selected rows only
  // and the backward scatters it (duplicated rows add up).
  at::Tensor grad = index.has_value() ? at::empty({n, D}, s.options()) : at::empty_like(s);
  advise_huge_pages(grad);
  const at::ScalarType acc = acc_dtype(s.scalar_type());
  at::Tensor row_loss = at::empty({n}, s.options().dtype(acc));

  WhitenedRowsArgs a{};
  a.student = s.const_data_ptr();
  a.teacher = t.const_data_ptr();
  a.grad = grad.mutable_data_ptr();
  a.index = index.has_value() ? idx.const_data_ptr<int64_t>() : nullptr;
  a.row_loss = row_loss.mutable_data_ptr();
  a.dim = D;
  a.beta = beta;
  a.eps = eps;
  const double count = static_cast<double>(n) * static_cast<double>(D);
  a.grad_scale = mean && n > 0 ? 1.0 / count : 1.0;
  a.whiten = whiten;
  a.smooth_l1 = smooth_l1;
  a.dtype = to_kernel_dtype(s.scalar_type());

  auto* rows_fn = &whitened_loss_rows_DEFAULT;
#if defined(KDFORGE_HAVE_AVX2)
  if (use_avx2()) rows_fn = &whitened_loss_rows_AVX2;
#endif
  // ~32k elements per task: big enough to amortise the task, small enough to balance 2..64 threads.
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { rows_fn(a, begin, end); });

  if (red == Reduction::None) return {row_loss, grad};
  // Fixed-order double sum of the row losses: the result does not depend on the thread count.
  double total = 0.0;
  if (acc == at::kDouble) {
    const double* rl = row_loss.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) total += rl[i];
  } else {
    const float* rl = row_loss.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) total += rl[i];
  }
  // An empty selection (a batch with no masked patch) gives 0 for "mean", not 0/0.
  const double value = mean ? (n > 0 ? total / count : 0.0) : total;
  return {at::scalar_tensor(value, s.options().dtype(acc)), grad};
}

// grad_student = grad_loss * dS, scattered to the selected rows when an index was given (whitened_loss_backward.h).
at::Tensor whitened_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_rows,
                                      const std::optional<at::Tensor>& index, c10::SymIntArrayRef student_shape) {
  return whitened_loss_grad_student(grad_loss, grad_rows, index, C10_AS_INTARRAYREF_SLOW(student_shape),
                                    [](const at::Tensor& rows, const at::Tensor& scale) {
                                      // One vectorised, parallel pass (ATen's mul kernel); fp32 math for bf16/fp16.
                                      return at::mul(rows, at::Scalar(scale.item<double>()));
                                    });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CPU, m) {
  m.impl("whitened_loss", &whitened_loss_cpu);
  m.impl("whitened_loss_backward", &whitened_loss_backward_cpu);
}

}  // namespace kdforge::cpu
