// The penalty plans of hgk_plans.h over the CPU kernels. Per-environment tensors are (E, rows, Dh)
// blocks of M = C * Dh elements; scratch memory is uninitialised (no zero fill) and comes from the
// calling thread's ScratchArena.
#include <algorithm>
#include <memory>
#include <vector>

#include "hgk_plans.h"
#include "hgk_tuning.h"

namespace hgk {
namespace {

// Scratch memory of one plan call, kept by the calling thread for its next call (up to kScratchKeptBytes).
// Fresh heap arrays each call make the allocator give memory back to the system and fault it in again.
// Never handed out of the plans: the outputs are the caller's tensors.
class ScratchArena {
 public:
  // bytes of storage (64-byte multiples, so arrays start on cache lines) valid until the scope ends
  char* take(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    wanted_ += bytes;
    if (used_ + bytes <= capacity_) {
      char* out = kept_.get() + used_;
      used_ += bytes;
      return out;
    }
    overflow_.emplace_back(new char[bytes]);  // kept_ is full: the arrays handed out stay where they are
    return overflow_.back().get();
  }

  // Opened by each plan entry point; the outermost scope's end frees the call's scratch.
  struct Scope {
    ScratchArena& arena;
    Scope() : arena(ScratchArena::mine()) { ++arena.depth_; }
    ~Scope() {
      if (--arena.depth_ == 0) arena.reset();
    }
  };

  static ScratchArena& mine() {
    thread_local ScratchArena arena;
    return arena;
  }

 private:
  void reset() {
    if (!overflow_.empty()) {  // next time, one kept block of what this call took (if not too large)
      overflow_.clear();
      kept_.reset();
      capacity_ = wanted_ <= kScratchKeptBytes ? wanted_ : 0;
      if (capacity_) kept_.reset(new char[capacity_]);
    }
    used_ = wanted_ = 0;
  }

  std::unique_ptr<char[]> kept_;
  size_t capacity_ = 0, used_ = 0, wanted_ = 0;
  std::vector<std::unique_ptr<char[]>> overflow_;
  int depth_ = 0;
};

template <typename T>
T* scratch(int64_t n) {
  return reinterpret_cast<T*>(ScratchArena::mine().take(sizeof(T) * size_t(std::max<int64_t>(n, 1))));
}

// Passes over (E, M) blocks run on one thread below kMinParallelElements, in chunks of kPassChunk columns.

// out[k] = (sum_e x[e * stride + k]) / E, summed in environment order (torch's mean(0)); in chunks
// that stay in L1 between the passes.
template <typename T>
void env_mean(const T* x, int64_t stride, int E, int64_t M, T* out) {
  for (int64_t k0 = 0; k0 < M; k0 += kPassChunk) {
    const int64_t k1 = std::min(k0 + kPassChunk, M);
    std::copy(x + k0, x + k1, out + k0);
    for (int e = 1; e < E; ++e)
      for (int64_t k = k0; k < k1; ++k) out[k] += x[e * stride + k];
    for (int64_t k = k0; k < k1; ++k) out[k] /= T(E);
  }
}

// sum_k d[k]^2 with d = x - ref (ref nullptr: zero) rounded to T as the plans keep it, written to dev
// (nullptr: not kept; may alias x). The squares are summed in double in 16 fixed lanes, vector
// accumulators that stay in registers (a plain lane array is kept on the stack: a store-to-load
// chain per add).
template <typename T>
double squared_deviation(const T* x, const T* ref, int64_t n, T* dev) {
  typedef T Octet __attribute__((vector_size(8 * sizeof(T)), aligned(sizeof(T))));
  typedef double Lanes __attribute__((vector_size(64)));
  Lanes acc0 = {}, acc1 = {};
  auto add = [&](int64_t i, Lanes& acc) {
    Octet d = *reinterpret_cast<const Octet*>(x + i);
    if (ref) d -= *reinterpret_cast<const Octet*>(ref + i);
    if (dev) *reinterpret_cast<Octet*>(dev + i) = d;
    const Lanes wide = __builtin_convertvector(d, Lanes);
    acc += wide * wide;
  };
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) add(k, acc0), add(k + 8, acc1);
  double total = 0;
  for (const Lanes& acc : {acc0, acc1})
    for (int l = 0; l < 8; ++l) total += acc[l];
  for (; k < n; ++k) {
    const T d = ref ? T(x[k] - ref[k]) : x[k];
    if (dev) dev[k] = d;
    total += double(d) * double(d);
  }
  return total;
}

// One deviation pass of a plan over (E, M) blocks: mean = the mean over environments of `of` (stride
// of_stride; of nullptr: `mean` is given) and d_e = x_e - mean for x_e = x + e * x_stride (x nullptr: the
// mean only), written to dev + e * dev_stride (dev nullptr: not kept; may alias x); `sum` receives
// sum_e sum_k d_e[k]^2.
template <typename T>
struct Deviations {
  const T* of;
  int64_t of_stride;
  const T* x;
  int64_t x_stride;
  T* mean;  // nullptr: not kept
  T* dev;
  int64_t dev_stride;
  double sum;

