// The penalty plans of hgk_plans.h over the CPU kernels. Per-environment tensors are (E, rows, Dh)
// blocks of M = C * Dh elements; scratch memory is uninitialised (no zero fill) and comes from the
// calling thread's ScratchArena.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
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

// fn(e, k0, k1) for column chunks [k0, k1) of E blocks of M entries, split among threads (elementwise work).
template <typename Fn>
void each_block_chunk(int E, int64_t M, Launch launch, Fn&& fn) {
  const int64_t chunks = (M + kPassChunk - 1) / kPassChunk, tasks = E * chunks;
#pragma omp parallel for schedule(static) num_threads(int64_t(E) * M >= kMinParallelElements ? launch.threads : 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t k0 = (t % chunks) * kPassChunk;
    fn(int(t / chunks), k0, std::min(k0 + kPassChunk, M));
  }
}

// Fishr's variances Dr_e - G_e ⊙ G_e at columns [k0, k1) of one environment's block [G_e][Dr_e] (M entries each),
// into v[0, k1 - k0) (may be the Dr_e entries themselves).
template <typename T>
void variance_of(const T* block, int64_t M, int64_t k0, int64_t k1, T* v) {
  for (int64_t k = k0; k < k1; ++k) v[k - k0] = block[M + k] - block[k] * block[k];
}

// The per-environment blocks whose deviations are the exact plan's two terms, [G_e][Dg_e], or Fishr's one,
// [G_e][v_e]: v_e = Dr_e - G_e ⊙ G_e, Dr_e the square_residual statistic (the per-sample head gradients'
// second moment), so v_e is their variance (without `variances`, Dr_e: the caller forms v_e in a pass of its own).
// (E, 2M) blocks in out.
template <typename T>
void term_blocks(const Head<T>& h, const Segments& s, int method, T* out, Launch launch, bool variances = true) {
  const bool fishr = method == FISHR;
  const int64_t M = int64_t(h.C) * h.head_width();
  stats<T>(h, s, {h.C, /*K=*/0, /*gradient=*/true, /*hess_diag=*/true, /*square_residual=*/fishr}, RowRuns<T>{}, out,
           launch);
  if (fishr && variances)
    each_block_chunk(s.num_envs, M, launch, [&](int e, int64_t k0, int64_t k1) {
      T* g = out + e * 2 * M;
      variance_of(g, M, k0, k1, g + M + k0);
    });
}

// The blocks' terms: the exact plan's deviations of both blocks, Fishr's of the second only (its G_e enters
// through v_e alone).
int first_term_block(int method) { return method == FISHR ? 1 : 0; }

// Fishr's upstream of G_e, -2 G_e ⊙ (v_e - v_bar) (its Gam_e is v_e - v_bar; both scaled by 2 R alpha), from
// E blocks [G_e][v_e - v_bar] into out (stride out_stride; may be the G_e blocks themselves).
template <typename T>
void fishr_lam(const T* blocks, int E, int64_t M, T* out, int64_t out_stride, Launch launch) {
  each_block_chunk(E, M, launch, [&](int e, int64_t k0, int64_t k1) {
    const T* g = blocks + e * 2 * M;
    T* lam = out + e * out_stride;
    for (int64_t k = k0; k < k1; ++k) lam[k] = T(-2) * g[k] * g[M + k];
  });
}

// exact (and Fishr), forward: state per environment [G_e - G_bar][Dg_e - mean Dg] (Fishr: [G_e][v_e - v_bar]).
template <typename T>
void exact_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                   Launch launch) {
  const int E = s.num_envs, first = first_term_block(spec.method);
  const int64_t M = int64_t(h.C) * h.head_width();
  term_blocks<T>(h, s, spec.method, state, launch);
  Deviations<T> blocks[2];  // deviations from the mean over environments, in place
  for (int b = first; b < 2; ++b) blocks[b] = Deviations<T>::in_place(state + b * M, 2 * M);
  deviations(blocks + first, 2 - first, E, M, launch);
  *gradient = first ? T(0) : T(spec.weight * blocks[0].sum);
  *hessian = T(spec.weight * blocks[1].sum);
}

// The per-sample backward of the exact plan's (or Fishr's) blocks: Lam and Gam rows, (E, C, Dh) each at the
// given strides, with their scales.
template <typename T>
bool term_blocks_backward(const Head<T>& h, const Segments& s, PlanSpec spec, EnvRows<T> lam, T lam_scale,
                          EnvRows<T> gam, T gam_scale, HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  // A term whose upstream is zero adds nothing, and its blocks are left out rather than multiplied by zero:
  // their unscaled dots may overflow where that term did (0 * inf would be NaN in the other term's gradient).
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);
  if (!with_gradient) lam.data = nullptr;
  if (!with_hessian) gam.data = nullptr;
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none().with_lam(lam, lam_scale).with_gam(gam, gam_scale);
  const BackwardLayout layout{h.C, /*K=*/0, with_gradient, with_hessian, /*square_residual=*/spec.method == FISHR};
  T* work = scratch<T>(s.num_samples * backward_work_per_sample(layout));
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch, nullptr);
}

// The scales of Lam and Gam: 2 R beta and 2 R alpha (exact); 2 R alpha both (Fishr, whose one term is `hessian`).
struct TermScales {
  double lam, gam;
  TermScales(PlanSpec spec, double alpha, double beta)
      : lam(2 * spec.weight * (spec.method == FISHR ? alpha : beta)), gam(2 * spec.weight * alpha) {}
};

template <typename T>
bool exact_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                    HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const TermScales scales(spec, alpha, beta);
  EnvRows<T> lam{state, 2 * M, C};  // exact: Lam = 2 R beta (G_e - G_bar), Gam = 2 R alpha (Dg_e - mean Dg)
  if (spec.method == FISHR && scales.lam != 0) {
    T* fishr_up = scratch<T>(s.num_envs * M);
    fishr_lam<T>(state, s.num_envs, M, fishr_up, M, launch);
    lam = EnvRows<T>::stacked(fishr_up, C, h.head_width());
  }
  return term_blocks_backward<T>(h, s, spec, lam, T(scales.lam), {state + M, 2 * M, C}, T(scales.gam), head, d_logits,
                                 d_features, launch);
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

