// kdforge::knn, CUDA: exact top-k by streaming the gallery; never a Q x G matrix.
//
// Per gallery chunk of C rows (copied to the GPU chunk by chunk when the gallery is a CPU tensor) and per block of
// Qb queries: cuBLAS (at::mm) writes the fp32 scores into a reused [Qb, C] tile, then knn_select_kernel (one
// thread block per query) merges the tile row into the query's running top-k, kept in global memory as k 64-bit
// keys. knn_finish_kernel sorts each query's keys in shared memory and decodes them.
//
// Keys make every comparison a single integer compare with the tie rule built in:
//   key = ordered(score) << 32 | ~index          (index < 2^32)
// ordered() maps a float to a uint32 with the same order (flip all bits of negatives, set the sign bit of
// positives; NaN -> -inf, -0 -> +0), and ~index makes the lower index the larger key among equal scores. Keys of
// real items are >= 2^32; an empty slot s (before k gallery rows were seen) holds the key s < k, below all.
// All keys are distinct, so "the k largest keys" is one exact set.
//
// Selection (per query and chunk) is a radix select over the k running keys and the chunk's keys, 8 bits per pass
// from the top, with a 256-bin shared histogram (warp-aggregated atomics). It stops as soon as the bin holding the
// k-th largest key is entirely selected; the survivors are then exactly {key : (key & mask) >= prefix}. Only chunk
// keys above the current k-th best (the running minimum) take part, so after the first chunks almost nothing
// does, and chunks that cannot change the top-k return after one pass. Order: larger score is better; "l2" uses
// 2 q.g - |g|^2 and reports |q|^2 minus it, clamped at 0.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../../../cuda_common.cuh"
#include "../../../kdforge.h"

