// The penalty plans of hgkernels/penalties (ExactDiagPlan, HGPPlan and FishrPlan, feature form) for the CPU
// module, next to its kernels: one call per direction runs the statistics, the deviations, the
// penalty sums and the backward's upstream algebra, where the Python plans make a dozen small torch
// ops per direction (a small head's time is mostly that host path). Same formulas as the Python
// plans, which the other backends, the distributed path and torch.compile keep using; the tests
// compare the two on every shape they draw. Sums run in a fixed order (thread-count independent).
// Built on the CPU primitives of hgk_kernels.h.
#pragma once

#include <cstdint>

#include "hgk_kernels.h"

namespace hgk {

enum PlanMethod : int { EXACT_DIAG = 0, HGP = 1, FISHR = 2 };

// FISHR (hgkernels/penalties/fishr.py) is one term, `hessian` = weight sum_e ||v_e - v_bar||^2 over the
// environments' per-sample head-gradient variances v_e, and `gradient` = 0; it runs the exact plan's forms on
// [G_e][v_e] (cpu_plans.cpp term_blocks), never the pairs.
struct PlanSpec {
  int method;             // PlanMethod
  double weight;          // R_e: 1/E ('mean' over environments) or 1 ('sum'); Fishr: times 1/(C Dh) for its
                          // mean over the head's coordinates
  bool pooled;            // HGP: the reference is H_bar G_bar (pooled) rather than mean_e H_e G_e
  bool detach_reference;  // HGP pooled: whether the reference receives no gradient
  // HGP with a pooled reference needs a second direction (G_bar) only with E > 1: the caller
  // passes pooled = (reference == "pooled" and E > 1), as the Python plan does.
};

// Elements of the state a forward leaves for its backward:
// exact (E, 2C, Dh): per environment [G_e - G_bar][Dg_e - mean Dg] (Fishr: [G_e][v_e - v_bar]);
// HGP: G (E, C, Dh), G_bar (C, Dh), H_e G_e - reference (E, C, Dh), then each sample's direction dots
// (N, K C), K = 2 with pooled else 1: [G_e zh_i][G_bar zh_i], which the backward reuses.
// Beyond kPlanStateElements per-environment entries (E x C x Dh, hgk_tuning.h) the plans keep none of them
// (they take pairs of samples within small environments, else runs of environments): exact [G_bar][mean Dg]
// (Fishr: [0][v_bar], runs only)
// (and, over pairs, each environment's n_e x n_e pair dots K and Q); HGP [G_bar][S_ref][mean_e S_e] and N K C
// entries (cpu_plans.cpp).
int64_t plan_state_size(PlanSpec spec, const Segments& s, int C, int head_width);

// Whether the plans take pairs of samples within each environment (beyond kPlanStateElements, with
// sum_e n_e^2 <= N C): they then form no environment's statistics (the cost model of form="auto" asks).
bool plans_over_pairs(const Segments& s, int C, int head_width);

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
