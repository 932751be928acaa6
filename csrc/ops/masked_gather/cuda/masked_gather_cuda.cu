// kdforge::masked_gather, CUDA: rows of x [B, N, D] where mask [B, N] is true, row-major order -> [M, D].
// The destination of each row is an inclusive prefix sum of the mask (ATen's cumsum). M sizes the output, so it
// is read back once (one synchronisation, as for any data-dependent shape); the copy is one warp per masked row.
// Any dtype; x may have any strides with a unit stride on D.
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../../../kdforge.h"
#include "../../../masked_rows_cuda.cuh"

namespace kdforge::cuda {
namespace {

template <typename word_t>
__global__ void gather_rows_kernel(const char* __restrict__ x, int64_t sb, int64_t sn, int64_t N,
                                   const bool* __restrict__ mask, const int64_t* __restrict__ prefix,
                                   char* __restrict__ out, int64_t L, int64_t row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(word_t));
  for (int64_t j = warp; j < L; j += warps) {
    if (!mask[j]) continue;
    const auto* src = reinterpret_cast<const word_t*>(x + (j / N) * sb + (j % N) * sn);
    auto* dst = reinterpret_cast<word_t*>(out + (prefix[j] - 1) * row_bytes);
    for (int64_t w = lane; w < words; w += 32) dst[w] = src[w];
  }
}

at::Tensor masked_gather_cuda(const at::Tensor& x_in, const at::Tensor& mask_in) {
  TORCH_CHECK(x_in.dim() == 3, "masked_gather: x must be [B, N, D], got ", shape_str(x_in));
  check_masked_rows_mask("masked_gather", mask_in, x_in.size(0), x_in.size(1), x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = B * N;
  if (L == 0) return at::empty({0, D}, x.options());

  const at::Tensor prefix = at::cumsum(mask_in.reshape({L}), 0, at::kLong);
  const int64_t M = prefix[L - 1].item<int64_t>();
  at::Tensor out = at::empty({M, D}, x.options());
  if (M == 0 || D == 0) return out;

  const int64_t esize = x.element_size();
  const int64_t row_bytes = D * esize, sb = x.stride(0) * esize, sn = x.stride(1) * esize;
  const auto xp = reinterpret_cast<int64_t>(x.const_data_ptr());
  const auto op = reinterpret_cast<int64_t>(out.mutable_data_ptr());
  const at::Tensor mask = mask_in.reshape({L}).contiguous();
  constexpr int kThreads = 256;
  const int blocks = grid_for(L, kThreads / 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_word(copy_word_bytes({row_bytes, sb, sn, xp, op}), [&](auto word) {
    using word_t = decltype(word);
    gather_rows_kernel<word_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const char*>(x.const_data_ptr()), sb, sn, N, mask.const_data_ptr<bool>(),
        prefix.const_data_ptr<int64_t>(), static_cast<char*>(out.mutable_data_ptr()), L, row_bytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CUDA, m) { m.impl("masked_gather", &masked_gather_cuda); }

}  // namespace kdforge::cuda