namespace kdforge::cuda {
namespace {

constexpr int kMaxK = 2048;          // keys sorted in shared memory at the end: 2048 * 8 B = 16 KiB
constexpr int kThreads = 256;        // threads per query block in both kernels
constexpr int64_t kDefaultChunk = 16384;
constexpr int64_t kTileFloats = int64_t{1} << 26;  // [Qb, C] score tile: 256 MiB at most

using key_t = unsigned long long;

__device__ __forceinline__ uint32_t ordered_bits(float f) {
  if (isnan(f)) f = -INFINITY;  // NaN ranks last
  if (f == 0.f) f = 0.f;        // -0 ties with +0
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float unordered_bits(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

__device__ __forceinline__ key_t make_key(float score, int64_t index) {
  return (static_cast<key_t>(ordered_bits(score)) << 32) | static_cast<key_t>(~static_cast<uint32_t>(index));
}

// Adds 1 to hist[bin] for every active lane, one atomic per distinct bin per warp (many lanes often share a bin:
// the top digits of similar scores are equal). Every lane of the warp must call it.
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, bool active) {
  const unsigned lanes = __ballot_sync(kFullMask, active);
  if (!active) return;
  const unsigned peers = __match_any_sync(lanes, bin);
  if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&hist[bin], __popc(peers));
}

// Score of chunk column j for this query: the dot product, or 2 q.g - |g|^2 for l2.
template <bool kL2>
__device__ __forceinline__ float chunk_score(const float* row, const float* gnorm, int64_t j) {
  return kL2 ? 2.f * row[j] - gnorm[j] : row[j];
}

// One block per query of the tile: merge scores[q, :C] (gallery rows g0 ..) into keys[q, :k].
template <bool kL2>
__global__ void __launch_bounds__(kThreads)
    knn_select_kernel(const float* __restrict__ scores, int64_t C, int64_t g0, const float* __restrict__ gnorm,
                      key_t* __restrict__ keys_all, int k) {
  __shared__ unsigned hist[256];
  __shared__ key_t s_min, s_prefix, s_mask;
  __shared__ int s_krem, s_done, s_new, s_count;
  extern __shared__ key_t selected[];  // k keys

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const float* row = scores + static_cast<int64_t>(blockIdx.x) * C;
  key_t* keys = keys_all + static_cast<int64_t>(blockIdx.x) * k;

  // The running k-th best: chunk keys at or below it cannot enter.
  if (tid == 0) {
    s_min = ~key_t{0};
    s_prefix = 0;
    s_mask = 0;
    s_krem = k;
    s_done = 0;
    s_new = 0;
    s_count = 0;
  }
  __syncthreads();
  {
    key_t local = ~key_t{0};
    for (int i = tid; i < k; i += kThreads) local = min(local, keys[i]);
    atomicMin(&s_min, local);
  }
  __syncthreads();
  const key_t thr = s_min;

  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const key_t prefix = s_prefix, mask = s_mask;
    for (int base = 0; base < k; base += kThreads) {
      const int i = base + tid;
      const key_t key = i < k ? keys[i] : 0;
      hist_add(hist, static_cast<unsigned>((key >> shift) & 0xff), i < k && (key & mask) == prefix);
    }
    for (int64_t base = 0; base < C; base += kThreads) {
      const int64_t j = base + tid;
      const key_t key = j < C ? make_key(chunk_score<kL2>(row, gnorm, j), g0 + j) : 0;
      const bool active = j < C && key > thr && (key & mask) == prefix;
      hist_add(hist, static_cast<unsigned>((key >> shift) & 0xff), active);
      if (shift == 56) {
        const unsigned entered = __ballot_sync(kFullMask, active);
        if (lane == 0 && entered != 0) atomicAdd(&s_new, __popc(entered));
      }
    }
    __syncthreads();
    if (shift == 56 && s_new == 0) return;  // nothing in this chunk beats the k-th best: keys unchanged

    // Find the digit holding the krem-th largest key: warp 0, lane l owns digits 255 - 8l .. 248 - 8l.
    if (tid < 32) {
      unsigned c[8];
      unsigned total = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        c[e] = hist[255 - 8 * lane - e];
        total += c[e];
      }
      unsigned incl = total;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned v = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) incl += v;
      }
      const unsigned krem = static_cast<unsigned>(s_krem);
      const unsigned excl = incl - total;
      if (excl < krem && krem <= incl) {  // exactly one lane
        unsigned cum = excl;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (cum + c[e] >= krem) {
            const key_t digit = static_cast<key_t>(255 - 8 * lane - e);
            s_prefix = prefix | (digit << shift);
            s_mask = mask | (key_t{0xff} << shift);
            s_krem = static_cast<int>(krem - cum);
            s_done = c[e] == krem - cum;  // the whole bin is selected: stop refining
            break;
          }
          cum += c[e];
        }
      }
    }
    __syncthreads();
    if (s_done) break;
  }

  // Survivors: exactly k keys with (key & mask) >= prefix (distinct keys make the set exact).
  const key_t prefix = s_prefix, mask = s_mask;
  for (int i = tid; i < k; i += kThreads) {
    const key_t key = keys[i];
    if ((key & mask) >= prefix) selected[atomicAdd(&s_count, 1)] = key;
  }
  for (int64_t j = tid; j < C; j += kThreads) {
    const key_t key = make_key(chunk_score<kL2>(row, gnorm, j), g0 + j);
    if (key > thr && (key & mask) >= prefix) selected[atomicAdd(&s_count, 1)] = key;
  }
  __syncthreads();
  if (tid == 0) CUDA_KERNEL_ASSERT_MSG(s_count == k, "knn: internal error, radix select kept a wrong count");
  for (int i = tid; i < k; i += kThreads) keys[i] = selected[i];
}