  // The mean over environments of `of` (E blocks, `stride` apart); with for_blocks, deviations from it.
  static Deviations mean_of(const T* of, int64_t stride) {
    Deviations job{};
    job.of = of, job.of_stride = stride;
    return job;
  }
  // A given mean (with for_blocks: deviations from it).
  static Deviations given_mean(T* mean) {
    Deviations job{};
    job.mean = mean;
    return job;
  }
  // x_e - mean(x), written over x: the mean is not kept.
  static Deviations in_place(T* x, int64_t stride) {
    return mean_of(x, stride).for_blocks(x, stride).writing(x, stride);
  }
  // Keeps the mean in `out`.
  Deviations keeping_mean(T* out) const {
    Deviations job = *this;
    job.mean = out;
    return job;
  }
  // The deviations d_e = x_e - mean of x (E blocks, `stride` apart), their squares summed into `sum`.
  Deviations for_blocks(const T* blocks, int64_t stride) const {
    Deviations job = *this;
    job.x = blocks, job.x_stride = stride;
    return job;
  }
  // Keeps d_e at out + e * stride.
  Deviations writing(T* out, int64_t stride) const {
    Deviations job = *this;
    job.dev = out, job.dev_stride = stride;
    return job;
  }
};

// The jobs' passes in chunks of columns that stay in L1 between the environments, split among threads
// (serial, they are a visible part of a small head's call). Each chunk sums its squares in double
// (squared_deviation), then `sum` adds the chunks in order: the same bits for any thread count.
template <typename T>
void deviations(Deviations<T>* jobs, int num_jobs, int E, int64_t M, Launch launch) {
  const int64_t chunks = (M + kPassChunk - 1) / kPassChunk, tasks = num_jobs * chunks;
  double* partial = scratch<double>(tasks);  // on the calling thread: its arena is the call's
  const int threads = int64_t(E) * M * num_jobs >= kMinParallelElements ? launch.threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tasks; ++t) {
    // chunk-major: each thread gets every job's chunks of its columns (jobs differ in work)
    const int64_t job_index = t % num_jobs, chunk = t / num_jobs;
    const Deviations<T>& job = jobs[job_index];
    const int64_t k0 = chunk * kPassChunk, n = std::min(kPassChunk, M - k0);
    T chunk_mean[kPassChunk];
    T* mean = job.mean ? job.mean + k0 : chunk_mean;
    if (job.of) env_mean(job.of + k0, job.of_stride, E, n, mean);
    double total = 0;
    for (int e = 0; job.x && e < E; ++e)
      total += squared_deviation<T>(job.x + e * job.x_stride + k0, mean, n,
                                    job.dev ? job.dev + e * job.dev_stride + k0 : nullptr);
    partial[job_index * chunks + chunk] = total;
  }
  for (int j = 0; j < num_jobs; ++j) {
    jobs[j].sum = 0;
    for (int64_t c = 0; c < chunks; ++c) jobs[j].sum += partial[j * chunks + c];
  }
}

// HGP's direction (or upstream) rows: environment e's per_env block (E, C, Dh), then with `shared` the block
// every environment shares (G_bar, or its upstream).
template <typename T>
RowRuns<T> env_then_shared(const T* per_env, const T* shared, int C, int64_t Dh) {
  RowRuns<T> runs = RowRuns<T>::stacked(per_env, C, Dh);
  if (shared) runs.run[1] = EnvRows<T>::shared(shared, C);
  return runs;
}

// The statistics the plans take: per environment G_e (and Dg_e with hess_diag), or the K HVPs H_e V_k.
StatsLayout gradient_stats(int C, bool hess_diag) {
  return {C, /*K=*/0, /*gradient=*/true, hess_diag, /*square_residual=*/false};
}
StatsLayout hvp_stats(int C, int K) {
  return {C, K, /*gradient=*/false, /*hess_diag=*/false, /*square_residual=*/false};
}

