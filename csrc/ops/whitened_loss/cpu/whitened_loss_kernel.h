// Fused whitened loss, CPU row kernel. Included once per instruction set (whitened_loss_kernel_default.cpp,
// whitened_loss_kernel_avx2.cpp); CPU_CAPABILITY must be defined by the including file.
//
// Math, per selected row r (length D), with s = student[r], t = teacher[r]:
//   whitening (LayerNorm without affine, biased variance, eps inside the sqrt):
//     mu = sum(t) / D,  var = sum((t - mu)^2) / D,  tn = (t - mu) / sqrt(var + eps)      (tn = t when !whiten)
//   d = s - tn; loss = scale * sum_r sum_j l(d_rj), scale = 1 / (rows * D) for "mean", 1 for "sum"
//   ("none" keeps the per-row sums sum_j l(d_rj), with scale 1).
//   smooth-L1 (torch's definition):  l(d) = 0.5 d^2 / beta  if |d| < beta,  else |d| - 0.5 beta
//     dl/dd = d / beta inside, sign(d) outside. Torch tests d <= -beta first and then d >= beta, so with beta = 0
//     and d = 0 its gradient is -1; we keep that branch order so both backends agree bit for bit on the branch.
//   mse:  l(d) = d^2,  dl/dd = 2 d.
// The teacher gets no gradient, so tn is a constant for the student and dloss/ds = scale * dl/dd(d): the gradient
// is known during the forward pass. We write it once (dS) while the row is in L1 and the backward only multiplies
// dS by grad_output (per row for "none"). One pass over memory per row instead of LayerNorm + loss + backward as separate kernels.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT or AVX2) before including whitened_loss_kernel.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../../../cpu_capability.h"
#include "whitened_loss_kernel_args.h"

