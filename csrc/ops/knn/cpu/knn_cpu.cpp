// kdforge::knn, CPU: exact k nearest neighbours by streaming the gallery in chunks; never a Q x G matrix.
//
// For each gallery chunk of C rows: one GEMM (at::mm -> MKL/OpenBLAS) writes the scores of a block of queries
// against the chunk into a reused scratch buffer [Qb, C]; then, in parallel over queries, each score row is merged
// into the query's running top-k, a k-entry min-heap whose root is the current k-th best. Almost every score fails
// the single comparison with that root, so selection costs one pass over the scratch; the GEMM dominates.
//
// Order: larger score is better; for "l2" the score is 2 q.g - |g|^2 (= |q|^2 - |q - g|^2, so the same order as
// the squared distance, smallest first) and the reported value is |q|^2 - score, clamped at 0. Ties go to the
// lower gallery index: chunks arrive in index order, so a later item replaces the root only when strictly better.
// NaN scores rank as -inf (last). Arithmetic and scores are float32 (float64 for float64 queries).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "../../../kdforge.h"

namespace kdforge::cpu {
namespace {

constexpr int64_t kDefaultChunk = 4096;            // gallery rows per GEMM
constexpr int64_t kScratchFloats = int64_t{1} << 22;  // 16 MiB of scores per GEMM at most

// a is worse than b: lower score, or equal score and higher index.
template <typename T>
inline bool worse(T va, int64_t ia, T vb, int64_t ib) { return va < vb || (va == vb && ia > ib); }

// Move the item at i down until no child is worse than it: restores the min-heap (root = worst) below i.
// Called on the root after the root was replaced, and on every inner node by make_heap.
template <typename T>
inline void sift_down(T* v, int64_t* ix, int64_t k, int64_t i = 0) {
  const T cv = v[i];
  const int64_t ci = ix[i];
  while (true) {
    int64_t c = 2 * i + 1;
    if (c >= k) break;
    if (c + 1 < k && worse(v[c + 1], ix[c + 1], v[c], ix[c])) ++c;
    if (!worse(v[c], ix[c], cv, ci)) break;
    v[i] = v[c];
    ix[i] = ix[c];
    i = c;
  }
  v[i] = cv;
  ix[i] = ci;
}

template <typename T>
inline void make_heap(T* v, int64_t* ix, int64_t k) {
  for (int64_t start = k / 2 - 1; start >= 0; --start) sift_down(v, ix, k, start);
}

template <typename T>
inline T clean(T x) { return std::isnan(x) ? -std::numeric_limits<T>::infinity() : x; }

// Merge one query's scores against gallery rows [g0, g0 + C) into its heap (v, ix of length k).
// For l2, gn holds |g|^2 of the chunk rows and the score is 2 * dot - |g|^2.
template <typename T, bool kL2>
void merge_row(const T* dot, const T* gn, int64_t C, int64_t g0, int64_t k, T* v, int64_t* ix) {
  int64_t j = 0;
  // The first k gallery items fill the heap unconditionally (every query sees items in the same order).
  int64_t filled = std::min(k, g0);
  for (; filled < k && j < C; ++j, ++filled) {
    v[filled] = clean<T>(kL2 ? T(2) * dot[j] - gn[j] : dot[j]);
    ix[filled] = g0 + j;
    if (filled + 1 == k) make_heap(v, ix, k);
  }
  T thr = v[0];
  for (; j < C; ++j) {
    const T s = kL2 ? T(2) * dot[j] - gn[j] : dot[j];
    if (s > thr) {  // NaN compares false: never enters
      v[0] = s;
      ix[0] = g0 + j;
      sift_down(v, ix, k);
      thr = v[0];
    }
  }
}

// T: float, or double for float64 queries (scores are then float64, like the reference).
template <typename T>
std::tuple<at::Tensor, at::Tensor> knn_cpu_impl(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                                                bool l2, std::optional<int64_t> chunk_size) {
  const int64_t Q = queries.size(0), G = gallery.size(0), D = queries.size(1);
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  at::Tensor vals = at::empty({Q, k}, queries.options().dtype(acc));
  at::Tensor idxs = at::empty({Q, k}, queries.options().dtype(at::kLong));
  if (Q == 0) return {vals, idxs};

  const at::Tensor q = queries.to(acc).contiguous();
  const int64_t C = std::min(G, chunk_size.value_or(kDefaultChunk));
  const int64_t Qb = std::clamp<int64_t>(kScratchFloats / C, 1, Q);
  at::Tensor scratch = at::empty({Qb, C}, q.options());
  at::Tensor chunk_buf;  // fp32 copy of a chunk when the gallery is not fp32 with unit stride on D
  at::Tensor gnorm = at::empty({C}, q.options());
  T* vp = vals.mutable_data_ptr<T>();
  int64_t* ip = idxs.mutable_data_ptr<int64_t>();

  for (int64_t g0 = 0; g0 < G; g0 += C) {
    const int64_t c = std::min(C, G - g0);
    at::Tensor chunk = gallery.narrow(0, g0, c);
    if (chunk.scalar_type() != acc || chunk.stride(1) != 1) {
      if (!chunk_buf.defined()) chunk_buf = at::empty({C, D}, q.options());
      chunk = chunk_buf.narrow(0, 0, c).copy_(chunk);
    }
    if (l2) {
      // |g|^2 per chunk row with 8 partial sums (exact for small integers, which the tie tests rely on).
      const T* cp = chunk.const_data_ptr<T>();
      const int64_t rs = chunk.stride(0);
      T* gp = gnorm.mutable_data_ptr<T>();
      at::parallel_for(0, c, 256, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const T* row = cp + r * rs;
          T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            for (int l = 0; l < 8; ++l) p[l] += row[d + l] * row[d + l];
          for (; d < D; ++d) p[0] += row[d] * row[d];
          gp[r] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
        }
      });
    }
    for (int64_t q0 = 0; q0 < Q; q0 += Qb) {
      const int64_t qb = std::min(Qb, Q - q0);
      at::Tensor s = scratch.narrow(0, 0, qb).narrow(1, 0, c);
      at::mm_out(s, q.narrow(0, q0, qb), chunk.t());
      const T* sp = s.const_data_ptr<T>();
      const int64_t ld = s.stride(0);
      const T* gp = gnorm.const_data_ptr<T>();
      at::parallel_for(0, qb, 1, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          T* v = vp + (q0 + r) * k;
          int64_t* ix = ip + (q0 + r) * k;
          if (l2) {
            merge_row<T, true>(sp + r * ld, gp, c, g0, k, v, ix);
          } else {
            merge_row<T, false>(sp + r * ld, gp, c, g0, k, v, ix);
          }
        }
      });
    }
  }

  // Best first: sort each heap by (score desc, index asc); report squared distances for l2.
  const T* qp = q.const_data_ptr<T>();
  at::parallel_for(0, Q, 16, [&](int64_t b, int64_t e) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    std::vector<T> tv(static_cast<size_t>(k));
    std::vector<int64_t> ti(static_cast<size_t>(k));
    for (int64_t r = b; r < e; ++r) {
      T* v = vp + r * k;
      int64_t* ix = ip + r * k;
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(),
                [&](int64_t x, int64_t y) { return worse<T>(v[y], ix[y], v[x], ix[x]); });
      T qn = 0;
      if (l2) {
        const T* row = qp + r * D;
        for (int64_t d = 0; d < D; ++d) qn += row[d] * row[d];
      }
      for (int64_t j = 0; j < k; ++j) {
        tv[j] = l2 ? std::max<T>(qn - v[order[j]], T(0)) : v[order[j]];
        ti[j] = ix[order[j]];
      }
      std::copy(tv.begin(), tv.end(), v);
      std::copy(ti.begin(), ti.end(), ix);
    }
  });
  return {vals, idxs};
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                                           c10::string_view metric_name, std::optional<int64_t> chunk_size) {
  check_knn_args(queries, gallery, k, chunk_size);
  TORCH_CHECK(queries.device().is_cpu() && gallery.device().is_cpu(),
              "knn (CPU kernel): queries and gallery must both be CPU tensors, got ", queries.device(), " and ",
              gallery.device());
  const bool l2 = parse_metric(metric_name) == Metric::L2;
  if (queries.scalar_type() == at::kDouble) return knn_cpu_impl<double>(queries, gallery, k, l2, chunk_size);
  return knn_cpu_impl<float>(queries, gallery, k, l2, chunk_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CPU, m) { m.impl("knn", &knn_cpu); }

}  // namespace kdforge::cpu