// Statistics with a work buffer of the layout's size (and, with dots_out, the direction dots kept).
template <typename T>
void stats(const Head<T>& h, const Segments& s, StatsLayout layout, const RowRuns<T>& dirs, T* out, Launch launch,
           T* dots_out = nullptr) {
  T* work = scratch<T>(s.num_samples * stats_work_per_sample(layout));
  head_stats_keeping_dots<T>(h, s, layout, dirs, work, out, dots_out, launch);
}

template <typename T>
void exact_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                   Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  stats<T>(h, s, gradient_stats(C, /*hess_diag=*/true), RowRuns<T>{}, state, launch);  // per env [G_e][Dg_e]
  Deviations<T> blocks[2];  // deviations from the mean over environments, in place
  for (int b = 0; b < 2; ++b) blocks[b] = Deviations<T>::in_place(state + b * M, 2 * M);
  deviations(blocks, 2, E, M, launch);
  *gradient = T(spec.weight * blocks[0].sum);
  *hessian = T(spec.weight * blocks[1].sum);
}

template <typename T>
bool exact_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                    HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  // Lam = 2 R_e beta (G_e - G_bar), Gam = 2 R_e alpha (Dg_e - mean Dg): the state's blocks, scaled
  const T lam_scale = T(2 * spec.weight * beta), gam_scale = T(2 * spec.weight * alpha);
  // A term whose upstream is zero adds nothing, and its blocks are left out rather than multiplied by zero:
  // their unscaled dots may overflow where that term did (0 * inf would be NaN in the other term's gradient).
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam({with_gradient ? state : nullptr, 2 * M, C}, lam_scale)
                                       .with_gam({with_hessian ? state + M : nullptr, 2 * M, C}, gam_scale);
  const BackwardLayout layout{C, /*K=*/0, /*gradient=*/with_gradient, /*hess_diag=*/with_hessian,
                              /*square_residual=*/false};
  T* work = scratch<T>(s.num_samples * backward_work_per_sample(layout));
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch, nullptr);
}

template <typename T>
void hgp_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                 Launch launch) {
  const int E = s.num_envs, C = h.C, K = spec.pooled ? 2 : 1;
  const int64_t M = int64_t(C) * h.head_width();
  T *grad = state, *grad_mean = grad + E * M, *hgp_dev = grad_mean + M, *dir_dots = hgp_dev + E * M;
  stats<T>(h, s, gradient_stats(C, /*hess_diag=*/false), RowRuns<T>{}, grad, launch);
  Deviations<T> grad_mean_pass = Deviations<T>::mean_of(grad, M).keeping_mean(grad_mean);
  deviations(&grad_mean_pass, 1, E, M, launch);
  // directions G_e, then G_bar for the pooled reference H_bar G_bar
  const RowRuns<T> dirs = env_then_shared<T>(grad, K == 2 ? grad_mean : nullptr, C, h.head_width());
  T* hv = scratch<T>(E * K * M);
  stats<T>(h, s, hvp_stats(C, K), dirs, hv, launch, dir_dots);
  // H_e G_e - ref with ref = mean_e H_e G_bar (pooled) or mean_e H_e G_e, and G_e - G_bar
  Deviations<T> devs[2] = {
      Deviations<T>::mean_of(hv + (K == 2 ? M : 0), K * M).for_blocks(hv, K * M).writing(hgp_dev, M),
      Deviations<T>::given_mean(grad_mean).for_blocks(grad, M)};
  deviations(devs, 2, E, M, launch);
  *hessian = T(spec.weight * devs[0].sum);
  *gradient = T(spec.weight * devs[1].sum);
}