// HGP's upstream of G_e: Lam = lam_scale (G_e - G_bar) plus the directions' gradient gam_scale (H_e U_e [+ to_mean]),
// dir_grads (E, K C, Dh) [H_e U_e]... (nullptr: no Hessian term), to_mean the shared direction's part (or nullptr).
template <typename T>
void hgp_grad_up(const T* grad, const T* grad_mean, T lam_scale, const T* dir_grads, int K, const T* to_mean,
                 T gam_scale, int E, int64_t M, T* grad_up, Launch launch) {
  const bool with_gradient = lam_scale != T(0);
  const int64_t chunks = (M + kPassChunk - 1) / kPassChunk;
#pragma omp parallel for schedule(static) num_threads(int64_t(E) * M >= kMinParallelElements ? launch.threads : 1)
  for (int64_t t = 0; t < E * chunks; ++t) {
    const int e = int(t / chunks);
    for (int64_t k = t % chunks * kPassChunk, end = std::min(k + kPassChunk, M); k < end; ++k) {
      T total = with_gradient ? T(lam_scale * T(grad[e * M + k] - grad_mean[k])) : T(0);
      if (dir_grads)
        total += gam_scale * (to_mean ? T(dir_grads[e * K * M + k] + to_mean[k]) : dir_grads[e * K * M + k]);
      grad_up[e * M + k] = total;
    }
  }
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
  T* grad_up = scratch<T>(E * M);
  hgp_grad_up<T>(grad, grad_mean, lam_scale, with_hessian ? dir_grads : nullptr, K, to_mean, gam_scale, E, M, grad_up,
                 launch);
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


// ---------------------------------------------------------------------------------------------------
// Many environments (hgk_tuning.h): the plans in runs of environments, keeping no per-environment state.

bool in_runs(int num_envs, int64_t M) { return int64_t(num_envs) * M > kPlanStateElements; }

// A run of environments [begin, end) as segments of their own: its sorted rows, without ids (hgk_kernels.h).
struct EnvRun {
  int begin, end;
  std::vector<int64_t> offsets;  // rebased to the run's first sorted row
  Segments seg;
};

// Consecutive runs of about kEnvRunElements statistics entries (at least one environment each).
std::vector<EnvRun> env_runs_of(const Segments& s, int64_t M) {
  const int per_run = int(std::max<int64_t>(1, kEnvRunElements / M));
  std::vector<EnvRun> runs;
  for (int b = 0; b < s.num_envs; b += per_run) {
    EnvRun run{b, std::min(b + per_run, s.num_envs), {}, {}};
    for (int e = run.begin; e <= run.end; ++e) run.offsets.push_back(s.offsets[e] - s.offsets[b]);
    runs.push_back(std::move(run));
  }
  for (EnvRun& run : runs)
    run.seg = {s.order + s.offsets[run.begin], run.offsets.data(), run.offsets.back(), run.end - run.begin, nullptr};
  return runs;
}

// What the runs' buffers must hold: the most environments and the most samples of one run.
struct RunSizes {
  int envs = 0;
  int64_t samples = 0;
  explicit RunSizes(const std::vector<EnvRun>& runs) {
    for (const EnvRun& run : runs)
      envs = std::max(envs, run.seg.num_envs), samples = std::max(samples, run.seg.num_samples);
  }
};

// Adds E blocks of M entries (`stride` apart) into sum (double, environments in order) and returns their squares'
// total; in column chunks split among threads, added in chunk order: the same bits for any thread count. With
// `variances` the blocks are Fishr's [G_e][Dr_e] (`blocks` at G_e) and their variances v_e are added instead.
template <typename T>
double add_blocks(const T* blocks, int64_t stride, int E, int64_t M, double* sum, Launch launch,
                  bool variances = false) {
  const int64_t chunks = (M + kPassChunk - 1) / kPassChunk;
  std::vector<double> partial(chunks);
#pragma omp parallel for schedule(static) num_threads(int64_t(E) * M >= kMinParallelElements ? launch.threads : 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kPassChunk, n = std::min(kPassChunk, M - k0);
    T chunk_variances[kPassChunk];
    double total = 0;
    for (int e = 0; e < E; ++e) {
      const T* x = blocks + e * stride + k0;
      if (variances) variance_of(blocks + e * stride, M, k0, k0 + n, chunk_variances), x = chunk_variances;
      total += squared_deviation<T>(x, nullptr, n, nullptr);
      for (int64_t k = 0; k < n; ++k) sum[k0 + k] += double(x[k]);
    }
    partial[c] = total;
  }
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// sum_e ||x_e - ref||^2 = squares - 2 <sum, ref> + E ||ref||^2 from squares = sum_e ||x_e||^2 and sum = sum_e x_e, in
// double. It cancels where the environments nearly agree: below kExpandedMinShare of the squares the plans
// recompute it as a sum of squared deviations instead (it is then a small part of a term that rounding of the
// statistics themselves already bounds).
constexpr double kExpandedMinShare = 1.0 / 16;
double expanded_deviation(double squares, const double* sum, const double* ref, int E, int64_t M) {
  double cross = 0, ref_squares = 0;
  for (int64_t k = 0; k < M; ++k) cross += sum[k] * ref[k], ref_squares += ref[k] * ref[k];
  return squares - 2 * cross + E * ref_squares;
}

template <typename T>
void mean_into(const double* sum, int E, int64_t M, double* mean, T* mean_out) {
  for (int64_t k = 0; k < M; ++k) mean[k] = sum[k] / E, mean_out[k] = T(mean[k]);
}

double* zeros(int64_t n) {
  double* out = scratch<double>(n);
  std::fill(out, out + n, 0.0);
  return out;
}

// Where the expanded sums cancel: the exact plan's (or Fishr's) term over block `which` (term_blocks) as squared
// deviations sum_e ||x_e - mean||^2, forming the blocks again in runs.
template <typename T>
double exact_deviation_in_runs(const Head<T>& h, const Segments& s, int method, int which, const T* mean,
                               Launch launch) {
  const int64_t M = int64_t(h.C) * h.head_width();
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  T* block = scratch<T>(RunSizes(runs).envs * 2 * M);
  double total = 0;
  for (const EnvRun& run : runs) {
    term_blocks<T>(h, run.seg, method, block, launch);
    Deviations<T> job = Deviations<T>::given_mean(const_cast<T*>(mean)).for_blocks(block + which * M, 2 * M);
    deviations(&job, 1, run.seg.num_envs, M, launch);
    total += job.sum;
  }
  return total;
}

// The same for HGP: sum_e ||G_e - mean||^2 (hgp false) or sum_e ||H_e G_e - mean||^2 (hgp true).
template <typename T>
double hgp_deviation_in_runs(const Head<T>& h, const Segments& s, bool hgp, const T* mean, Launch launch) {
  const int C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  const int most_envs = RunSizes(runs).envs;
  T* grad = scratch<T>(most_envs * M);
  T* hv = hgp ? scratch<T>(most_envs * M) : nullptr;
  double total = 0;
  for (const EnvRun& run : runs) {
    stats<T>(h, run.seg, gradient_stats(C, false), RowRuns<T>{}, grad, launch);
    if (hgp) stats<T>(h, run.seg, hvp_stats(C, 1), RowRuns<T>::stacked(grad, C, h.head_width()), hv, launch);
    Deviations<T> job = Deviations<T>::given_mean(const_cast<T*>(mean)).for_blocks(hgp ? hv : grad, M);
    deviations(&job, 1, run.seg.num_envs, M, launch);
    total += job.sum;
  }
  return total;
}

// exact (and Fishr), forward: state [G_bar][mean Dg] (Fishr: [G_bar][v_bar]); one pass over the runs (squares and
// sums), a second one only where a term cancels.
template <typename T>
void exact_forward_runs(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                        Launch launch) {
  const int E = s.num_envs, first = first_term_block(spec.method);
  const int64_t M = int64_t(h.C) * h.head_width();
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  T* block = scratch<T>(RunSizes(runs).envs * 2 * M);  // per environment term_blocks
  double* sum = zeros(2 * M);
  double* mean = scratch<double>(2 * M);
  double squares[2] = {0, 0}, terms[2] = {0, 0};
  for (const EnvRun& run : runs) {
    term_blocks<T>(h, run.seg, spec.method, block, launch, /*variances=*/false);  // (Fishr's: formed as they are added)
    if (spec.method == FISHR)
      squares[1] += add_blocks<T>(block, 2 * M, run.seg.num_envs, M, sum + M, launch, /*variances=*/true);
    else
      for (int b = 0; b < 2; ++b)
        squares[b] += add_blocks<T>(block + b * M, 2 * M, run.seg.num_envs, M, sum + b * M, launch);
  }
  mean_into(sum, E, 2 * M, mean, state);
  for (int b = first; b < 2; ++b) {
    terms[b] = expanded_deviation(squares[b], sum + b * M, mean + b * M, E, M);
    if (terms[b] < kExpandedMinShare * squares[b])
      terms[b] = exact_deviation_in_runs<T>(h, s, spec.method, b, state + b * M, launch);
  }
  *gradient = T(spec.weight * terms[0]);
  *hessian = T(spec.weight * terms[1]);
}

// exact (and Fishr), backward: each run's blocks formed again, their deviations from the state's means (Fishr's
// Lam written over its G_e), then its rows' backward.
template <typename T>
bool exact_backward_runs(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha,
                         double beta, HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  const TermScales scales(spec, alpha, beta);
  T* block = scratch<T>(RunSizes(runs).envs * 2 * M);
  head.weight_grad = nullptr;  // (runs leave the head's gradient to the caller)
  for (const EnvRun& run : runs) {
    term_blocks<T>(h, run.seg, spec.method, block, launch, /*variances=*/false);
    if (spec.method == FISHR) {  // [G_e][Dr_e] -> [Lam_e][v_e - v_bar] in one pass
      each_block_chunk(run.seg.num_envs, M, launch, [&](int e, int64_t k0, int64_t k1) {
        T* g = block + e * 2 * M;
        variance_of(g, M, k0, k1, g + M + k0);
        for (int64_t k = k0; k < k1; ++k) g[M + k] -= state[M + k], g[k] = T(-2) * g[k] * g[M + k];
      });
    } else {
      Deviations<T> devs[2];
      for (int b = 0; b < 2; ++b)
        devs[b] = Deviations<T>::given_mean(const_cast<T*>(state + b * M))
                      .for_blocks(block + b * M, 2 * M)
                      .writing(block + b * M, 2 * M);
      deviations(devs, 2, run.seg.num_envs, M, launch);
    }
    term_blocks_backward<T>(h, run.seg, spec, {block, 2 * M, C}, T(scales.lam), {block + M, 2 * M, C}, T(scales.gam),
                            head, d_logits, d_features, launch);
  }
  return false;
}

// HGP's state beyond the state limit: [G_bar][S_ref][mean_e S_e] then, in runs, the direction dots as hgp_forward
// keeps them; over pairs, S_ref zh_j and, with the pooled reference, G_bar zh_j (sorted rows, (N, C) each) there
// instead (mean_e S_e is formed for an undetached pooled reference only).
template <typename T>
struct HGPRunState {
  T *grad_mean, *ref, *hgp_mean, *dir_dots;
  HGPRunState(T* state, int64_t M)
      : grad_mean(state), ref(state + M), hgp_mean(state + 2 * M), dir_dots(state + 3 * M) {}
};

// HGP's two terms from their expanded sums, each recomputed as squared deviations in runs where it cancels.
template <typename T>
void hgp_terms(const Head<T>& h, const Segments& s, PlanSpec spec, const HGPRunState<T>& st, double grad_term,
               double grad_squares, double hgp_term, double hgp_squares, T* hessian, T* gradient, Launch launch) {
  if (grad_term < kExpandedMinShare * grad_squares)
    grad_term = hgp_deviation_in_runs<T>(h, s, false, st.grad_mean, launch);
  if (hgp_term < kExpandedMinShare * hgp_squares) hgp_term = hgp_deviation_in_runs<T>(h, s, true, st.ref, launch);
  *hessian = T(spec.weight * hgp_term);
  *gradient = T(spec.weight * grad_term);
}

// HGP, forward: with the pooled reference a first pass forms G_bar (the directions need it); then one pass forms
// G_e, S_e = H_e G_e (and H_e G_bar) with their squares and sums.
template <typename T>
void hgp_forward_runs(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                      Launch launch) {
  const int E = s.num_envs, C = h.C, K = spec.pooled ? 2 : 1;
  const int64_t M = int64_t(C) * h.head_width();
  const HGPRunState<T> st(state, M);
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  const int most_envs = RunSizes(runs).envs;
  T* grad = scratch<T>(most_envs * M);
  T* hv = scratch<T>(most_envs * K * M);
  double *grad_sum = zeros(M), *hgp_sum = zeros(M), *ref_sum = zeros(M), *grad_mean = scratch<double>(M),
         *ref = scratch<double>(M);
  double grad_squares = 0, hgp_squares = 0;
  auto form_grad = [&](const EnvRun& run) {
    stats<T>(h, run.seg, gradient_stats(C, false), RowRuns<T>{}, grad, launch);
  };
  if (spec.pooled) {
    for (const EnvRun& run : runs)
      form_grad(run), grad_squares += add_blocks<T>(grad, M, run.seg.num_envs, M, grad_sum, launch);
    mean_into(grad_sum, E, M, grad_mean, st.grad_mean);
  }
  for (const EnvRun& run : runs) {
    form_grad(run);
    if (!spec.pooled) grad_squares += add_blocks<T>(grad, M, run.seg.num_envs, M, grad_sum, launch);
    const RowRuns<T> dirs = env_then_shared<T>(grad, spec.pooled ? st.grad_mean : nullptr, C, h.head_width());
    stats<T>(h, run.seg, hvp_stats(C, K), dirs, hv, launch, st.dir_dots);
    hgp_squares += add_blocks<T>(hv, K * M, run.seg.num_envs, M, hgp_sum, launch);
    if (spec.pooled) add_blocks<T>(hv + M, K * M, run.seg.num_envs, M, ref_sum, launch);
  }
  if (!spec.pooled) mean_into(grad_sum, E, M, grad_mean, st.grad_mean);
  mean_into(spec.pooled ? ref_sum : hgp_sum, E, M, ref, st.ref);
  double* hgp_mean = ref_sum;  // (free now)
  mean_into(hgp_sum, E, M, hgp_mean, st.hgp_mean);
  double grad_term = expanded_deviation(grad_squares, grad_sum, grad_mean, E, M);
  double hgp_term = expanded_deviation(hgp_squares, hgp_sum, ref, E, M);
  hgp_terms<T>(h, s, spec, st, grad_term, grad_squares, hgp_term, hgp_squares, hessian, gradient, launch);
}

// HGP, backward: each run's G_e and S_e - S_ref formed again, H_e of the upstream U, then its rows' backward (as
// hgp_backward). An undetached pooled reference's upstream -mean_e Gam_e is -(mean_e S_e - S_ref), and H_e of it is
// averaged over the environments in a first pass.
template <typename T>
bool hgp_backward_runs(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha,
                       double beta, HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width(), Dh = h.head_width();
  const HGPRunState<T> st(const_cast<T*>(state), M);
  const bool shared = spec.pooled && !spec.detach_reference;
  const T gam_scale = T(2 * spec.weight * alpha), lam_scale = T(2 * spec.weight * beta);
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);
  const int K = with_hessian ? (shared ? 2 : 1) : 0;
  const std::vector<EnvRun> runs = env_runs_of(s, M);
  const RunSizes most(runs);
  T* grad = scratch<T>(most.envs * M);
  T* hgp_dev = scratch<T>(most.envs * M);
  T* dir_grads = scratch<T>(most.envs * std::max(K, 1) * M);
  T* grad_up = scratch<T>(most.envs * M);
  T* up_dots = scratch<T>(s.num_samples * std::max(K, 1) * C);
  T *ref_up = nullptr, *to_mean = nullptr;
  if (shared && with_hessian) {
    ref_up = scratch<T>(M), to_mean = scratch<T>(M);
    for (int64_t k = 0; k < M; ++k) ref_up[k] = -T(st.hgp_mean[k] - st.ref[k]);
    double* sum = zeros(M);
    for (const EnvRun& run : runs) {
      stats<T>(h, run.seg, hvp_stats(C, 1), RowRuns<T>{{EnvRows<T>::shared(ref_up, C), {nullptr, 0, 0}}}, dir_grads,
               launch);
      add_blocks<T>(dir_grads, M, run.seg.num_envs, M, sum, launch);
    }
    double* mean = scratch<double>(M);
    mean_into(sum, E, M, mean, to_mean);
  }
  const BackwardLayout layout{C, K, /*gradient=*/with_gradient || with_hessian, /*hess_diag=*/false,
                              /*square_residual=*/false};
  T* work = scratch<T>(most.samples * backward_work_per_sample(layout));
  head.weight_grad = nullptr;  // (runs leave the head's gradient to the caller)
  const RowRuns<T> dirs = env_then_shared<T>(grad, shared ? st.grad_mean : nullptr, C, Dh);
  const RowRuns<T> ups = env_then_shared<T>(hgp_dev, ref_up, C, Dh);
  const KnownDots<T> known{st.dir_dots, int64_t(spec.pooled ? 2 : 1) * C, up_dots, int64_t(K) * C};
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam(EnvRows<T>::stacked(grad_up, C, Dh), T(1))
                                       .with_directions(K ? dirs : RowRuns<T>{}, K ? ups : RowRuns<T>{}, gam_scale);
  for (const EnvRun& run : runs) {
    const int E_r = run.seg.num_envs;
    stats<T>(h, run.seg, gradient_stats(C, false), RowRuns<T>{}, grad, launch);
    if (with_hessian) {
      stats<T>(h, run.seg, hvp_stats(C, 1), RowRuns<T>::stacked(grad, C, Dh), hgp_dev, launch);
      Deviations<T> dev = Deviations<T>::given_mean(st.ref).for_blocks(hgp_dev, M).writing(hgp_dev, M);
      deviations(&dev, 1, E_r, M, launch);
      stats<T>(h, run.seg, hvp_stats(C, K), ups, dir_grads, launch, up_dots);
    }
    hgp_grad_up<T>(grad, st.grad_mean, lam_scale, with_hessian ? dir_grads : nullptr, K, to_mean, gam_scale, E_r, M,
                   grad_up, launch);
    per_sample_backward_from_dots<T>(h, run.seg, layout, mats, head, work, d_logits, d_features, launch,
                                     K ? &known : nullptr);
  }
  return false;
}


