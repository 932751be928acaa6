// kdforge::whitened_loss and kdforge::whitened_loss_backward, CUDA implementations.
//
// One warp per selected row (grid-stride over rows). Per row: mean and centred variance of the teacher by warp
// reductions (two passes over t; the second and third read it from L1/L2), then one pass that writes
// dS = scale * dl/dd and accumulates the row's loss. Same math and branch order as the CPU kernel (derivation in
// csrc/ops/whitened_loss/cpu/whitened_loss_kernel.h): smooth-L1 l(d) = 0.5 d^2 / beta if |d| < beta else
// |d| - 0.5 beta with dl/dd = -1 if d <= -beta, +1 if d >= beta, d / beta otherwise; mse l = d^2, dl/dd = 2 d.
// Accumulation in float (double for float64 inputs). Row losses go to a buffer that ATen's sum reduces in a fixed
// order, so the result is deterministic. An out-of-range index is a device-side assertion with a message.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "../../../cuda_common.cuh"
#include "../../../kdforge.h"
#include "../whitened_loss_backward.h"

namespace kdforge::cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t inv_sqrt(acc_t x);
template <>
__device__ __forceinline__ float inv_sqrt<float>(float x) {
  return 1.f / sqrtf(x);  // not rsqrtf: keep the CPU kernel's rounding
}
template <>
__device__ __forceinline__ double inv_sqrt<double>(double x) {
  return 1.0 / sqrt(x);
}

template <typename scalar_t, typename acc_t, bool kSmoothL1, bool kWhiten>
__global__ void whitened_loss_fwd_kernel(const scalar_t* __restrict__ S, const scalar_t* __restrict__ T,
                                         const int64_t* __restrict__ index, scalar_t* __restrict__ G,
                                         acc_t* __restrict__ row_loss, int64_t n, int64_t R, int64_t D, acc_t beta,
                                         acc_t eps, acc_t grad_scale) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  for (int64_t i = warp; i < n; i += warps) {
    int64_t r = i;
    if (index != nullptr) {
      r = index[i];
      CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < R, "whitened_loss: an index entry is out of range for the student's rows");
    }
    const scalar_t* s = S + r * D;
    const scalar_t* t = T + r * D;
    scalar_t* g = G + i * D;
    acc_t mean = 0, rstd = 1;
    if constexpr (kWhiten) {
      acc_t sum = 0;
      for (int64_t j = lane; j < D; j += 32) sum += static_cast<acc_t>(t[j]);
      mean = warp_sum(sum) * inv_d;
      acc_t sq = 0;
      for (int64_t j = lane; j < D; j += 32) {
        const acc_t c = static_cast<acc_t>(t[j]) - mean;
        sq += c * c;
      }
      rstd = inv_sqrt<acc_t>(warp_sum(sq) * inv_d + eps);
    }
    acc_t total = 0;
    for (int64_t j = lane; j < D; j += 32) {
      acc_t tn = static_cast<acc_t>(t[j]);
      if constexpr (kWhiten) tn = (tn - mean) * rstd;
      const acc_t d = static_cast<acc_t>(s[j]) - tn;
      acc_t l, dl;
      if constexpr (kSmoothL1) {
        const acc_t ad = d < acc_t(0) ? -d : d;
        l = ad < beta ? acc_t(0.5) * d * d / beta : ad - acc_t(0.5) * beta;
        dl = d <= -beta ? acc_t(-1) : (d >= beta ? acc_t(1) : d / beta);
      } else {
        l = d * d;
        dl = acc_t(2) * d;
      }
      total += l;
      g[j] = static_cast<scalar_t>(dl * grad_scale);
    }
    total = warp_sum(total);
    if (lane == 0) row_loss[i] = total;
  }
}