template <typename T>
bool hgp_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                  HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const T *grad = state, *grad_mean = grad + E * M, *hgp_dev = grad_mean + M, *dir_dots = hgp_dev + E * M;
  // An undetached pooled reference S_ref = (1/E) sum_e H_e G_bar receives -sum_e Gam_e through G_bar.
  const bool shared = spec.pooled && !spec.detach_reference;
  // The upstream U of the directions is gam_scale times [hgp_dev_e][ref_up]: the scale goes to U's dots and
  // coefficients (BackwardMatrices) and to H_e U below, not to a scaled copy.
  const T gam_scale = T(2 * spec.weight * alpha), lam_scale = T(2 * spec.weight * beta);
  // A term whose upstream is zero adds nothing, and its blocks are left out (as in exact_backward).
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);
  const int K = with_hessian ? (shared ? 2 : 1) : 0;  // without the Hessian term no direction gets a gradient
  T* ref_up = nullptr;
  if (shared && with_hessian) {
    ref_up = scratch<T>(M);
    // sum_e Gam_e / E, negated below
    Deviations<T> mean_pass = Deviations<T>::mean_of(hgp_dev, M).keeping_mean(ref_up);
    deviations(&mean_pass, 1, E, M, launch);
    for (int64_t k = 0; k < M; ++k) ref_up[k] = -ref_up[k];
  }
  const RowRuns<T> dirs = env_then_shared<T>(grad, shared ? grad_mean : nullptr, C, h.head_width());
  const RowRuns<T> ups = env_then_shared<T>(hgp_dev, ref_up, C, h.head_width());
  // dPsi/dV = H_e U: the gradient reaching the directions G_e (and G_bar, shared out by 1/E)
  T* dir_grads = scratch<T>(E * K * M);
  T* up_dots = scratch<T>(s.num_samples * K * C);  // U_k zh_i (unscaled), which the per-sample backward reuses
  if (with_hessian) stats<T>(h, s, hvp_stats(C, K), ups, dir_grads, launch, up_dots);
  T* to_mean = nullptr;
  if (shared && with_hessian) {
    to_mean = scratch<T>(M);
    Deviations<T> mean_pass = Deviations<T>::mean_of(dir_grads + M, 2 * M).keeping_mean(to_mean);
    deviations(&mean_pass, 1, E, M, launch);
  }
  T* grad_up = scratch<T>(E * M);  // Lam = 2 R_e beta (G_e - G_bar), plus the directions' gradients
  const int64_t chunks = (M + kPassChunk - 1) / kPassChunk;
#pragma omp parallel for schedule(static) num_threads(int64_t(E) * M >= kMinParallelElements ? launch.threads : 1)
  for (int64_t t = 0; t < E * chunks; ++t) {
    const int e = int(t / chunks);
    for (int64_t k = t % chunks * kPassChunk, end = std::min(k + kPassChunk, M); k < end; ++k) {
      T total = with_gradient ? T(lam_scale * T(grad[e * M + k] - grad_mean[k])) : T(0);
      if (with_hessian) total += gam_scale * (shared ? T(dir_grads[e * K * M + k] + to_mean[k]) : dir_grads[e * K * M + k]);
      grad_up[e * M + k] = total;
    }
  }
  const BackwardLayout layout{C, K, /*gradient=*/with_gradient || with_hessian, /*hess_diag=*/false,
                              /*square_residual=*/false};
  T* work = scratch<T>(s.num_samples * backward_work_per_sample(layout));
  // The V and U blocks' dots are the forward's G_e zh_i (and G_bar zh_i) and the pass above's U zh_i:
  // only the Lam rows' dots are computed (a third of them).
  const KnownDots<T> known{/*dirs=*/dir_dots, /*dirs_stride=*/int64_t(spec.pooled ? 2 : 1) * C, /*ups=*/up_dots,
                          /*ups_stride=*/int64_t(K) * C};
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam(EnvRows<T>::stacked(grad_up, C, h.head_width()), T(1))
                                       .with_directions(K ? dirs : RowRuns<T>{}, K ? ups : RowRuns<T>{}, gam_scale);
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch,
                                          K ? &known : nullptr);
}

}  // namespace

int64_t plan_state_size(PlanSpec spec, int num_samples, int num_envs, int C, int head_width) {
  const int64_t M = int64_t(C) * head_width;
  if (spec.method == EXACT_DIAG) return 2 * num_envs * M;
  return (2 * num_envs + 1) * M + int64_t(num_samples) * (spec.pooled ? 2 : 1) * C;
}

template <typename T>
void plan_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                  Launch launch) {
  ScratchArena::Scope scope;
  if (spec.method == EXACT_DIAG)
    exact_forward<T>(h, s, spec, state, hessian, gradient, launch);
  else
    hgp_forward<T>(h, s, spec, state, hessian, gradient, launch);
}

template <typename T>
bool plan_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                   HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  ScratchArena::Scope scope;
  if (spec.method == EXACT_DIAG)
    return exact_backward<T>(h, s, spec, state, alpha, beta, head, d_logits, d_features, launch);
  return hgp_backward<T>(h, s, spec, state, alpha, beta, head, d_logits, d_features, launch);
}

#define HGK_INSTANTIATE_PLANS(T)                                                                                \
  template void plan_forward<T>(const Head<T>&, const Segments&, PlanSpec, T*, T*, T*, Launch);                \
  template bool plan_backward<T>(const Head<T>&, const Segments&, PlanSpec, const T*, double, double,          \
                                 HeadTerm<T>, T*, T*, Launch);
HGK_INSTANTIATE_PLANS(float)
HGK_INSTANTIATE_PLANS(double)
#undef HGK_INSTANTIATE_PLANS

}  // namespace hgk