// ---------------------------------------------------------------------------------------------------
// Many small environments: within-environment pairs of samples. Every statistic is a sum over an environment's
// samples of a coefficient row times zh_i^T, X_e = sum_{i in e} x_i zh_i^T, so ||X_e||^2 = sum_{i,j in e}
// (x_i . x_j) K_ij with K_ij = zh_i . zh_j (Q_ij = (zh_i ⊙ zh_i) . (zh_j ⊙ zh_j) for Dg), X_e zh_i = sum_j x_j K_ij
// and X_e^T c = sum_j (x_j . c) zh_j; the means over environments are one reduction over all samples (the
// coefficients / E). The backward is the per-sample backward with the means as matrices every environment
// shares, plus the pairs' dots (KnownDots) and expansion. No environment's C x Dh statistics are formed.
//   exact: a_i = w_i r_i (G_e) and b_i = w_i q_i (Dg_e).
//   HGP: g_i = G_e zh_i and t_i = w_i A_i g_i (S_e = H_e G_e); S_ref is one reduction (mean: t_i / E; pooled:
//   w_i A_i (G_bar zh_i) / E); an undetached pooled reference adds G_bar as a second direction, as hgp_backward.

// Beyond the state limit, with sum_e n_e^2 <= N C: the pairs' Dh-long dots cost less than forming each
// environment's statistics.
bool by_pairs(const Segments& s, int C, int64_t M) {
  if (!in_runs(s.num_envs, M)) return false;
  int64_t pairs = 0;
  for (int e = 0; e < s.num_envs; ++e) pairs += (s.offsets[e + 1] - s.offsets[e]) * (s.offsets[e + 1] - s.offsets[e]);
  return pairs <= s.num_samples * C;
}

