// The two primitives of hgkernels/backends/base.py, implemented once per device (CPU in
// cpu_kernels.cpp, CUDA in cuda_kernels.cu) over the per-sample math of hgk_math.h.
// Samples are read through the environment segments (order, offsets); "row j" of a work
// buffer is the j-th sample in that sorted order, while logits, features and outputs keep
// the caller's rows. Every sum runs in a fixed order that does not depend on the thread
// count or launch shape, so results are deterministic. The CPU kernels also export the two in the
// form the plans of hgk_plans.h call them (head_stats_keeping_dots, per_sample_backward_from_dots).
#pragma once

#include <cstdint>

#include "hgk_math.h"

namespace hgk {

// One problem's inputs, all on the kernel's device. Feature columns are contiguous.
template <typename T>
struct Head {
  const T* logits;
  int64_t logits_row_stride, logits_col_stride;
  const T* features;
  int64_t features_row_stride;
  const int64_t* labels;  // (N,) class ids for cross_entropy, else nullptr
  const T* targets;       // (N, C) contiguous float targets, else nullptr
  int loss, C, D;
  bool bias;
  HGK_HOST_DEVICE int head_width() const { return D + (bias ? 1 : 0); }
  HGK_HOST_DEVICE Target<T> target(int64_t i) const { return {labels ? labels[i] : 0, targets ? targets + i * C : nullptr}; }
};

struct Segments {
  const int64_t* order;    // (N,) sample index of each sorted position
  const int64_t* offsets;  // (E + 1,) first sorted position of each environment
  int64_t num_samples;
  int num_envs;
  const int64_t* env_ids;  // (N,) environment of each sample, in the caller's row order; nullptr (CPU kernels):
                           // the samples are those `order` lists (a run of a plan's environments), read in it
};

struct Launch {
  int threads;       // CPU: OpenMP threads (torch.get_num_threads())
  uintptr_t stream;  // CUDA: cudaStream_t of the current torch stream
};

// A linear head fused into the per-sample backward (hgkernels/fused_head.py): d_logits gets extra
// (N, C, caller's rows: the ERM and upstream logit gradients) added, and d_features gets the head's
// own term d_logits @ weight[:, :D] (weight (C, Dh) rows, bias column unused). weight == nullptr: none.
// weight_grad (C, Dh) or nullptr: where the CPU kernels' one-row path also writes the head's gradient
// sum_i d_logits_i zh_i^T while each row is in cache (per_sample_backward returns whether it did).
template <typename T>
struct HeadTerm {
  const T* weight;
  const T* extra;
  T* weight_grad;
};

// Work buffer elements per sample (the caller allocates N times this, in T).
HGK_HOST_DEVICE int64_t stats_work_per_sample(StatsLayout layout) {
  return int64_t(layout.K) * layout.C + layout.C + layout.width();  // s_k, p, coefficients
}
HGK_HOST_DEVICE int64_t backward_work_per_sample(BackwardLayout layout) {
  return 2 * int64_t(layout.width()) + 4 * int64_t(layout.C);  // dots, dots_sq, p, dp, coef, coef_sq
}

// The per-sample backward's work buffer carved into its arrays (N rows each, widths as in
// backward_work_per_sample): both devices lay it out through this one struct.
template <typename T>
struct BackwardWork {
  T* dots;     // (N, W) upstream matrices applied to zh
  T* dots_sq;  // (N, C) Gam applied to zh ⊙ zh
  T* scratch;  // (N, 2C) p and dp
  T* coef;     // (N, W) coefficients of the expansion back to features
  T* coef_sq;  // (N, C) coefficients against zh ⊙ Gam
  HGK_HOST_DEVICE BackwardWork(T* work, int64_t N, BackwardLayout layout)
      : dots(work),
        dots_sq(dots + N * layout.width()),
        scratch(dots_sq + N * layout.C),
        coef(scratch + 2 * N * layout.C),
        coef_sq(coef + N * layout.width()) {}
};

// The two primitives, defined once per device in a namespace of its own, hgk::cpu (cpu_kernels.cpp) and
// hgk::cuda (cuda_kernels.cu), so both link into one module.
//
// head_stats: per-environment statistics, out (E, W, Dh) with W = layout.width() rows per environment,
// out[e] = sum_{j in e} coef_j^T zh_j (zh_j ⊙ zh_j for the hess_diag rows), coef_j the
// StatsLayout row of sample j. dirs (E, K*C, Dh) holds the HVP directions V_k.
//
// per_sample_backward: the per-environment matrices, in BackwardLayout's order, arrive as separate
// contiguous arrays (so callers need not concatenate them): grad_up = Lam (E, C, Dh) or nullptr,
// dirs = V and ups = U (E, K*C, Dh) each (K may be 0), gam = dPsi/dDg (E, C, Dh) or nullptr.
// Writes d_logits (N, C) and d_features (N, D), contiguous, in the caller's rows. `head` is taken by the
// CPU kernels only; the CUDA caller passes none (hgkernels/backends/native.py adds it with torch ops).
// Returns whether head.weight_grad was written.
#define HGK_DECLARE_PRIMITIVES                                                                                  \
  template <typename T>                                                                                       \
  void head_stats(const Head<T>& h, const Segments& s, StatsLayout layout, const T* dirs, T* work, T* out,     \
                  Launch launch);                                                                             \
  template <typename T>                                                                                       \
  bool per_sample_backward(const Head<T>& h, const Segments& s, BackwardLayout layout, const T* grad_up,       \
                           const T* dirs, const T* ups, const T* gam, HeadTerm<T> head, T* work, T* d_logits,  \
                           T* d_features, Launch launch);
namespace cpu {
HGK_DECLARE_PRIMITIVES
}
namespace cuda {
HGK_DECLARE_PRIMITIVES
}
#undef HGK_DECLARE_PRIMITIVES

// The CPU primitives in the form the plans (hgk_plans.h) call them, defined in cpu_kernels.cpp only: on
// per-environment matrices where a caller holds them (EnvRows, RowRuns, BackwardMatrices) rather than in
// stacked arrays, and with the direction dots s_k = V_k zh_i passed between them: head_stats_keeping_dots
// can also write them (dots_out, (N, K C) in the caller's rows), and per_sample_backward_from_dots can take
// the dots of its V and U blocks instead of computing them (each of the N caller's rows holds K C values at
// its row stride; dots of the Lam and Gam rows are computed).
// lam_add and gam_add (N, C), caller's rows, or nullptr: added to the computed Lam and Gam dots before the
// closed form (the pair plan's within-environment part, hgk_plans.h).
template <typename T>
struct KnownDots {
  const T* dirs;
  int64_t dirs_stride;
  const T* ups;
  int64_t ups_stride;
  const T* lam_add = nullptr;
  const T* gam_add = nullptr;
  // The plans over pairs: each row's d_features gets sum_{j in e} lin_ij zh_j (+ zh_i ⊙ sum_j sq_ij (zh_j ⊙ zh_j)
  // with pair_squares) right after its own expansion, while it is in cache. pair_coef holds (lin, sq) of each
  // ordered pair of environment e's a-th and b-th sorted rows at pair_at[e] + 2 (a n_e + b); position maps the
  // caller's rows to sorted positions of `pairs` (nullptr: none).
  const Segments* pairs = nullptr;
  const T* pair_coef = nullptr;
  const int64_t* pair_at = nullptr;
  const int64_t* position = nullptr;
  bool pair_squares = false;
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

// The statistics' reduction alone: out[e] = sum_{j in e} coef_j^T zh_j (zh_j ⊙ zh_j in the hess_diag rows), coef
// (N, layout.width()) in sorted rows (head_stats_keeping_dots forms them from the closed form).
template <typename T>
void reduce_coefficients(const Head<T>& h, const Segments& s, StatsLayout layout, const T* coef, T* out,
                         Launch launch);
// out (N, rows) in sorted rows: a (rows, Dh) matrix applied to every zh_j (the bias column included).
template <typename T>
void matrix_dots(const Head<T>& h, const Segments& s, const T* mats, int rows, T* out, Launch launch);
template <typename T>
void head_stats_keeping_dots(const Head<T>& h, const Segments& s, StatsLayout layout, const RowRuns<T>& dirs, T* work,
                             T* out, T* dots_out, Launch launch);
template <typename T>
bool per_sample_backward_from_dots(const Head<T>& h, const Segments& s, BackwardLayout layout,
                                   const BackwardMatrices<T>& mats, HeadTerm<T> head, T* work, T* d_logits,
                                   T* d_features, Launch launch, const KnownDots<T>* known);

// Each device's source defines the two primitives and instantiates them for float and double here,
// inside its namespace (hgk::cpu or hgk::cuda), so the signatures are written once.
#define HGK_INSTANTIATE_PRIMITIVES(T)                                                                          \
  template void head_stats<T>(const Head<T>&, const Segments&, StatsLayout, const T*, T*, T*, Launch);        \
  template bool per_sample_backward<T>(const Head<T>&, const Segments&, BackwardLayout, const T*, const T*,   \
                                       const T*, const T*, HeadTerm<T>, T*, T*, T*, Launch);

}  // namespace hgk
