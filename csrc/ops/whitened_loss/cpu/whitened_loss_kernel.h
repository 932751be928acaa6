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
//     (plain L1) and d = 0 its gradient is -1; the L1 path keeps that branch order.
//     Without branches: with m = min(|d|, beta), m (|d| - m/2) / beta is 0.5 d^2 / beta when |d| < beta (m = |d|)
//     and |d| - beta/2 otherwise (m = beta); and d / beta clamped to [-1, 1] is the gradient of both branches.
//   mse:  l(d) = d^2,  dl/dd = 2 d.
// The teacher gets no gradient, so tn is a constant for the student and dloss/ds = scale * dl/dd(d): the gradient
// is known during the forward pass. We write it once (dS) while the row is in L1 and the backward only multiplies
// dS by grad_output (per row for "none"). One pass over memory per row instead of LayerNorm + loss + backward as
// separate kernels.
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

#if defined(__GNUC__) || defined(__clang__)
#define KDFORGE_PREFETCH(p) __builtin_prefetch(p)
#else
#define KDFORGE_PREFETCH(p) ((void)0)
#endif

namespace kdforge::cpu {
inline namespace CPU_CAPABILITY {

// Loss and gradient of one row in acc_t (float, or double for float64 inputs); returns the row's unscaled loss
// sum accumulated in acc_t.
enum class RowLoss { SmoothL1, L1, Mse };

template <typename acc_t, RowLoss kLoss, bool kWhiten>
inline acc_t whitened_row(const acc_t* s, const acc_t* t, acc_t* g, int64_t D, acc_t beta, acc_t eps,
                          acc_t grad_scale) {
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  // |d|: one and-not in the SIMD builds; ATen's generic abs() calls a function per lane, so the baseline copy uses
  // max(d, 0) - min(d, 0), which the compiler vectorises.
  const auto vec_abs = [](const V& d) {
#if defined(CPU_CAPABILITY_DEFAULT)
    return at::vec::clamp_min(d, V(acc_t(0))) - at::vec::clamp_max(d, V(acc_t(0)));
#else
    return d.abs();
#endif
  };
  const auto add = [](V& x, V& y) { return x + y; };
  acc_t mean = 0;
  acc_t rstd = 1;
  if constexpr (kWhiten) {
    // Two passes over t (the second from L1): the centred variance is exact where sum(t^2) - mean^2 would cancel.
    V a0(acc_t(0)), a1(acc_t(0));
    int64_t j = 0;
    for (; j + 2 * W <= D; j += 2 * W) {
      // The student row is needed in the last pass; fetching it now overlaps its memory latency with this one.
      KDFORGE_PREFETCH(s + j);
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

  // tn = t * rstd - mean * rstd: one fused multiply-add per vector.
  const V vrstd(rstd), vshift(-mean * rstd), vzero(acc_t(0));
  V acc(acc_t(0));
  int64_t j = 0;
  // Branch-free forms from the header comment (min/max/clamp instead of compares and blends); the 1 / beta of
  // the smooth-L1 loss is applied once per row, to the sum. clamp_max / clamp pass a NaN d through.
  const V vbeta(beta), vhalf(acc_t(0.5)), vscale(grad_scale), vneg_scale(-grad_scale),
      vgrad_mul(kLoss == RowLoss::SmoothL1 ? grad_scale / beta : acc_t(2) * grad_scale);
  // One element block: loss into `a`, dS stored. Two accumulators in the loop below hide the FMA latency.
  const auto step = [&](int64_t at_j, V& a) {
    V tn = V::loadu(t + at_j);
    if constexpr (kWhiten) tn = at::vec::fmadd(tn, vrstd, vshift);
    const V d = V::loadu(s + at_j) - tn;
    V dl;
    if constexpr (kLoss == RowLoss::SmoothL1) {
      const V ad = vec_abs(d);
      const V m = at::vec::clamp_max(ad, vbeta);
      a = at::vec::fmadd(m, ad - vhalf * m, a);
      dl = at::vec::clamp(d * vgrad_mul, vneg_scale, vscale);
    } else if constexpr (kLoss == RowLoss::L1) {
      a = a + vec_abs(d);
      dl = V::blendv(vscale, vneg_scale, d <= vzero);
    } else {
      a = at::vec::fmadd(d, d, a);
      dl = d * vgrad_mul;
    }
    dl.store(g + at_j);
  };
  V acc2(acc_t(0));
  for (; j + 2 * W <= D; j += 2 * W) {
    step(j, acc);
    step(j + W, acc2);
  }
  for (; j + W <= D; j += W) step(j, acc);
  acc = acc + acc2;
  acc_t total = at::vec::vec_reduce_all<acc_t>(add, acc);
  for (; j < D; ++j) {
    const acc_t tn = kWhiten ? t[j] * rstd - mean * rstd : t[j];
    const acc_t d = s[j] - tn;
    const acc_t ad = std::abs(d);
    if constexpr (kLoss == RowLoss::SmoothL1) {
      const acc_t m = std::min(ad, beta);
      total += m * (ad - acc_t(0.5) * m);
      g[j] = std::min(std::max(d * (grad_scale / beta), -grad_scale), grad_scale);
    } else if constexpr (kLoss == RowLoss::L1) {
      total += ad;
      g[j] = d <= acc_t(0) ? -grad_scale : grad_scale;
    } else {
      total += d * d;
      g[j] = d * (acc_t(2) * grad_scale);
    }
  }
  return kLoss == RowLoss::SmoothL1 ? total / beta : total;
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

template <typename scalar_t, RowLoss kLoss, bool kWhiten>
void whitened_rows_typed(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  const auto* S = static_cast<const scalar_t*>(a.student);
  const auto* T = static_cast<const scalar_t*>(a.teacher);
  auto* G = static_cast<scalar_t*>(a.grad);
  const int64_t D = a.dim;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    auto* L = static_cast<scalar_t*>(a.row_loss);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = a.index ? a.index[i] : i;
      L[i] = whitened_row<scalar_t, kLoss, kWhiten>(S + r * D, T + r * D, G + i * D, D,
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
      L[i] = whitened_row<float, kLoss, kWhiten>(s, t, g, D, static_cast<float>(a.beta),
                                                     static_cast<float>(a.eps), static_cast<float>(a.grad_scale));
      row_from_float(g, G + i * D, D);
    }
  }
}

template <typename scalar_t, RowLoss kLoss>
void whitened_rows_loss(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  a.whiten ? whitened_rows_typed<scalar_t, kLoss, true>(a, begin, end)
           : whitened_rows_typed<scalar_t, kLoss, false>(a, begin, end);
}

template <typename scalar_t>
void whitened_rows_dtype(const WhitenedRowsArgs& a, int64_t begin, int64_t end) {
  if (!a.smooth_l1) return whitened_rows_loss<scalar_t, RowLoss::Mse>(a, begin, end);
  if (a.beta > 0) return whitened_rows_loss<scalar_t, RowLoss::SmoothL1>(a, begin, end);
  return whitened_rows_loss<scalar_t, RowLoss::L1>(a, begin, end);
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