int threads_over(const Segments& s, int64_t D, Launch launch) {
  return s.num_samples * D >= kMinParallelElements ? launch.threads : 1;
}

// All samples as one environment, for the means' reductions: in fixed blocks of kPooledBlockRows sorted rows (as
// many as fit beside the plan's state limit), each reduced in T and their sums added in double, so a float32 mean
// over many samples keeps the rounding of a block, not of all N (the plans' expanded sums cancel against it).
constexpr int64_t kPooledBlockRows = 2048;
struct Pooled {
  std::vector<int64_t> offsets;
  Segments seg;
  Pooled(const Segments& s, int64_t M) {
    const int64_t N = s.num_samples, most = std::max<int64_t>(1, kPlanStateElements / std::max<int64_t>(M, 1));
    const int64_t blocks = std::max<int64_t>(1, std::min((N + kPooledBlockRows - 1) / kPooledBlockRows, most));
    for (int64_t b = 0; b <= blocks; ++b) offsets.push_back(N * b / blocks);
    seg = {s.order, offsets.data(), N, int(blocks), nullptr};
  }
  // out (layout rows, Dh) = sum over all samples of coef_j^T zh_j (reduce_coefficients' statistic, one environment)
  template <typename T>
  void reduce(const Head<T>& h, StatsLayout layout, const T* coef, T* out, Launch launch) const {
    const int64_t M = int64_t(layout.width()) * h.head_width();
    if (seg.num_envs == 1) return reduce_coefficients<T>(h, seg, layout, coef, out, launch);
    T* blocks = scratch<T>(seg.num_envs * M);
    reduce_coefficients<T>(h, seg, layout, coef, blocks, launch);
    for (int64_t k = 0; k < M; ++k) {
      double total = 0;
      for (int b = 0; b < seg.num_envs; ++b) total += double(blocks[b * M + k]);
      out[k] = T(total);
    }
  }
};

// Each sorted row's statistics coefficients (layout, weight 1 / n_e) and, with p_rows, its link p (N, C).
template <typename T>
void coefficient_rows(const Head<T>& h, const Segments& s, StatsLayout layout, T* coef, T* p_rows, Launch launch) {
  const int C = h.C, W = layout.width();
#pragma omp parallel num_threads(threads_over(s, C, launch))
  {
    std::vector<T> p(C);
#pragma omp for schedule(static)
    for (int e = 0; e < s.num_envs; ++e) {
      const T w = T(1) / T(s.offsets[e + 1] - s.offsets[e]);
      for (int64_t j = s.offsets[e]; j < s.offsets[e + 1]; ++j) {
        const int64_t i = s.order[j];
        stats_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i), w,
                     nullptr, p_rows ? p_rows + j * C : p.data(), coef + j * W);
      }
    }
  }
}

// K = zh_i . zh_j and Q = (zh_i ⊙ zh_i) . (zh_j ⊙ zh_j) over the feature columns of row x with each of B rows
// ys, in fixed SIMD lanes (two accumulators each, so the adds do not wait on one another): x's strips are loaded
// once for the B pairs.
template <typename T, int B>
void pair_dots(const T* x, const T* const* ys, int D, T* k, T* q) {
  typedef T Vec __attribute__((vector_size(kWideBytes), aligned(sizeof(T))));
  constexpr int lanes = kWideBytes / sizeof(T);
  Vec k_acc[B][2] = {}, q_acc[B][2] = {};
  int d = 0;
  for (; d + 2 * lanes <= D; d += 2 * lanes)
    for (int a = 0; a < 2; ++a) {
      const Vec xv = *reinterpret_cast<const Vec*>(x + d + a * lanes);
      for (int p = 0; p < B; ++p) {
        const Vec xy = xv * *reinterpret_cast<const Vec*>(ys[p] + d + a * lanes);
        k_acc[p][a] += xy, q_acc[p][a] += xy * xy;
      }
    }
  for (int p = 0; p < B; ++p) {
    const Vec k_sum = k_acc[p][0] + k_acc[p][1], q_sum = q_acc[p][0] + q_acc[p][1];
    k[p] = q[p] = T(0);
    for (int l = 0; l < lanes; ++l) k[p] += k_sum[l], q[p] += q_sum[l];
    for (int j = d; j < D; ++j) k[p] += x[j] * ys[p][j], q[p] += x[j] * ys[p][j] * x[j] * ys[p][j];
  }
}

template <typename T>
T dot_c(const T* a, const T* b, int C) {
  T total = T(0);
  for (int c = 0; c < C; ++c) total += a[c] * b[c];
  return total;
}

// Environment e's pairs: kq[2 (a n + b)] = K and kq[2 (a n + b) + 1] = Q of its a-th and b-th sorted rows (the
// bias column included), each unordered pair formed once; kq holds 2 n^2 entries.
template <typename T>
void pair_gram(const Head<T>& h, const Segments& s, int e, T* kq) {
  constexpr int kBlock = 4;  // rows b at a time against row a
  const T one = h.bias ? T(1) : T(0);
  const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
  auto row = [&](int64_t j) { return h.features + s.order[first + j] * h.features_row_stride; };
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b0 = a; b0 < n; b0 += kBlock) {
      const int count = int(std::min<int64_t>(kBlock, n - b0));
      const T* ys[kBlock];
      for (int p = 0; p < count; ++p) ys[p] = row(b0 + p);
      T k[kBlock], q[kBlock];
      switch (count) {
        case 1: pair_dots<T, 1>(row(a), ys, h.D, k, q); break;
        case 2: pair_dots<T, 2>(row(a), ys, h.D, k, q); break;
        case 3: pair_dots<T, 3>(row(a), ys, h.D, k, q); break;
        default: pair_dots<T, kBlock>(row(a), ys, h.D, k, q);
      }
      for (int p = 0; p < count; ++p) {
        const int64_t b = b0 + p;
        kq[2 * (a * n + b)] = kq[2 * (b * n + a)] = k[p] + one;
        kq[2 * (a * n + b) + 1] = kq[2 * (b * n + a) + 1] = q[p] + one;
      }
    }
}

// Where each environment's 2 n_e^2 pair entries start in an array of all of them (E + 1 offsets).
std::vector<int64_t> pair_offsets(const Segments& s) {
  std::vector<int64_t> out(s.num_envs + 1, 0);
  for (int e = 0; e < s.num_envs; ++e) {
    const int64_t n = s.offsets[e + 1] - s.offsets[e];
    out[e + 1] = out[e] + 2 * n * n;
  }
  return out;
}

// The pairs' expansion for the per-sample backward (KnownDots::pairs): d_features of each sorted row i gets
// sum_{j in e} lin(i, j) zh_j [+ zh_i ⊙ sum_j sq(i, j) (zh_j ⊙ zh_j)], coef(i, j, lin, sq) (both from zero) for
// each ordered pair of an environment's sorted rows, added right after the row's own expansion.
template <typename T, typename Coef>
void set_pair_terms(KnownDots<T>& known, const Segments& s, bool squares, Coef&& coef, Launch launch) {
  const std::vector<int64_t> offsets = pair_offsets(s);
  int64_t* at = scratch<int64_t>(s.num_envs + 1);
  std::copy(offsets.begin(), offsets.end(), at);
  T* pair_coef = scratch<T>(offsets.back());
  int64_t* position = scratch<int64_t>(s.num_samples);
  for (int64_t j = 0; j < s.num_samples; ++j) position[s.order[j]] = j;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_over(s, 1, launch))
  for (int e = 0; e < s.num_envs; ++e) {
    const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
    T* out = pair_coef + at[e];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        T& lin = out[2 * (i * n + j)];
        T& sq = out[2 * (i * n + j) + 1];
        lin = sq = T(0);
        coef(first + i, first + j, lin, sq);
      }
  }
  known.pairs = &s, known.pair_coef = pair_coef, known.pair_at = at, known.position = position;
  known.pair_squares = squares;
}

