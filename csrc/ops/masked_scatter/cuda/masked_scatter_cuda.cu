// kdforge::masked_scatter, CUDA: a new [B, N, D] equal to out with the rows where mask [B, N] is true replaced,
// in row-major order, by rows [M, D]. One pass, one warp per output row, copying from rows or from out. The source
// row of a masked position is an inclusive prefix sum of the mask. No synchronisation: the count check
// (M == mask.sum()) is a device-side assertion with a message (the public wrapper also checks it on the host).
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../../../kdforge.h"
#include "../../../masked_rows_cuda.cuh"

namespace kdforge::cuda {
namespace {

template <typename word_t>
__global__ void scatter_rows_kernel(const char* __restrict__ rows, int64_t M, const char* __restrict__ out,
                                    int64_t sb, int64_t sn, int64_t N, const bool* __restrict__ mask,
                                    const int64_t* __restrict__ prefix, char* __restrict__ result, int64_t L,
                                    int64_t row_bytes) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(word_t));
  if (warp == 0 && lane == 0) {
    CUDA_KERNEL_ASSERT_MSG(prefix[L - 1] == M, "masked_scatter: rows must have one row per true mask entry");
  }
  for (int64_t j = warp; j < L; j += warps) {
    const char* from;
    if (mask[j]) {
      const int64_t p = prefix[j] - 1;
      CUDA_KERNEL_ASSERT_MSG(p < M, "masked_scatter: the mask has more true entries than rows has rows");
      from = rows + p * row_bytes;
    } else {
      from = out + (j / N) * sb + (j % N) * sn;
    }
    const auto* src = reinterpret_cast<const word_t*>(from);
    auto* dst = reinterpret_cast<word_t*>(result + j * row_bytes);
    for (int64_t w = lane; w < words; w += 32) dst[w] = src[w];
  }
}

at::Tensor masked_scatter_cuda(const at::Tensor& rows_in, const at::Tensor& mask_in, const at::Tensor& out_in) {
  check_masked_scatter_args(rows_in, mask_in, out_in);
  const int64_t B = out_in.size(0), N = out_in.size(1), D = out_in.size(2), L = B * N;
  const c10::cuda::CUDAGuard guard(out_in.device());
  at::Tensor result = at::empty({B, N, D}, out_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (L == 0) {
    TORCH_CHECK(rows_in.size(0) == 0, "masked_scatter: rows must have one row per true mask entry (mask is ",
                "empty), got ", rows_in.size(0), " rows");
    return result;
  }
  if (D == 0) return result;

  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor out = out_in.stride(2) == 1 ? out_in : out_in.contiguous();
  const at::Tensor mask = mask_in.reshape({L}).contiguous();
  const at::Tensor prefix = at::cumsum(mask, 0, at::kLong);
  const int64_t esize = out.element_size();
  const int64_t row_bytes = D * esize, sb = out.stride(0) * esize, sn = out.stride(1) * esize;
  const auto rp = reinterpret_cast<int64_t>(rows.const_data_ptr());
  const auto op = reinterpret_cast<int64_t>(out.const_data_ptr());
  const auto dp = reinterpret_cast<int64_t>(result.mutable_data_ptr());
  constexpr int kThreads = 256;
  const int blocks = grid_for(L, kThreads / 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_word(copy_word_bytes({row_bytes, sb, sn, rp, op, dp}), [&](auto word) {
    using word_t = decltype(word);
    scatter_rows_kernel<word_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const char*>(rows.const_data_ptr()), rows.size(0), static_cast<const char*>(out.const_data_ptr()),
        sb, sn, N, mask.const_data_ptr<bool>(), prefix.const_data_ptr<int64_t>(),
        static_cast<char*>(result.mutable_data_ptr()), L, row_bytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CUDA, m) { m.impl("masked_scatter", &masked_scatter_cuda); }

}  // namespace kdforge::cuda
