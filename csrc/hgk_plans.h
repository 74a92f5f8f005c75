// The penalty plans of hgkernels/_penalty.py (ExactDiagPlan and HGPPlan, feature form) for the CPU
// module, next to its kernels: one call per direction runs the statistics, the deviations, the
// penalty sums and the backward's upstream algebra, where the Python plans make a dozen small torch
// ops per direction (a small head's time is mostly that host path). Same formulas as the Python
// plans, which the other backends, the distributed path and torch.compile keep using; the tests
// compare the two on every shape they draw. Sums run in a fixed order (thread-count independent).
#pragma once

#include <cstdint>

#include "hgk_kernels.h"

namespace hgk {

enum PlanMethod : int { EXACT_DIAG = 0, HGP = 1 };

struct PlanSpec {
  int method;             // PlanMethod
  double weight;          // R_e: 1/E ('mean' over environments) or 1 ('sum')
  bool pooled;            // HGP: the reference is H_bar G_bar (pooled) rather than mean_e H_e G_e
  bool detach_reference;  // HGP pooled: whether the reference receives no gradient
  // HGP with a pooled reference needs a second direction (G_bar) only with E > 1: the caller
  // passes pooled = (reference == "pooled" and E > 1), as the Python plan does.
};

// Elements of the state a forward leaves for its backward:
// exact (E, 2C, Dh): per environment [G_e - G_bar][Dg_e - mean Dg];
// HGP: G (E, C, Dh), G_bar (C, Dh), H_e G_e - reference (E, C, Dh), then each sample's direction dots
// (N, K C), K = 2 with pooled else 1: [G_e zh_i][G_bar zh_i], which the backward reuses.
int64_t plan_state_size(PlanSpec spec, int num_samples, int num_envs, int C, int head_width);

// The CPU primitives as the plans call them (hgk_kernels.h): on the per-environment matrices where the
// plans hold them (EnvRows, RowRuns, BackwardMatrices below) rather than in stacked arrays, and with the
// direction dots s_k = V_k zh_i passed between them: head_stats can also write them (dots_out, (N, K C)
// in the caller's rows), and per_sample_backward can take the dots of its V and U blocks instead of
// computing them (each of the N caller's rows holds K C values at its row stride; dots of the Lam and
// Gam rows are computed).
template <typename T>
struct KnownDots {
  const T* dirs;
  int64_t dirs_stride;
  const T* ups;
  int64_t ups_stride;
};

// Rows of a per-environment matrix as a plan holds them: environment e's `rows` rows (Dh long each) at
// data + e * env_stride; env_stride 0 shares one block among all environments (HGP's G_bar).
template <typename T>
struct EnvRows {
  const T* data;
  int64_t env_stride;
  int rows;
  const T* at(int e) const { return data + e * env_stride; }
  // a contiguous (E, rows, Dh) array
  static EnvRows stacked(const T* data, int rows, int64_t Dh) { return {data, rows * Dh, rows}; }
  // one (rows, Dh) block that every environment shares
  static EnvRows shared(const T* data, int rows) { return {data, 0, rows}; }
};

// A per-environment stack of K C direction (or upstream) rows in up to two runs, such as [G_e][G_bar]
// without a stacked copy (a serial copy of the state would be a large part of a forward). Unused runs
// have no rows.
template <typename T>
struct RowRuns {
  EnvRows<T> run[2];
  // one run: a contiguous (E, rows, Dh) array (data nullptr or rows 0: none)
  static RowRuns stacked(const T* data, int rows, int64_t Dh) {
    return {{EnvRows<T>::stacked(data, rows, Dh), {nullptr, 0, 0}}};
  }
  // fn(run, index of its first row in the stack) for each run with rows
  template <typename Fn>
  void each(Fn&& fn) const {
    for (int r = 0, first = 0; r < 2; first += run[r].rows, ++r)
      if (run[r].rows) fn(run[r], first);
  }
  const T* row(int e, int k, int64_t Dh) const {
    return k < run[0].rows ? run[0].at(e) + k * Dh : run[1].at(e) + (k - run[0].rows) * Dh;
  }
};

// The per-sample backward's matrices (BackwardLayout's order) as the plans hold them: Lam and Gam (C rows;
// data nullptr: absent), V_k and U_k. Lam, U and Gam come with scales that the backward applies to their
// dots (before the closed form) and coefficients (after it) rather than to the matrices, so the plans read
// their state's deviations in place (a scaled copy would be a serial pass over the state). Known U dots
// (KnownDots) are of the unscaled U.
template <typename T>
struct BackwardMatrices {
  EnvRows<T> lam;
  T lam_scale;
  RowRuns<T> dirs, ups;
  T ups_scale;
  EnvRows<T> gam;
  T gam_scale;

  // No matrices, unit scales; the with_ functions add them.
  static BackwardMatrices none() { return {{nullptr, 0, 0}, T(1), {}, {}, T(1), {nullptr, 0, 0}, T(1)}; }
  BackwardMatrices with_lam(EnvRows<T> rows, T scale) const {
    BackwardMatrices out = *this;
    out.lam = rows, out.lam_scale = scale;
    return out;
  }
  BackwardMatrices with_directions(const RowRuns<T>& directions, const RowRuns<T>& upstream, T upstream_scale) const {
    BackwardMatrices out = *this;
    out.dirs = directions, out.ups = upstream, out.ups_scale = upstream_scale;
    return out;
  }
  BackwardMatrices with_gam(EnvRows<T> rows, T scale) const {
    BackwardMatrices out = *this;
    out.gam = rows, out.gam_scale = scale;
    return out;
  }
};

template <typename T>
void head_stats_keeping_dots(const Head<T>& h, const Segments& s, StatsLayout layout, const RowRuns<T>& dirs, T* work,
                             T* out, T* dots_out, Launch launch);
template <typename T>
bool per_sample_backward_from_dots(const Head<T>& h, const Segments& s, BackwardLayout layout,
                                   const BackwardMatrices<T>& mats, HeadTerm<T> head, T* work, T* d_logits,
                                   T* d_features, Launch launch, const KnownDots<T>* known);

// Writes the state and the two penalty terms (hessian[0], gradient[0]).
template <typename T>
void plan_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                  Launch launch);

// d_logits (N, C) and d_features (N, D) of alpha * hessian + beta * gradient, from the forward's state;
// `head` as in per_sample_backward (returns whether head.weight_grad was written).
template <typename T>
bool plan_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                   HeadTerm<T> head, T* d_logits, T* d_features, Launch launch);

}  // namespace hgk