template <typename T>
double squared_norm(const T* x, int64_t n) {
  double total = 0;
  for (int64_t k = 0; k < n; ++k) total += double(x[k]) * double(x[k]);
  return total;
}

template <typename T>
void exact_forward_pairs(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                         Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const StatsLayout layout = gradient_stats(C, true);
  T *coef = scratch<T>(s.num_samples * 2 * C), *mean_coef = scratch<T>(s.num_samples * 2 * C);
  coefficient_rows<T>(h, s, layout, coef, nullptr, launch);
  for (int64_t k = 0; k < s.num_samples * 2 * C; ++k) mean_coef[k] = coef[k] / T(E);
  Pooled(s, 2 * M).reduce<T>(h, layout, mean_coef, state, launch);  // [G_bar][mean Dg]
  std::vector<double> env_squares(2 * size_t(E));
  const std::vector<int64_t> at = pair_offsets(s);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_over(s, h.D, launch))
    for (int e = 0; e < E; ++e) {
      T* kq = state + 2 * M + at[e];  // kept for the backward
      pair_gram<T>(h, s, e, kq);
      const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
      double squares[2] = {0, 0};
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = 0; b < n; ++b)
          for (int x = 0; x < 2; ++x)
            squares[x] += double(dot_c(coef + (first + a) * 2 * C + x * C, coef + (first + b) * 2 * C + x * C, C)) *
                          kq[2 * (a * n + b) + x];
      env_squares[2 * e] = squares[0], env_squares[2 * e + 1] = squares[1];
    }
  double terms[2];
  for (int x = 0; x < 2; ++x) {
    double squares = 0;
    for (int e = 0; e < E; ++e) squares += env_squares[2 * e + x];
    terms[x] = squares - E * squared_norm(state + x * M, M);
    if (terms[x] < kExpandedMinShare * squares)
      terms[x] = exact_deviation_in_runs<T>(h, s, EXACT_DIAG, x, state + x * M, launch);
  }
  *gradient = T(spec.weight * terms[0]);
  *hessian = T(spec.weight * terms[1]);
}

// exact, backward: Lam_e zh_i = lam (sum_j a_j K_ij - G_bar zh_i), Lam_e^T (lam a_i) = lam (sum_j (a_i . a_j) zh_j
// - G_bar^T a_i), and Gam likewise with b, Q and 2 gam zh_i ⊙.
template <typename T>
bool exact_backward_pairs(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha,
                          double beta, HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width();
  const T lam_scale = T(2 * spec.weight * beta), gam_scale = T(2 * spec.weight * alpha);
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);  // as in exact_backward
  T* coef = scratch<T>(s.num_samples * 2 * C);
  coefficient_rows<T>(h, s, gradient_stats(C, true), coef, nullptr, launch);
  // the pairs' dots, negated (the shared means' scales are negated below): -sum_j a_j K_ij, -sum_j b_j Q_ij
  T* lam_add = scratch<T>(s.num_samples * C);
  T* gam_add = scratch<T>(s.num_samples * C);
  const std::vector<int64_t> at = pair_offsets(s);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_over(s, h.D, launch))
    for (int e = 0; e < E; ++e) {
      const T* kq = state + 2 * M + at[e];  // the forward's pairs
      const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
      for (int64_t a = 0; a < n; ++a) {
        T *lam = lam_add + s.order[first + a] * C, *gam = gam_add + s.order[first + a] * C;
        std::fill(lam, lam + C, T(0)), std::fill(gam, gam + C, T(0));
        for (int64_t b = 0; b < n; ++b)
          for (int c = 0; c < C; ++c)
            lam[c] -= coef[(first + b) * 2 * C + c] * kq[2 * (a * n + b)],
                gam[c] -= coef[(first + b) * 2 * C + C + c] * kq[2 * (a * n + b) + 1];
      }
    }
  const BackwardLayout layout{C, /*K=*/0, with_gradient, with_hessian, /*square_residual=*/false};
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam(EnvRows<T>::shared(with_gradient ? state : nullptr, C), -lam_scale)
                                       .with_gam(EnvRows<T>::shared(with_hessian ? state + M : nullptr, C), -gam_scale);
  KnownDots<T> known{nullptr, 0, nullptr, 0, lam_add, gam_add};
  set_pair_terms(known, s, /*squares=*/true, [&](int64_t i, int64_t j, T& lin, T& sq) {
    lin = with_gradient ? lam_scale * dot_c(coef + i * 2 * C, coef + j * 2 * C, C) : T(0);
    sq = with_hessian ? T(2) * gam_scale * dot_c(coef + i * 2 * C + C, coef + j * 2 * C + C, C) : T(0);
  }, launch);
  T* work = scratch<T>(s.num_samples * backward_work_per_sample(layout));
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch, &known);
}

// HGP's rows over pairs: g_i = sum_j a_j K_ij and t_i = w_i A_i g_i (sorted rows), with each environment's
// sum_{i,j} (a_i . a_j) K_ij and sum_{i,j} (t_i . t_j) K_ij when squares is given; then fn(e, n, kq) while the
// environment's pairs are at hand.
template <typename T, typename Fn>
void hgp_pair_rows(const Head<T>& h, const Segments& s, const T* a, const T* p, T* g, T* t, double* squares,
                   Launch launch, Fn&& fn) {
  const int C = h.C;
#pragma omp parallel num_threads(threads_over(s, h.D, launch))
  {
    std::vector<T> kq;
#pragma omp for schedule(dynamic, 16)
    for (int e = 0; e < s.num_envs; ++e) {
      const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
      kq.resize(size_t(2 * n * n));
      pair_gram<T>(h, s, e, kq.data());
      const T w = T(1) / T(n);
      double grad_squares = 0, hgp_squares = 0;
      for (int64_t x = first; x < first + n; ++x) {
        T* gx = g + x * C;
        std::fill(gx, gx + C, T(0));
        for (int64_t y = first; y < first + n; ++y) {
          const T k = kq[2 * ((x - first) * n + (y - first))];
          for (int c = 0; c < C; ++c) gx[c] += a[y * C + c] * k;
          grad_squares += double(dot_c(a + x * C, a + y * C, C)) * k;
        }
        hess_apply<T>(h.loss, p + x * C, gx, C, w, t + x * C);
      }
      for (int64_t x = first; squares && x < first + n; ++x)
        for (int64_t y = first; y < first + n; ++y)
          hgp_squares += double(dot_c(t + x * C, t + y * C, C)) * kq[2 * ((x - first) * n + (y - first))];
      if (squares) squares[2 * e] = grad_squares, squares[2 * e + 1] = hgp_squares;
      fn(e, n, kq);
    }
  }
}

// out_j = (w_j / E) A_j dots_j for every sorted row: the coefficients of mean_e H_e V for a shared V (dots = V zh).
template <typename T>
void pooled_hvp_rows(const Head<T>& h, const Segments& s, const T* p, const T* dots, T* out) {
  for (int e = 0; e < s.num_envs; ++e) {
    const T w = T(1) / (T(s.num_envs) * T(s.offsets[e + 1] - s.offsets[e]));
    for (int64_t j = s.offsets[e]; j < s.offsets[e + 1]; ++j)
      hess_apply<T>(h.loss, p + j * h.C, dots + j * h.C, h.C, w, out + j * h.C);
  }
}

template <typename T>
void hgp_forward_pairs(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                       Launch launch) {
  const int E = s.num_envs, C = h.C;
  const int64_t M = int64_t(C) * h.head_width(), N = s.num_samples;
  const HGPRunState<T> st(state, M);
  T *a = scratch<T>(N * C), *p = scratch<T>(N * C), *g = scratch<T>(N * C), *t = scratch<T>(N * C),
    *u = scratch<T>(N * C);
  const StatsLayout rows_layout = gradient_stats(C, false);  // (C coefficient columns, no squares)
  const Pooled pooled(s, M);
  coefficient_rows<T>(h, s, rows_layout, a, p, launch);
  for (int64_t k = 0; k < N * C; ++k) u[k] = a[k] / T(E);
  pooled.reduce<T>(h, rows_layout, u, st.grad_mean, launch);
  std::vector<double> env_squares(2 * size_t(E));
  hgp_pair_rows<T>(h, s, a, p, g, t, env_squares.data(), launch, [](int, int64_t, const std::vector<T>&) {});
  for (int64_t k = 0; k < N * C; ++k) u[k] = t[k] / T(E);
  if (spec.pooled && !spec.detach_reference)  // mean_e S_e: the reference's upstream in the backward
    pooled.reduce<T>(h, rows_layout, u, st.hgp_mean, launch);
  if (spec.pooled) {  // S_ref = sum_i w_i A_i (G_bar zh_i) zh_i^T / E, keeping G_bar zh_i (sorted rows)
    T* bar_dots = st.dir_dots + N * C;
    matrix_dots<T>(h, s, st.grad_mean, C, bar_dots, launch);
    pooled_hvp_rows<T>(h, s, p, bar_dots, u);
  }
  pooled.reduce<T>(h, rows_layout, u, st.ref, launch);
  T* ref_dots = st.dir_dots;  // S_ref zh_j, sorted rows: the forward's cross term and the backward's U dots
  matrix_dots<T>(h, s, st.ref, C, ref_dots, launch);
  double grad_squares = 0, hgp_squares = 0, cross = 0;
  for (int e = 0; e < E; ++e) grad_squares += env_squares[2 * e], hgp_squares += env_squares[2 * e + 1];
  for (int64_t j = 0; j < N; ++j) cross += double(dot_c(t + j * C, ref_dots + j * C, C));
  double grad_term = grad_squares - E * squared_norm(st.grad_mean, M);
  double hgp_term = hgp_squares - 2 * cross + E * squared_norm(st.ref, M);
  hgp_terms<T>(h, s, spec, st, grad_term, grad_squares, hgp_term, hgp_squares, hessian, gradient, launch);
}

