// kdforge::knn, CPU: exact k nearest neighbours by streaming the gallery in chunks; never a Q x G matrix.
//
// For each gallery chunk of C rows: one GEMM (at::mm -> MKL/OpenBLAS) writes the scores of a block of queries
// against the chunk into a reused scratch buffer [Qb, C]; then, in parallel over queries, each score row is merged
// into the query's candidate pool (merge_row): a score enters only when it beats the query's threshold, its k-th
// best score so far, and the scan tests 16 scores against it at once. Almost no score enters, so selection costs
// one pass over the scratch; the GEMM dominates.
//
// Order: larger score is better; for "l2" the score is 2 q.g - |g|^2 (= |q|^2 - |q - g|^2, so the same order as
// the squared distance, smallest first) and the reported value is |q|^2 - score, clamped at 0. Ties go to the
// lower gallery index: chunks arrive in index order, so a later item enters only when strictly better than the
// threshold, and pools are cut and sorted by (score desc, index asc).
// NaN scores rank as -inf (last). Arithmetic and scores are float32 (float64 for float64 queries).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../../kdforge.h"

namespace kdforge::cpu {
namespace {

constexpr int64_t kDefaultChunk = 4096;               // gallery rows per GEMM
constexpr int64_t kScratchFloats = int64_t{1} << 22;  // 16 MiB of scores per GEMM at most
constexpr int64_t kPoolBytes = int64_t{1} << 26;      // 64 MiB of candidate pools at most (see knn_cpu_impl)
// Scores tested against the threshold at once (any_above): one 64-byte line of float32. A block with no candidate
// (almost all of them) then costs a few packed compares instead of a compare and branch per score.
constexpr int64_t kScanBlock = 16;

template <typename T>
struct Candidate {
  T score;
  int64_t index;
};

// a comes before b: higher score, or equal score and lower index (a strict total order: indices are unique).
template <typename T>
inline bool better(const Candidate<T>& a, const Candidate<T>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

template <typename T>
inline T clean(T x) { return std::isnan(x) ? -std::numeric_limits<T>::infinity() : x; }

template <typename T, bool kL2>
inline T score_at(const T* dot, const T* gn, int64_t j) { return kL2 ? T(2) * dot[j] - gn[j] : dot[j]; }

// Whether any of the kScanBlock scores from j on is above thr (NaN is not). g++ does not vectorise this as a plain
// loop once it is inlined into the scan (it unrolls it into scalar compares), so with GCC/Clang it is written with
// 16-byte vector extensions: packed compares (SSE2 on x86-64, NEON on arm64) ORed together.
template <typename T, bool kL2>
inline bool any_above(const T* dot, const T* gn, int64_t j, T thr) {
#if defined(__GNUC__)
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // the lane type of a comparison's mask
  typedef T V __attribute__((vector_size(16)));  // typedef: the attribute is ignored on a `using` of a dependent type
  typedef I M __attribute__((vector_size(16)));
  constexpr int64_t kLanes = 16 / sizeof(T);
  const V t = V{} + thr;
  M hit{};
  for (int64_t l = 0; l < kScanBlock; l += kLanes) {
    V s;
    std::memcpy(&s, dot + j + l, sizeof(V));
    if constexpr (kL2) {
      V g;
      std::memcpy(&g, gn + j + l, sizeof(V));
      s = T(2) * s - g;
    }
    hit |= s > t;
  }
  for (int64_t l = 0; l < kLanes; ++l)
    if (hit[l]) return true;
  return false;
#else
  int hit = 0;
  for (int64_t l = 0; l < kScanBlock; ++l) hit |= score_at<T, kL2>(dot, gn, j + l) > thr;
  return hit != 0;
#endif
}

// Keep the best k of pool[0, n) in pool[0, k) (unordered) and return the k-th best score, the new threshold.
template <typename T>
inline T keep_best(Candidate<T>* pool, int64_t n, int64_t k) {
  std::nth_element(pool, pool + (k - 1), pool + n, better<T>);
  return pool[k - 1].score;
}

// Merge one query's scores against gallery rows [g0, g0 + c) into its running top-k: pool[0, count) holds up to
// `cap` candidates, among them its best k so far, and `threshold` is the k-th best score at the last cut. An item
// enters when its score is strictly above the threshold: items arrive in index order, so one equal to it loses to
// every held item with that score (ties to the lower index), and NaN, which compares false, never enters. A full
// pool is cut back to its best k and the threshold rises. Why a pool and not a k-entry min-heap: an entry costs
// a store plus a share of one nth_element over cap items per cap - k entries, where a heap pays a sift of log2 k
// data-dependent (mispredicted) branches per entry. Entries bunch up in the first chunk, where the threshold is
// still low (about k ln(C / k) of the k ln(G / k) entries of a query); there the pool costs 40% fewer cycles than
// a heap, a per-query cost that does not shrink with G and so weighs most on small galleries.
// For l2, gn holds |g|^2 of the chunk rows and the score is 2 * dot - |g|^2.
template <typename T, bool kL2>
void merge_row(const T* dot, const T* gn, int64_t c, int64_t g0, int64_t k, int64_t cap, Candidate<T>* pool,
               int64_t& count, T& threshold) {
  int64_t n = count;
  int64_t j = 0;
  if (n < k) {
    // The first k gallery items enter unconditionally (NaN as -inf), so a threshold exists once k are held.
    for (; n < k && j < c; ++j) pool[n++] = {clean<T>(score_at<T, kL2>(dot, gn, j)), g0 + j};
    count = n;
    if (n < k) return;
    T lowest = pool[0].score;
    for (int64_t i = 1; i < k; ++i) lowest = std::min(lowest, pool[i].score);
    threshold = lowest;
  }
  T thr = threshold;
  while (j < c) {
    // Skip whole blocks with no score above thr; then take the items of one block (or the tail) one by one.
    while (j + kScanBlock <= c && !any_above<T, kL2>(dot, gn, j, thr)) j += kScanBlock;
    const int64_t stop = std::min(c, j + kScanBlock);
    for (; j < stop; ++j) {
      const T s = score_at<T, kL2>(dot, gn, j);
      if (s > thr) {
        pool[n++] = {s, g0 + j};
        if (n == cap) {
          thr = keep_best(pool, n, k);
          n = k;
        }
      }
    }
  }
  count = n;
  threshold = thr;
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
  // Pools of 2k + 16 candidates: a cut costs O(cap) and comes every cap - k >= k + 16 entries, so O(1) per entry
  // (the + 16 keeps small k from cutting on almost every entry). The pools of Qp queries are held at once; more
  // queries than that are searched in passes over the gallery (each pass streams the gallery once).
  const int64_t cap = 2 * k + 16;
  const int64_t Qp = std::clamp<int64_t>(kPoolBytes / (cap * static_cast<int64_t>(sizeof(Candidate<T>))), 1, Q);
  const int64_t Qb = std::clamp<int64_t>(kScratchFloats / C, 1, Qp);
  at::Tensor scratch = at::empty({Qb, C}, q.options());
  at::Tensor chunk_buf;  // fp32 copy of a chunk when the gallery is not fp32 with unit stride on D
  at::Tensor gnorm = at::empty({C}, q.options());
  std::unique_ptr<Candidate<T>[]> pools(new Candidate<T>[Qp * cap]);  // uninitialised: count says what is valid
  std::vector<int64_t> counts(static_cast<size_t>(Qp));
  std::vector<T> thresholds(static_cast<size_t>(Qp));
  T* vp = vals.mutable_data_ptr<T>();
  int64_t* ip = idxs.mutable_data_ptr<int64_t>();
  const T* qp = q.const_data_ptr<T>();

  for (int64_t p0 = 0; p0 < Q; p0 += Qp) {
    const int64_t np = std::min(Qp, Q - p0);
    std::fill(counts.begin(), counts.end(), 0);
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
      for (int64_t q0 = 0; q0 < np; q0 += Qb) {
        const int64_t qb = std::min(Qb, np - q0);
        at::Tensor s = scratch.narrow(0, 0, qb).narrow(1, 0, c);
        at::mm_out(s, q.narrow(0, p0 + q0, qb), chunk.t());
        const T* sp = s.const_data_ptr<T>();
        const int64_t ld = s.stride(0);
        const T* gp = gnorm.const_data_ptr<T>();
        at::parallel_for(0, qb, 1, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
            const int64_t pr = q0 + r;  // row within the pass
            Candidate<T>* pool = pools.get() + pr * cap;
            if (l2) {
              merge_row<T, true>(sp + r * ld, gp, c, g0, k, cap, pool, counts[pr], thresholds[pr]);
            } else {
              merge_row<T, false>(sp + r * ld, gp, c, g0, k, cap, pool, counts[pr], thresholds[pr]);
            }
          }
        });
      }
    }

    // Best first: the best k of each pool sorted by (score desc, index asc); squared distances for l2.
    at::parallel_for(0, np, 16, [&](int64_t b, int64_t e) {
      for (int64_t pr = b; pr < e; ++pr) {
        Candidate<T>* pool = pools.get() + pr * cap;
        if (counts[pr] > k) keep_best(pool, counts[pr], k);
        std::sort(pool, pool + k, better<T>);
        const int64_t r = p0 + pr;
        T qn = 0;
        if (l2) {
          const T* row = qp + r * D;
          for (int64_t d = 0; d < D; ++d) qn += row[d] * row[d];
        }
        T* v = vp + r * k;
        int64_t* ix = ip + r * k;
        for (int64_t j = 0; j < k; ++j) {
          v[j] = l2 ? std::max<T>(qn - pool[j].score, T(0)) : pool[j].score;
          ix[j] = pool[j].index;
        }
      }
    });
  }
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
