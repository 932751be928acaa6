// Small device helpers shared by the kdforge CUDA kernels. Headers are kept lean (no ATen/ATen.h): nvcc spends
// most of its time in torch's headers, and CI compiles these files on every change.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kdforge::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Blocks to launch for a grid-stride loop over `work` items of `per_block` each: enough to fill every SM a few
// times over, never more than the work needs.
inline int grid_for(int64_t work, int per_block) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return static_cast<int>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace kdforge::cuda