// One block per query: bitonic sort of the k keys (padded to a power of two P) in shared memory, largest first,
// then decode scores and indices.
__global__ void __launch_bounds__(kThreads)
    knn_finish_kernel(const key_t* __restrict__ keys_all, int k, int P, bool l2, const float* __restrict__ qnorm,
                      float* __restrict__ scores_out, int64_t* __restrict__ index_out) {
  extern __shared__ key_t s[];  // P keys
  const int tid = threadIdx.x;
  const key_t* keys = keys_all + static_cast<int64_t>(blockIdx.x) * k;
  for (int i = tid; i < P; i += kThreads) s[i] = i < k ? keys[i] : 0;
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = tid; t < P / 2; t += kThreads) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool descending = (i & size) == 0;
        const key_t a = s[i], b = s[j];
        if (descending ? a < b : a > b) {
          s[i] = b;
          s[j] = a;
        }
      }
      __syncthreads();
    }
  }
  const float qn = l2 ? qnorm[blockIdx.x] : 0.f;
  for (int i = tid; i < k; i += kThreads) {
    const key_t key = s[i];
    const float score = unordered_bits(static_cast<uint32_t>(key >> 32));
    scores_out[static_cast<int64_t>(blockIdx.x) * k + i] = l2 ? fmaxf(qn - score, 0.f) : score;
    index_out[static_cast<int64_t>(blockIdx.x) * k + i] =
        static_cast<int64_t>(~static_cast<uint32_t>(key & 0xffffffffull));
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                                            c10::string_view metric_name, std::optional<int64_t> chunk_size) {
  check_knn_args(queries, gallery, k, chunk_size);
  TORCH_CHECK(queries.is_cuda(), "knn: queries must be on the GPU when the gallery is (gallery on ",
              gallery.device(), ", queries on ", queries.device(), "); move the queries with .cuda(), or the ",
              "gallery with .cpu() to search on the CPU");
  TORCH_CHECK(gallery.device() == queries.device() || gallery.is_cpu(), "knn: gallery must be on the queries' ",
              "device ", queries.device(), " or on the CPU (streamed chunk by chunk), got ", gallery.device());
  TORCH_CHECK(queries.scalar_type() != at::kDouble, "knn (CUDA kernel): scores are float32, got float64 queries; ",
              "cast them with .float(), or search on the CPU (float64 there)");
  TORCH_CHECK(k <= kMaxK, "knn (CUDA kernel): k must be <= ", kMaxK, ", got k = ", k,
              "; search on the CPU or use backend='reference' for larger k");
  TORCH_CHECK(gallery.size(0) <= (int64_t{1} << 32), "knn (CUDA kernel): galleries above 2^32 rows are not ",
              "supported (indices live in 32 bits of a key), got ", gallery.size(0));
  const bool l2 = parse_metric(metric_name) == Metric::L2;
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t Q = queries.size(0), G = gallery.size(0), D = queries.size(1);
  const auto fopts = queries.options().dtype(at::kFloat);
  at::Tensor scores_out = at::empty({Q, k}, fopts);
  at::Tensor index_out = at::empty({Q, k}, queries.options().dtype(at::kLong));
  if (Q == 0) return {scores_out, index_out};

  const at::Tensor q = queries.to(at::kFloat).contiguous();
  const int64_t C = std::min(G, chunk_size.value_or(kDefaultChunk));
  const int64_t Qb = std::clamp<int64_t>(kTileFloats / C, 1, Q);
  at::Tensor tile = at::empty({Qb * C}, fopts);
  // Empty slot s holds key s (below every real key); int64 storage read as unsigned 64-bit keys.
  at::Tensor keys = at::arange(k, queries.options().dtype(at::kLong)).repeat({Q, 1}).contiguous();
  auto* kp = reinterpret_cast<key_t*>(keys.mutable_data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t select_smem = static_cast<size_t>(k) * sizeof(key_t);

  for (int64_t g0 = 0; g0 < G; g0 += C) {
    const int64_t c = std::min(C, G - g0);
    at::Tensor chunk = gallery.narrow(0, g0, c);
    if (!chunk.is_cuda()) {
      chunk = chunk.to(queries.device(), at::kFloat);
    } else if (chunk.scalar_type() != at::kFloat || chunk.stride(1) != 1) {
      chunk = chunk.to(at::kFloat).contiguous();
    }
    at::Tensor gnorm;
    if (l2) gnorm = at::sum(at::mul(chunk, chunk), {1});
    const float* gp = l2 ? gnorm.const_data_ptr<float>() : nullptr;
    for (int64_t q0 = 0; q0 < Q; q0 += Qb) {
      const int64_t qb = std::min(Qb, Q - q0);
      at::Tensor s = tile.narrow(0, 0, qb * c).view({qb, c});
      at::mm_out(s, q.narrow(0, q0, qb), chunk.t());
      const float* sp = s.const_data_ptr<float>();
      key_t* kq = kp + q0 * k;
      if (l2) {
        knn_select_kernel<true><<<static_cast<unsigned>(qb), kThreads, select_smem, stream>>>(sp, c, g0, gp, kq,
                                                                                               static_cast<int>(k));
      } else {
        knn_select_kernel<false><<<static_cast<unsigned>(qb), kThreads, select_smem, stream>>>(sp, c, g0, gp, kq,
                                                                                                static_cast<int>(k));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  int P = 1;
  while (P < k) P <<= 1;
  at::Tensor qnorm;
  if (l2) qnorm = at::sum(at::mul(q, q), {1});
  knn_finish_kernel<<<static_cast<unsigned>(Q), kThreads, static_cast<size_t>(P) * sizeof(key_t), stream>>>(
      kp, static_cast<int>(k), P, l2, l2 ? qnorm.const_data_ptr<float>() : nullptr,
      scores_out.mutable_data_ptr<float>(), index_out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores_out, index_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CUDA, m) { m.impl("knn", &knn_cuda); }

}  // namespace kdforge::cuda