template <typename scalar_t, typename acc_t>
void launch_fwd(const at::Tensor& s, const at::Tensor& t, const int64_t* index, at::Tensor& grad,
                at::Tensor& row_loss, int64_t n, int64_t R, int64_t D, bool smooth_l1, bool whiten, double beta,
                double eps, double grad_scale) {
  constexpr int kThreads = 256;  // 8 rows (warps) per block
  const int blocks = grid_for(n, kThreads / 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* S = s.const_data_ptr<scalar_t>();
  const auto* T = t.const_data_ptr<scalar_t>();
  auto* G = grad.mutable_data_ptr<scalar_t>();
  auto* L = row_loss.mutable_data_ptr<acc_t>();
  const acc_t b = static_cast<acc_t>(beta), e = static_cast<acc_t>(eps), gs = static_cast<acc_t>(grad_scale);
#define KDFORGE_WL_LAUNCH(SL1, WH)                                                                      \
  whitened_loss_fwd_kernel<scalar_t, acc_t, SL1, WH>                                                    \
      <<<blocks, kThreads, 0, stream>>>(S, T, index, G, L, n, R, D, b, e, gs)
  if (smooth_l1) {
    whiten ? KDFORGE_WL_LAUNCH(true, true) : KDFORGE_WL_LAUNCH(true, false);
  } else {
    whiten ? KDFORGE_WL_LAUNCH(false, true) : KDFORGE_WL_LAUNCH(false, false);
  }
#undef KDFORGE_WL_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> whitened_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                      const std::optional<at::Tensor>& index,
                                                      c10::string_view loss, double beta, bool whiten, double eps,
                                                      c10::string_view reduction) {
  const int64_t R = check_whitened_loss_args(student, teacher, index, beta, eps);
  const bool smooth_l1 = parse_loss(loss) == LossKind::SmoothL1;
  const Reduction red = parse_reduction(reduction);
  const int64_t D = student.size(-1);
  const c10::cuda::CUDAGuard guard(student.device());

  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  at::Tensor idx;
  int64_t n = R;
  if (index.has_value()) {
    idx = index->contiguous();
    n = idx.numel();
  }
  at::Tensor grad = index.has_value() ? at::empty({n, D}, s.options()) : at::empty_like(s);
  const at::ScalarType acc = acc_dtype(s.scalar_type());
  at::Tensor row_loss = at::empty({n}, s.options().dtype(acc));
  const double count = static_cast<double>(n) * static_cast<double>(D);
  const bool mean = red == Reduction::Mean;
  const double grad_scale = mean && n > 0 ? 1.0 / count : 1.0;

  if (n > 0) {
    const int64_t* ip = index.has_value() ? idx.const_data_ptr<int64_t>() : nullptr;
    switch (s.scalar_type()) {
      case at::kFloat:
        launch_fwd<float, float>(s, t, ip, grad, row_loss, n, R, D, smooth_l1, whiten, beta, eps, grad_scale);
        break;
      case at::kHalf:
        launch_fwd<c10::Half, float>(s, t, ip, grad, row_loss, n, R, D, smooth_l1, whiten, beta, eps, grad_scale);
        break;
      case at::kBFloat16:
        launch_fwd<c10::BFloat16, float>(s, t, ip, grad, row_loss, n, R, D, smooth_l1, whiten, beta, eps,
                                         grad_scale);
        break;
      case at::kDouble:
        launch_fwd<double, double>(s, t, ip, grad, row_loss, n, R, D, smooth_l1, whiten, beta, eps, grad_scale);
        break;
      default: TORCH_CHECK(false, "whitened_loss: unsupported dtype ", s.scalar_type());
    }
  }
  if (red == Reduction::None) return {row_loss, grad};
  at::Tensor total = at::sum(row_loss);  // 0 for an empty selection
  if (mean && n > 0) total = at::mul(total, 1.0 / count);
  return {total, grad};
}

// grad_loss * dS (per row for "none"), scattered into zeros with index_add_ when an index was used. ATen's
// kernels do this in one pass each and read grad_loss on the device (no synchronisation).
at::Tensor whitened_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_rows,
                                       const std::optional<at::Tensor>& index, c10::SymIntArrayRef student_shape) {
  const c10::cuda::CUDAGuard guard(grad_rows.device());
  return whitened_loss_grad_student(grad_loss, grad_rows, index, C10_AS_INTARRAYREF_SLOW(student_shape),
                                    [](const at::Tensor& rows, const at::Tensor& scale) {
                                      // a 0-dim factor keeps rows' dtype; the math is in float
                                      return at::mul(rows, scale);
                                    });
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CUDA, m) {
  m.impl("whitened_loss", &whitened_loss_cuda);
  m.impl("whitened_loss_backward", &whitened_loss_backward_cuda);
}

}  // namespace kdforge::cuda