// HGP, backward, as hgp_backward with U_e = S_e - S_ref: the per-sample backward's Lam is the shared -lam G_bar
// plus the pairs' sum_j l_j K_ij, l_j = lam a_j + gam w_j A_j (U_e zh_j) (the upstream of G_e, H_e U_e included);
// its V and U dots are g_i and U_e zh_i = sum_j t_j K_ij - S_ref zh_i; its expansion covers the shared parts
// (V = 0, U = -S_ref), and the pairs add sum_j [(l_j . a_i) + (a_j . sig_i) + gam (t_j . t_i)] zh_j with
// sig_i = A_i (w_i gam U_e zh_i), the closed form's V coefficient.
template <typename T>
bool hgp_backward_pairs(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha,
                        double beta, HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  const int C = h.C;
  const int64_t M = int64_t(C) * h.head_width(), N = s.num_samples;
  const HGPRunState<T> st(const_cast<T*>(state), M);
  const T gam_scale = T(2 * spec.weight * alpha), lam_scale = T(2 * spec.weight * beta);
  const bool with_gradient = lam_scale != T(0), with_hessian = gam_scale != T(0);
  // An undetached pooled reference: second direction G_bar, whose upstream is ref_up = -(mean_e S_e - S_ref)
  const bool shared = spec.pooled && !spec.detach_reference && with_hessian;
  const int K = with_hessian ? (shared ? 2 : 1) : 0, stride = (shared ? 2 : 1) * C;
  T *a = scratch<T>(N * C), *p = scratch<T>(N * C), *g = scratch<T>(N * C), *t = scratch<T>(N * C);
  T *ell = scratch<T>(N * C), *sig = scratch<T>(N * C);  // sorted rows
  T *g_dots = scratch<T>(N * stride), *u_dots = scratch<T>(N * stride), *lam_add = scratch<T>(N * C);  // caller's
  const T* bar_dots = st.dir_dots + N * C;  // G_bar zh_j (pooled), sorted rows
  coefficient_rows<T>(h, s, gradient_stats(C, false), a, p, launch);
  T *ref_up = nullptr, *ref_up_dots = nullptr, *to_mean = scratch<T>(M);
  std::fill(to_mean, to_mean + M, T(0));
  if (shared) {  // to_mean = mean_e H_e ref_up, the upstream every G_e receives through G_bar
    ref_up = scratch<T>(M), ref_up_dots = scratch<T>(N * C);
    for (int64_t k = 0; k < M; ++k) ref_up[k] = -T(st.hgp_mean[k] - st.ref[k]);
    matrix_dots<T>(h, s, ref_up, C, ref_up_dots, launch);
    pooled_hvp_rows<T>(h, s, p, ref_up_dots, g);  // (g is formed below)
    Pooled(s, M).reduce<T>(h, gradient_stats(C, false), g, to_mean, launch);
  }
  hgp_pair_rows<T>(h, s, a, p, g, t, nullptr, launch, [&](int e, int64_t n, const std::vector<T>& kq) {
    const int64_t first = s.offsets[e];
    const T w = T(1) / T(n);
    std::vector<T> tau(C);
    for (int64_t x = first; x < first + n; ++x) {
      const int64_t i = s.order[x];
      T* du = u_dots + i * stride;  // U_e zh_i, unscaled
      for (int c = 0; c < C; ++c) du[c] = -st.dir_dots[x * C + c];
      for (int64_t y = first; y < first + n; ++y)
        for (int c = 0; c < C; ++c) du[c] += t[y * C + c] * kq[2 * ((x - first) * n + (y - first))];
      std::copy(g + x * C, g + (x + 1) * C, g_dots + i * stride);
      if (shared) {  // the second direction's dots: G_bar zh_i and ref_up zh_i
        std::copy(bar_dots + x * C, bar_dots + (x + 1) * C, g_dots + i * stride + C);
        std::copy(ref_up_dots + x * C, ref_up_dots + (x + 1) * C, u_dots + i * stride + C);
      }
      T* l = ell + x * C;
      hess_apply<T>(h.loss, p + x * C, du, C, w * gam_scale, l);  // gam w A (U zh)
      for (int c = 0; c < C; ++c) l[c] += lam_scale * a[x * C + c];
      for (int c = 0; c < C; ++c) tau[c] = w * gam_scale * du[c];
      hess_apply<T>(h.loss, p + x * C, tau.data(), C, T(1), sig + x * C);
    }
    for (int64_t x = first; x < first + n; ++x) {
      T* add = lam_add + s.order[x] * C;
      std::fill(add, add + C, T(0));
      for (int64_t y = first; y < first + n; ++y)
        for (int c = 0; c < C; ++c) add[c] += ell[y * C + c] * kq[2 * ((x - first) * n + (y - first))];
    }
  });
  T *lam_shared = scratch<T>(M), *zeros = scratch<T>(M), *neg_ref = scratch<T>(M);
  for (int64_t k = 0; k < M; ++k)
    lam_shared[k] = -lam_scale * st.grad_mean[k] + gam_scale * to_mean[k], zeros[k] = T(0), neg_ref[k] = -st.ref[k];
  const BackwardLayout layout{C, K, /*gradient=*/with_gradient || with_hessian, /*hess_diag=*/false,
                              /*square_residual=*/false};
  const EnvRows<T> none{nullptr, 0, 0};
  const RowRuns<T> dirs{{EnvRows<T>::shared(zeros, C), shared ? EnvRows<T>::shared(st.grad_mean, C) : none}};
  const RowRuns<T> ups{{EnvRows<T>::shared(neg_ref, C), shared ? EnvRows<T>::shared(ref_up, C) : none}};
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam(EnvRows<T>::shared(lam_shared, C), T(1))
                                       .with_directions(K ? dirs : RowRuns<T>{}, K ? ups : RowRuns<T>{}, gam_scale);
  KnownDots<T> known{g_dots, stride, u_dots, stride, lam_add, nullptr};
  set_pair_terms(known, s, /*squares=*/false, [&](int64_t i, int64_t j, T& lin, T&) {
    lin = dot_c(ell + j * C, a + i * C, C) + (with_hessian ? dot_c(a + j * C, sig + i * C, C) +
                                                                 gam_scale * dot_c(t + j * C, t + i * C, C)
                                                           : T(0));
  }, launch);
  T* work = scratch<T>(N * backward_work_per_sample(layout));
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch, &known);
}


// ---------------------------------------------------------------------------------------------------
// Fishr over small environments (beyond the state limit, none of more than kFishrStripRows samples, hgk_tuning.h): each
// environment's G_e and Dr_e are formed one SIMD strip of columns and a few classes at a time, in registers,
// and used there: never written. The forward walks, per strip and class block, the environments in order,
// summing v_e (double) and its squares; the backward takes each environment's rows at once, forming its Lam and
// Gam a class block by a tile of strips at a time and applying each tile to the rows (dots, then the closed form,
// and the expansion).

bool fishr_in_strips(const Segments& s, int64_t M) {
  if (!in_runs(s.num_envs, M)) return false;
  for (int e = 0; e < s.num_envs; ++e)
    if (s.offsets[e + 1] - s.offsets[e] > kFishrStripRows) return false;
  return true;
}

template <typename T>
struct FishrStrips {  // strips of the build's widest vectors
  typedef T Vec __attribute__((vector_size(kWideBytes), aligned(sizeof(T))));
  static constexpr int L = kWideBytes / sizeof(T);