namespace kdforge::cpu {
inline namespace CPU_CAPABILITY {

// Loss and gradient of one row in acc_t (float, or double for float64 inputs); returns the row's unscaled loss
// sum accumulated in acc_t.
template <typename acc_t, bool kSmoothL1, bool kWhiten>
inline acc_t whitened_row(const acc_t* s, const acc_t* t, acc_t* g, int64_t D, acc_t beta, acc_t eps,
                          acc_t grad_scale) {
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const auto add = [](V& x, V& y) { return x + y; };
  acc_t mean = 0;
  acc_t rstd = 1;
  if constexpr (kWhiten) {
    // Two passes over t (the second from L1): the centred variance is exact where sum(t^2) - mean^2 would cancel.
    V a0(acc_t(0)), a1(acc_t(0));
    int64_t j = 0;
    for (; j + 2 * W <= D; j += 2 * W) {
      a0 = a0 + V::loadu(t + j);
      a1 = a1 + V::loadu(t + j + W);
    }
    for (; j + W <= D; j += W) a0 = a0 + V::loadu(t + j);
    acc_t sum = at::vec::vec_reduce_all<acc_t>(add, a0 + a1);
    for (; j < D; ++j) sum += t[j];
    mean = sum / static_cast<acc_t>(D);

    const V vmean(mean);
    V q0(acc_t(0)), q1(acc_t(0));
    j = 0;
    for (; j + 2 * W <= D; j += 2 * W) {
      const V c0 = V::loadu(t + j) - vmean;
      const V c1 = V::loadu(t + j + W) - vmean;
      q0 = at::vec::fmadd(c0, c0, q0);
      q1 = at::vec::fmadd(c1, c1, q1);
    }
    for (; j + W <= D; j += W) {
      const V c0 = V::loadu(t + j) - vmean;
      q0 = at::vec::fmadd(c0, c0, q0);
    }
    acc_t sq = at::vec::vec_reduce_all<acc_t>(add, q0 + q1);
    for (; j < D; ++j) sq += (t[j] - mean) * (t[j] - mean);
    rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(D) + eps);
  }

  const V vmean(mean), vrstd(rstd), vscale(grad_scale);
  const V vbeta(beta), vneg_beta(-beta), vhalf_beta(acc_t(0.5) * beta), vinv_beta(acc_t(1) / beta),
      vhalf_inv_beta(acc_t(0.5) / beta), vone(acc_t(1)), vminus_one(acc_t(-1)), vtwo(acc_t(2));
  V acc(acc_t(0));
  int64_t j = 0;
  for (; j + W <= D; j += W) {
    V tn = V::loadu(t + j);
    if constexpr (kWhiten) tn = (tn - vmean) * vrstd;
    const V d = V::loadu(s + j) - tn;
    V l, dl;
    if constexpr (kSmoothL1) {
      const V ad = d.abs();
      // With beta = 0 the "inside" lanes compute inf/nan but are never selected by the blends.
      l = V::blendv(ad - vhalf_beta, d * d * vhalf_inv_beta, ad < vbeta);
      dl = V::blendv(V::blendv(d * vinv_beta, vone, d >= vbeta), vminus_one, d <= vneg_beta);
    } else {
      l = d * d;
      dl = vtwo * d;
    }
    acc = acc + l;
    (dl * vscale).store(g + j);
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>(add, acc);
  for (; j < D; ++j) {
    const acc_t tn = kWhiten ? (t[j] - mean) * rstd : t[j];
    const acc_t d = s[j] - tn;
    acc_t l, dl;
    if constexpr (kSmoothL1) {
      const acc_t ad = std::abs(d);
      l = ad < beta ? acc_t(0.5) * d * d / beta : ad - acc_t(0.5) * beta;
      dl = d <= -beta ? acc_t(-1) : (d >= beta ? acc_t(1) : d / beta);
    } else {
      l = d * d;
      dl = acc_t(2) * d;
    }
    total += l;
    g[j] = dl * grad_scale;
  }
  return total;
}

using Vec = at::vec::Vectorized<float>;

template <typename scalar_t>
inline void row_to_float(const scalar_t* src, float* dst, int64_t n) {
  using BVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = BVec::size();  // = 2 * Vec::size()
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(BVec::loadu(src + j));
    lo.store(dst + j);
    hi.store(dst + j + Vec::size());
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename scalar_t>
inline void row_from_float(const float* src, scalar_t* dst, int64_t n) {
  using BVec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t W = BVec::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    at::vec::convert_from_float<scalar_t>(Vec::loadu(src + j), Vec::loadu(src + j + Vec::size())).store(dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

template <typename scalar_t, bool kSmoothL1, bool kWhiten>
void whitened_rows_typed(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  const auto* S = static_cast<const scalar_t*>(a.student);
  const auto* T = static_cast<const scalar_t*>(a.teacher);
  auto* G = static_cast<scalar_t*>(a.grad);
  const int64_t D = a.dim;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    auto* L = static_cast<scalar_t*>(a.row_loss);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = a.index ? a.index[i] : i;
      L[i] = whitened_row<scalar_t, kSmoothL1, kWhiten>(S + r * D, T + r * D, G + i * D, D,
                                                         static_cast<scalar_t>(a.beta), static_cast<scalar_t>(a.eps),
                                                         static_cast<scalar_t>(a.grad_scale));
    }
  } else {
    // bf16 / fp16: widen the row to fp32 scratch (it stays in L1), run the fp32 kernel, narrow the gradient.
    auto* L = static_cast<float*>(a.row_loss);
    std::vector<float> buf(3 * static_cast<size_t>(D));
    float* s = buf.data();
    float* t = s + D;
    float* g = t + D;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = a.index ? a.index[i] : i;
      row_to_float(S + r * D, s, D);
      row_to_float(T + r * D, t, D);
      L[i] = whitened_row<float, kSmoothL1, kWhiten>(s, t, g, D, static_cast<float>(a.beta),
                                                     static_cast<float>(a.eps), static_cast<float>(a.grad_scale));
      row_from_float(g, G + i * D, D);
    }
  }
}

template <typename scalar_t>
void whitened_rows_dtype(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  if (a.smooth_l1) {
    a.whiten ? whitened_rows_typed<scalar_t, true, true>(a, begin, end)
             : whitened_rows_typed<scalar_t, true, false>(a, begin, end);
  } else {
    a.whiten ? whitened_rows_typed<scalar_t, false, true>(a, begin, end)
             : whitened_rows_typed<scalar_t, false, false>(a, begin, end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace kdforge::cpu

namespace kdforge::cpu {
// The entry point of this instruction-set copy: rows [begin, end) of the selection.
void KDFORGE_KERNEL(whitened_loss_rows)(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case WhitenedDtype::Float: return whitened_rows_dtype<float>(a, begin, end);
    case WhitenedDtype::BFloat16: return whitened_rows_dtype<c10::BFloat16>(a, begin, end);
    case WhitenedDtype::Half: return whitened_rows_dtype<c10::Half>(a, begin, end);
    case WhitenedDtype::Double: return whitened_rows_dtype<double>(a, begin, end);
  }
}
}  // namespace kdforge::cpu
