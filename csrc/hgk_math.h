// Per-sample math of docs/design.md (the §1 table and §2 per-sample backward), written once
// for the C++ CPU kernels and the CUDA kernels. Every function works on one sample's
// C-long rows; T is float or double (half-precision inputs arrive upcast to float).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HGK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HGK_HOST_DEVICE inline
#endif

namespace hgk {

enum Loss : int { CROSS_ENTROPY = 0, BINARY_CROSS_ENTROPY = 1, MSE = 2 };

// One sample's label: a class id for cross_entropy, else a C-long target row.
template <typename T>
struct Target {
  int64_t label;
  const T* row;
};

template <typename T>
HGK_HOST_DEVICE T exp_of(T x) {
  using std::exp;  // float and double overloads on the host; CUDA's on the device
  return exp(x);
}

template <typename T>
HGK_HOST_DEVICE T dot(const T* x, const T* y, int n) {
  T acc = T(0);
  for (int c = 0; c < n; ++c) acc += x[c] * y[c];
  return acc;
}

// p = softmax / sigmoid / identity of the logits a (column stride a_stride).
template <typename T>
HGK_HOST_DEVICE void link(int loss, const T* a, int64_t a_stride, int C, T* p) {
  if (loss == CROSS_ENTROPY) {
    T peak = a[0];
    for (int c = 1; c < C; ++c) peak = a[c * a_stride] > peak ? a[c * a_stride] : peak;
    T total = T(0);
    for (int c = 0; c < C; ++c) {
      p[c] = exp_of(a[c * a_stride] - peak);
      total += p[c];
    }
    for (int c = 0; c < C; ++c) p[c] /= total;
  } else if (loss == BINARY_CROSS_ENTROPY) {
    for (int c = 0; c < C; ++c) p[c] = T(1) / (T(1) + exp_of(-a[c * a_stride]));
  } else {
    for (int c = 0; c < C; ++c) p[c] = a[c * a_stride];
  }
}

// dr/dp, a constant: 1, 1/C, 2/C.
template <typename T>
HGK_HOST_DEVICE T residual_slope(int loss, int C) {
  return loss == CROSS_ENTROPY ? T(1) : (loss == BINARY_CROSS_ENTROPY ? T(1) / T(C) : T(2) / T(C));
}

// r = N_e dL_e/da, scaled by w.
template <typename T>
HGK_HOST_DEVICE void residual(int loss, const T* p, Target<T> y, int C, T w, T* r) {
  if (loss == CROSS_ENTROPY) {
    // A label outside [0, C) (possible only with validate=False) poisons the row with NaN,
    // the documented result on every backend, instead of a silently finite residual.
    const T poison = (y.label < 0 || y.label >= C) ? T(NAN) : T(0);
    for (int c = 0; c < C; ++c) r[c] = w * (p[c] - (c == y.label ? T(1) : T(0))) + poison;
  } else {
    const T slope = w * residual_slope<T>(loss, C);
    for (int c = 0; c < C; ++c) r[c] = slope * (p[c] - y.row[c]);
  }
}

// q: N_e times the diagonal of the logit Hessian.
template <typename T>
HGK_HOST_DEVICE T curvature(int loss, T p, int C) {
  if (loss == MSE) return T(2) / T(C);
  const T q = p * (T(1) - p);
  return loss == CROSS_ENTROPY ? q : q / T(C);
}

// dq/dp (zero for mse, whose q is constant).
template <typename T>
HGK_HOST_DEVICE T curvature_slope(int loss, T p, int C) {
  if (loss == MSE) return T(0);
  const T slope = T(1) - T(2) * p;
  return loss == CROSS_ENTROPY ? slope : slope / T(C);
}

// out = w * A s (A: N_e times the logit Hessian; symmetric). out may alias s.
template <typename T>
HGK_HOST_DEVICE void hess_apply(int loss, const T* p, const T* s, int C, T w, T* out) {
  if (loss == CROSS_ENTROPY) {
    const T ps = dot(p, s, C);
    for (int c = 0; c < C; ++c) out[c] = w * p[c] * (s[c] - ps);
  } else {
    for (int c = 0; c < C; ++c) out[c] = w * curvature(loss, p[c], C) * s[c];
  }
}

// dp += d<tau, A(p) s>/dp.
template <typename T>
HGK_HOST_DEVICE void hess_apply_grad_p(int loss, const T* p, const T* s, const T* tau, int C, T* dp) {
  if (loss == CROSS_ENTROPY) {
    const T ps = dot(p, s, C);
    const T pt = dot(p, tau, C);
    for (int c = 0; c < C; ++c) dp[c] += tau[c] * s[c] - ps * tau[c] - pt * s[c];
  } else if (loss == BINARY_CROSS_ENTROPY) {
    for (int c = 0; c < C; ++c) dp[c] += tau[c] * s[c] * curvature_slope(loss, p[c], C);
  }
}

// da = dPsi/da from dp = dPsi/dp through the link (column stride da_stride).
template <typename T>
HGK_HOST_DEVICE void link_vjp(int loss, const T* p, const T* dp, int C, T* da, int64_t da_stride) {
  if (loss == CROSS_ENTROPY) {
    const T pdp = dot(p, dp, C);
    for (int c = 0; c < C; ++c) da[c * da_stride] = p[c] * (dp[c] - pdp);
  } else if (loss == BINARY_CROSS_ENTROPY) {
    for (int c = 0; c < C; ++c) da[c * da_stride] = dp[c] * p[c] * (T(1) - p[c]);
  } else {
    for (int c = 0; c < C; ++c) da[c * da_stride] = dp[c];
  }
}

// Which statistics a call computes, and how one sample's coefficient row is laid out.
// Forward coefficients: [w r (C) if gradient][w q (C) if hess_diag][w A s_k (C) for k < K],
// each to be multiplied by zh^T (zh ⊙ zh for the q block) and summed over the environment.
// square_residual puts w r ⊙ r in the q block instead: the second moment of the per-sample
// head gradients (Fishr's variance, docs/design.md §5.1), the same reduction with other weights.
struct StatsLayout {
  int C, K;
  bool gradient, hess_diag, square_residual;
  HGK_HOST_DEVICE int width() const { return (gradient ? C : 0) + (hess_diag ? C : 0) + K * C; }
  HGK_HOST_DEVICE int diag_begin() const { return gradient ? C : 0; }
  HGK_HOST_DEVICE int hvp_begin() const { return diag_begin() + (hess_diag ? C : 0); }
};

// Forward coefficient row of one sample; s holds s_k = V_k zh (K * C), p is scratch (C).
template <typename T>
HGK_HOST_DEVICE void stats_row(int loss, StatsLayout L, const T* a, int64_t a_stride, Target<T> y, T w,
                               const T* s, T* p, T* coef) {
  const int C = L.C;
  link(loss, a, a_stride, C, p);
  if (L.gradient) residual(loss, p, y, C, w, coef);
  if (L.hess_diag) {
    T* q = coef + L.diag_begin();
    if (L.square_residual) {
      residual(loss, p, y, C, T(1), q);
      for (int c = 0; c < C; ++c) q[c] = w * q[c] * q[c];
    } else {
      for (int c = 0; c < C; ++c) q[c] = w * curvature(loss, p[c], C);
    }
  }
  for (int k = 0; k < L.K; ++k) hess_apply(loss, p, s + k * C, C, w, coef + L.hvp_begin() + k * C);
}

// Backward: the per-environment matrices are stacked as [Lam (C) if gradient][V_k (C each)][U_k (C each)]
// (upstream of G, HVP directions, upstream of H V_k), plus Gam (C) against zh ⊙ zh when hess_diag.
// dots holds each stacked row applied to zh; dots_sq holds Gam (zh ⊙ zh).
// Out: coef, with d zh = coef @ stacked + zh ⊙ (coef_sq @ Gam), laid out like the stack:
// [w r][sig_k = A tau_k][t_k = w A s_k] (tau_k = w U_k zh), coef_sq = 2 w q; and da.
struct BackwardLayout {
  int C, K;
  bool gradient, hess_diag, square_residual;
  HGK_HOST_DEVICE int width() const { return (gradient ? C : 0) + 2 * K * C; }
  HGK_HOST_DEVICE int dirs_begin() const { return gradient ? C : 0; }
  HGK_HOST_DEVICE int ups_begin() const { return dirs_begin() + K * C; }
};

// dots is overwritten (its U block becomes tau); p and dp are C-long scratch.
template <typename T>
HGK_HOST_DEVICE void backward_row(int loss, BackwardLayout L, const T* a, int64_t a_stride, Target<T> y, T w,
                                  T* dots, const T* dots_sq, T* p, T* dp, T* coef, T* coef_sq, T* da,
                                  int64_t da_stride) {
  const int C = L.C;
  link(loss, a, a_stride, C, p);
  for (int c = 0; c < C; ++c) dp[c] = T(0);
  if (L.gradient) {
    const T slope = w * residual_slope<T>(loss, C);
    for (int c = 0; c < C; ++c) dp[c] += slope * dots[c];  // dr = w Lam zh
    residual(loss, p, y, C, w, coef);
  }
  if (L.hess_diag && L.square_residual) {
    // q = r ⊙ r: dr = 2 r ⊙ (w Gam (zh ⊙ zh)), and dr/dp is the constant residual slope
    residual(loss, p, y, C, T(1), coef_sq);
    const T slope = residual_slope<T>(loss, C);
    for (int c = 0; c < C; ++c) {
      dp[c] += slope * T(2) * coef_sq[c] * w * dots_sq[c];
      coef_sq[c] = T(2) * w * coef_sq[c] * coef_sq[c];
    }
  } else if (L.hess_diag) {
    for (int c = 0; c < C; ++c) {
      dp[c] += curvature_slope(loss, p[c], C) * w * dots_sq[c];  // dq = w Gam (zh ⊙ zh)
      coef_sq[c] = T(2) * w * curvature(loss, p[c], C);
    }
  }
  for (int k = 0; k < L.K; ++k) {
    const T* s = dots + L.dirs_begin() + k * C;
    T* tau = dots + L.ups_begin() + k * C;
    for (int c = 0; c < C; ++c) tau[c] *= w;
    hess_apply_grad_p(loss, p, s, tau, C, dp);
    hess_apply(loss, p, tau, C, T(1), coef + L.dirs_begin() + k * C);
    hess_apply(loss, p, s, C, w, coef + L.ups_begin() + k * C);
  }
  link_vjp(loss, p, dp, C, da, da_stride);
}

}  // namespace hgk