  const Head<T>& h;
  const Segments& s;
  int C, full, strips;  // strips of L columns: `full` of features only, then a tail (remaining features, bias, zeros)
  int64_t padded;       // strips * L: a class's row in the padded arrays below
  T* coef;              // (N, 2C) sorted rows: [w r][w r ⊙ r]
  T* tail;              // (N, L) sorted rows: the tail strip
  const T** rows;       // (N,) each sorted row's features (one load in the inner loops, not a chain through order)

  FishrStrips(const Head<T>& h_, const Segments& s_, Launch launch) : h(h_), s(s_), C(h_.C) {
    full = h.D / L;
    strips = (h.head_width() + L - 1) / L;
    padded = int64_t(strips) * L;
    coef = scratch<T>(s.num_samples * 2 * C);
    coefficient_rows<T>(h, s, {C, 0, true, true, /*square_residual=*/true}, coef, nullptr, launch);
    tail = scratch<T>(s.num_samples * L);
    rows = scratch<const T*>(s.num_samples);
    for (int64_t j = 0; j < s.num_samples; ++j) rows[j] = h.features + s.order[j] * h.features_row_stride;
    for (int64_t j = 0; j < s.num_samples; ++j)
      for (int l = 0; l < L; ++l) {
        const int d = full * L + l;
        tail[j * L + l] = d < h.D ? rows[j][d] : T(d == h.D && h.bias);
      }
  }
  const T* row(int64_t j, int strip) const {
    return strip < full ? rows[j] + int64_t(strip) * L : tail + j * L;
  }
  static Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  // G and Dr of classes [c0, c0 + NB) at `strip` over sorted rows [j0, j1), in registers (the rows' strips read
  // at packed + r packed_stride where a caller packed them)
  template <int NB>
  void stats(int64_t j0, int64_t j1, int strip, int c0, Vec* g, Vec* a, const T* packed = nullptr,
             int64_t packed_stride = 0) const {
    Vec gr[NB] = {}, ar[NB] = {};
    const T* const* at = strip < full ? rows : nullptr;
    const int64_t offset = int64_t(strip) * L, width = 2 * C;
    const T* cf = coef + j0 * width + c0;
    for (int64_t j = j0; j < j1; ++j, cf += width) {
      const Vec z = load(packed ? packed + (j - j0) * packed_stride : at ? at[j] + offset : tail + j * L), z2 = z * z;
      for (int b = 0; b < NB; ++b) gr[b] += cf[b] * z, ar[b] += cf[C + b] * z2;
    }
    for (int b = 0; b < NB; ++b) g[b] = gr[b], a[b] = ar[b];
  }
  // (C, Dh) -> (C, padded) with zeros
  T* pad(const T* x) const {
    T* out = scratch<T>(C * padded);
    for (int c = 0; c < C; ++c) {
      std::copy(x + c * int64_t(h.head_width()), x + (c + 1) * int64_t(h.head_width()), out + c * padded);
      std::fill(out + c * padded + h.head_width(), out + (c + 1) * padded, T(0));
    }
    return out;
  }
};

// fn(std::integral_constant<int, NB>, c0) for each block of at most kFishrClassBlock classes.
template <typename Fn>
void class_blocks(int C, Fn&& fn) {
  int c0 = 0;
  for (; c0 + kFishrClassBlock <= C; c0 += kFishrClassBlock) fn(std::integral_constant<int, kFishrClassBlock>{}, c0);
  switch (C - c0) {
    case 1: fn(std::integral_constant<int, 1>{}, c0); break;
    case 2: fn(std::integral_constant<int, 2>{}, c0); break;
    case 3: fn(std::integral_constant<int, 3>{}, c0); break;
    case 4: fn(std::integral_constant<int, 4>{}, c0); break;
    case 5: fn(std::integral_constant<int, 5>{}, c0); break;
    case 6: fn(std::integral_constant<int, 6>{}, c0); break;
    case 7: fn(std::integral_constant<int, 7>{}, c0); break;
    default: break;
  }
  static_assert(kFishrClassBlock <= 8, "class_blocks dispatches remainders of up to 7 classes");
}

// Forward: the squares sum_e ||v_e||^2 (sum receives sum_e v_e, (C, padded)) or, Centred, sum_e ||v_e - mean||^2
// (mean (C, padded)). A task takes about kFishrTaskStrips strips, the environments in order: each environment's rows'
// part stays in L1 across its strips and classes.
template <typename T, bool Centred>
double fishr_strip_sums(const FishrStrips<T>& f, const T* mean, double* sum, Launch launch) {
  using Strips = FishrStrips<T>;
  using Vec = typename Strips::Vec;
  constexpr int L = Strips::L;
  // the double sums a 32-byte chunk of the strip at a time (a wider conversion costs more)
  typedef T Chunk __attribute__((vector_size(32), aligned(sizeof(T))));
  constexpr int chunks = sizeof(Vec) / 32, CL = 32 / sizeof(T);
  typedef double Wide __attribute__((vector_size(CL * sizeof(double)), aligned(sizeof(double))));
  const Segments& s = f.s;
  // an even number of tasks of about kFishrTaskStrips strips (fixed by the head: the same sums for any thread count)
  const int tasks = 2 * ((f.strips + 2 * kFishrTaskStrips - 1) / (2 * kFishrTaskStrips));
  std::vector<double> partial(tasks);
  if (!Centred) std::fill(sum, sum + f.C * f.padded, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads_over(s, int64_t(f.C) * f.h.D, launch))
  for (int t = 0; t < tasks; ++t) {
    const int first = int(int64_t(t) * f.strips / tasks), last = int(int64_t(t + 1) * f.strips / tasks);
    Wide squares[kFishrClassBlock][chunks] = {};  // one per class of a block: independent add chains
    const int packed_last = std::min(last, f.full), packed_width = std::max(0, packed_last - first) * L;
    std::vector<T> packed(size_t(kFishrStripRows) * std::max(packed_width, 1));
    for (int e = 0; e < s.num_envs; ++e) {
      const int64_t j0 = s.offsets[e], n = s.offsets[e + 1] - j0;
      for (int64_t r = 0; r < n && packed_width; ++r)  // the rows' columns of this task, contiguous in L1
        std::copy_n(f.rows[j0 + r] + int64_t(first) * L, packed_width, packed.data() + r * packed_width);
      for (int strip = first; strip < last; ++strip)
        class_blocks(f.C, [&](auto block, int c0) {
          constexpr int NB = decltype(block)::value;
          Vec g[NB], a[NB];
          if (strip < packed_last)
            f.template stats<NB>(j0, j0 + n, strip, c0, g, a, packed.data() + (strip - first) * L, packed_width);
          else
            f.template stats<NB>(j0, j0 + n, strip, c0, g, a);
          for (int b = 0; b < NB; ++b) {
            const int64_t at = (c0 + b) * f.padded + int64_t(strip) * L;
            Vec v = a[b] - g[b] * g[b];
            if constexpr (Centred) v -= Strips::load(mean + at);
            for (int k = 0; k < chunks; ++k) {
              Chunk part;
              std::memcpy(&part, reinterpret_cast<const char*>(&v) + 32 * k, 32);
              const Wide wide = __builtin_convertvector(part, Wide);
              squares[b][k] += wide * wide;
              if constexpr (!Centred) *reinterpret_cast<Wide*>(sum + at + k * CL) += wide;
            }
          }
        });
    }
    double task_total = 0;
    for (int b = 0; b < kFishrClassBlock; ++b)
      for (int k = 0; k < chunks; ++k)
        for (int l = 0; l < CL; ++l) task_total += squares[b][k][l];
    partial[t] = task_total;
  }
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// Fishr forward in strips: state [0][v_bar], its one term from the expanded sums, recomputed as squared deviations
// where it cancels (as exact_forward_runs).
template <typename T>
void fishr_forward_strips(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                          Launch launch) {
  const int E = s.num_envs, C = h.C, Dh = h.head_width();
  const int64_t M = int64_t(C) * Dh;
  const FishrStrips<T> f(h, s, launch);
  double* padded_sum = scratch<double>(C * f.padded);
  const double squares = fishr_strip_sums<T, false>(f, nullptr, padded_sum, launch);
  double* sum = scratch<double>(M);
  double* mean = scratch<double>(M);
  for (int c = 0; c < C; ++c)
    std::copy(padded_sum + c * f.padded, padded_sum + c * f.padded + Dh, sum + int64_t(c) * Dh);
  std::fill(state, state + M, T(0));
  mean_into(sum, E, M, mean, state + M);
  double term = expanded_deviation(squares, sum, mean, E, M);
  if (term < kExpandedMinShare * squares) term = fishr_strip_sums<T, true>(f, f.pad(state + M), nullptr, launch);
  *gradient = T(0);
  *hessian = T(spec.weight * term);
}

// Fishr backward in strips: each environment's rows at once (one task), d_features accumulated over class blocks.
template <typename T>
bool fishr_backward_strips(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha,
                           Launch launch, T* d_logits, T* d_features) {
  using Strips = FishrStrips<T>;
  using Vec = typename Strips::Vec;
  constexpr int L = Strips::L;
  const int C = h.C;
  const Strips f(h, s, launch);
  const T* mean = f.pad(state + int64_t(C) * h.head_width());
  const T k = T(2 * spec.weight * alpha);  // dPsi/dv_e = k (v_e - v_bar)
  const BackwardLayout layout{C, /*K=*/0, /*gradient=*/true, /*hess_diag=*/true, /*square_residual=*/true};
  if (k == T(0)) {  // (a zero upstream adds nothing; its blocks may hold infinities)
    std::fill_n(d_logits, s.num_samples * C, T(0));
    std::fill_n(d_features, s.num_samples * h.D, T(0));
    return false;
  }
#pragma omp parallel num_threads(threads_over(s, int64_t(C) * h.D, launch))
  {
    // one class block's Lam and Gam over a tile of strips, [strip][class][Lam, Gam] (Vec loads need only T's
    // alignment)
    std::vector<T> upstream(size_t(kFishrTileStrips) * kFishrClassBlock * 2 * L);
    std::vector<T> dots(size_t(kFishrStripRows) * 2 * C), row_work(4 * C);
#pragma omp for schedule(dynamic, 4)
    for (int e = 0; e < s.num_envs; ++e) {
      const int64_t j0 = s.offsets[e], n = s.offsets[e + 1] - j0;
      std::fill_n(dots.data(), n * 2 * C, T(0));
      class_blocks(C, [&](auto block, int c0) {
        constexpr int NB = decltype(block)::value;
        for (int s0 = 0; s0 < f.strips; s0 += kFishrTileStrips) {
          const int s1 = std::min(f.strips, s0 + kFishrTileStrips);
          Vec* up = reinterpret_cast<Vec*>(upstream.data());
          // the environment's Lam = -2 G ⊙ Gam and Gam = k (v_e - v_bar) on the tile
          for (int strip = s0; strip < s1; ++strip) {
            Vec g[NB], a[NB];
            f.template stats<NB>(j0, j0 + n, strip, c0, g, a);
            Vec* at = up + (strip - s0) * 2 * NB;
            for (int b = 0; b < NB; ++b) {
              const Vec bar = Strips::load(mean + (c0 + b) * f.padded + int64_t(strip) * L);
              const Vec dv = k * (a[b] - g[b] * g[b] - bar);
              at[2 * b] = T(-2) * g[b] * dv;
              at[2 * b + 1] = dv;
            }
          }
          // then each row's dots and expansion on the tile (the first class block writes d_features)
          for (int64_t r = 0; r < n; ++r) {
            const T* cf = f.coef + (j0 + r) * 2 * C;
            T lin_coef[NB], sq_coef[NB];
            for (int b = 0; b < NB; ++b) lin_coef[b] = cf[c0 + b], sq_coef[b] = T(2) * cf[C + c0 + b];
            T* out = d_features + s.order[j0 + r] * h.D;
            Vec lam_dots[NB] = {}, gam_dots[NB] = {};
            for (int strip = s0; strip < s1; ++strip) {
              const Vec z = Strips::load(f.row(j0 + r, strip)), z2 = z * z;
              const Vec* at = up + (strip - s0) * 2 * NB;
              Vec lin = {}, sq = {};
              for (int b = 0; b < NB; ++b) {
                const Vec lam = at[2 * b], gam = at[2 * b + 1];
                lam_dots[b] += lam * z, gam_dots[b] += gam * z2;
                lin += lin_coef[b] * lam, sq += sq_coef[b] * gam;
              }
              const Vec dz = lin + z * sq;
              T* to = out + int64_t(strip) * L;
              if (strip < f.full)
                *reinterpret_cast<Vec*>(to) = c0 ? *reinterpret_cast<Vec*>(to) + dz : dz;
              else  // the tail strip: its remaining feature columns
                for (int l = 0; l < h.D - strip * L; ++l) to[l] = c0 ? to[l] + dz[l] : dz[l];
            }
            T* row_dots = dots.data() + r * 2 * C;
            for (int b = 0; b < NB; ++b) {
              T lam_total = T(0), gam_total = T(0);
              for (int l = 0; l < L; ++l) lam_total += lam_dots[b][l], gam_total += gam_dots[b][l];
              row_dots[c0 + b] += lam_total, row_dots[C + c0 + b] += gam_total;
            }
          }
        }
      });
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = s.order[j0 + r];
        T* p = row_work.data();
        T* row_dots = dots.data() + r * 2 * C;
        backward_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i),
                        T(1) / T(n), row_dots, row_dots + C, p, p + C, p + 2 * C, p + 3 * C, d_logits + i * C, 1);
      }
    }
  }
  return false;
}
}  // namespace

bool plans_over_pairs(const Segments& s, int C, int head_width) {
  return by_pairs(s, C, int64_t(C) * head_width);
}

// The exact plan and Fishr's share their forms but the pairs (Fishr's variances are quartic in the samples).
bool takes_pairs(PlanSpec spec, const Segments& s, int C, int64_t M) {
  return spec.method != FISHR && by_pairs(s, C, M);
}

int64_t plan_state_size(PlanSpec spec, const Segments& s, int C, int head_width) {
  const int64_t M = int64_t(C) * head_width, dir_dots = s.num_samples * (spec.pooled ? 2 : 1) * C;
  const bool blocks = spec.method != HGP;  // term_blocks
  if (spec.method == EXACT_DIAG && takes_pairs(spec, s, C, M)) return 2 * M + pair_offsets(s).back();
  if (in_runs(s.num_envs, M)) return blocks ? 2 * M : 3 * M + dir_dots;
  if (blocks) return 2 * s.num_envs * M;
  return (2 * s.num_envs + 1) * M + dir_dots;
}

template <typename T>
void plan_forward(const Head<T>& h, const Segments& s, PlanSpec spec, T* state, T* hessian, T* gradient,
                  Launch launch) {
  ScratchArena::Scope scope;
  const int64_t M = int64_t(h.C) * h.head_width();
  const bool pairs = takes_pairs(spec, s, h.C, M), runs = in_runs(s.num_envs, M);
  if (spec.method == HGP)
    (pairs ? hgp_forward_pairs<T> : runs ? hgp_forward_runs<T> : hgp_forward<T>)(h, s, spec, state, hessian, gradient,
                                                                                 launch);
  else if (spec.method == FISHR && fishr_in_strips(s, M))
    fishr_forward_strips<T>(h, s, spec, state, hessian, gradient, launch);
  else
    (pairs ? exact_forward_pairs<T> : runs ? exact_forward_runs<T> : exact_forward<T>)(h, s, spec, state, hessian,
                                                                                       gradient, launch);
}

template <typename T>
bool plan_backward(const Head<T>& h, const Segments& s, PlanSpec spec, const T* state, double alpha, double beta,
                   HeadTerm<T> head, T* d_logits, T* d_features, Launch launch) {
  ScratchArena::Scope scope;
  const int64_t M = int64_t(h.C) * h.head_width();
  const bool pairs = takes_pairs(spec, s, h.C, M), runs = in_runs(s.num_envs, M);
  if (spec.method == HGP)
    return (pairs ? hgp_backward_pairs<T> : runs ? hgp_backward_runs<T> : hgp_backward<T>)(
        h, s, spec, state, alpha, beta, head, d_logits, d_features, launch);
  if (spec.method == FISHR && fishr_in_strips(s, M) && !head.weight)  // (a fused head: the runs, on the same state)
    return fishr_backward_strips<T>(h, s, spec, state, alpha, launch, d_logits, d_features);
  return (pairs ? exact_backward_pairs<T> : runs ? exact_backward_runs<T> : exact_backward<T>)(
      h, s, spec, state, alpha, beta, head, d_logits, d_features, launch);
}

#define HGK_INSTANTIATE_PLANS(T)                                                                                \
  template void plan_forward<T>(const Head<T>&, const Segments&, PlanSpec, T*, T*, T*, Launch);                \
  template bool plan_backward<T>(const Head<T>&, const Segments&, PlanSpec, const T*, double, double,          \
                                 HeadTerm<T>, T*, T*, Launch);
HGK_INSTANTIATE_PLANS(float)
HGK_INSTANTIATE_PLANS(double)
#undef HGK_INSTANTIATE_PLANS

}  // namespace hgk
