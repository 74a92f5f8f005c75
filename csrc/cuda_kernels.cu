// CUDA kernels: the same per-sample math (hgk_math.h) as the CPU kernels, in simple launches
// whose every sum runs in a fixed order (one thread or one warp per output, rows in sorted
// order, a fixed shuffle tree), so results do not depend on scheduling.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "hgk_kernels.h"

namespace hgk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

int blocks_for(int64_t work) { return int((work + kThreads - 1) / kThreads); }

__device__ int env_of(const Segments& s, int64_t j) {
  int lo = 0, hi = s.num_envs;  // offsets[lo] <= j < offsets[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (s.offsets[mid] <= j) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
__device__ T inv_count(const Segments& s, int e) {
  return T(1) / T(s.offsets[e + 1] - s.offsets[e]);
}

// out[j * out_stride + m] = mats[e(j), m] . x_j (x_j = zh_j, or zh_j ⊙ zh_j when square), mats (E, M, Dh):
// one warp per (j, m).
template <typename T>
__global__ void dots_kernel(Head<T> h, Segments s, const T* mats, int M, bool square, T* out, int64_t out_stride) {
  const int64_t pair = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= s.num_samples * M) return;
  const int64_t j = pair / M;
  const int m = int(pair % M);
  const int Dh = h.head_width();
  const T* x = h.features + s.order[j] * h.features_row_stride;
  const T* row = mats + (int64_t(env_of(s, j)) * M + m) * Dh;
  T acc = T(0);
  for (int d = lane; d < h.D; d += kWarp) acc += (square ? x[d] * x[d] : x[d]) * row[d];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[j * out_stride + m] = acc + (h.bias ? row[h.D] : T(0));  // bias: zh_D = 1
}

template <typename T>
__global__ void stats_rows_kernel(Head<T> h, Segments s, StatsLayout layout, const T* dirs_dots, T* p_scratch,
                                  T* coef) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= s.num_samples) return;
  const int64_t i = s.order[j];
  stats_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i),
               inv_count<T>(s, env_of(s, j)), dirs_dots + j * layout.K * h.C, p_scratch + j * h.C,
               coef + j * layout.width());
}

// out[e, c, d] = sum_{j in e} coef[j, c] x_j[d]: one thread per output, rows in sorted order.
template <typename T>
__global__ void reduce_kernel(Head<T> h, Segments s, const T* coef, int W, int square_begin, int square_end,
                              T* out) {
  const int Dh = h.head_width();
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= int64_t(s.num_envs) * W * Dh) return;
  const int d = int(index % Dh);
  const int c = int((index / Dh) % W);
  const int e = int(index / (int64_t(Dh) * W));
  const bool square = c >= square_begin && c < square_end;
  T acc = T(0);
  for (int64_t j = s.offsets[e]; j < s.offsets[e + 1]; ++j) {
    const T x = d < h.D ? h.features[s.order[j] * h.features_row_stride + d] : T(1);
    acc += coef[j * W + c] * (square ? x * x : x);
  }
  out[index] = acc;
}

template <typename T>
__global__ void backward_rows_kernel(Head<T> h, Segments s, BackwardLayout layout, T* dots, const T* dots_sq,
                                     T* scratch, T* coef, T* coef_sq, T* d_logits) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= s.num_samples) return;
  const int64_t i = s.order[j];
  const int C = h.C, W = layout.width();
  backward_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i),
                  inv_count<T>(s, env_of(s, j)), dots + j * W, dots_sq ? dots_sq + j * C : nullptr,
                  scratch + j * 2 * C, scratch + j * 2 * C + C, coef + j * W, coef_sq ? coef_sq + j * C : nullptr,
                  d_logits + i * C, 1);
}

// Per-environment (E, rows, Dh) matrices whose row m pairs with coefficient column first_coef + m.
template <typename T>
struct Part {
  const T* mats;
  int rows, first_coef;
};

template <typename T>
struct Parts {
  Part<T> part[3];
  int count;
};

// d_features[i, d] = sum over parts of coef_j . part[e][:, d] + zh_j[d] (coef_sq_j . gam[e][:, d]):
// one thread per (j, d).
template <typename T>
__global__ void expand_kernel(Head<T> h, Segments s, const T* coef, int W, Parts<T> parts, const T* coef_sq,
                              const T* gam, T* d_features) {
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= s.num_samples * h.D) return;
  const int d = int(index % h.D);
  const int64_t j = index / h.D;
  const int e = env_of(s, j);
  const int Dh = h.head_width(), C = h.C;
  const int64_t i = s.order[j];
  T acc = T(0);
  for (int p = 0; p < parts.count; ++p) {
    const Part<T> part = parts.part[p];
    const T* mats = part.mats + int64_t(e) * part.rows * Dh + d;
    for (int m = 0; m < part.rows; ++m) acc += coef[j * W + part.first_coef + m] * mats[int64_t(m) * Dh];
  }
  if (gam) {
    T acc_sq = T(0);
    for (int c = 0; c < C; ++c) acc_sq += coef_sq[j * C + c] * gam[(int64_t(e) * C + c) * Dh + d];
    acc += h.features[i * h.features_row_stride + d] * acc_sq;
  }
  d_features[i * h.D + d] = acc;
}

template <typename T>
void dots(const Head<T>& h, const Segments& s, const T* mats, int M, bool square, T* out, int64_t out_stride,
          cudaStream_t stream) {
  if (M == 0 || s.num_samples == 0) return;
  dots_kernel<T><<<blocks_for(s.num_samples * M * kWarp), kThreads, 0, stream>>>(h, s, mats, M, square, out,
                                                                                 out_stride);
  check(cudaGetLastError(), "hgkernels dots kernel");
}

}  // namespace

namespace cuda {

template <typename T>
void head_stats(const Head<T>& h, const Segments& s, StatsLayout layout, const T* dirs, T* work, T* out,
                Launch launch) {
  const auto stream = reinterpret_cast<cudaStream_t>(launch.stream);
  const int C = h.C, KC = layout.K * C, W = layout.width();
  const int64_t N = s.num_samples;
  T* dirs_dots = work;
  T* p_scratch = dirs_dots + N * KC;
  T* coef = p_scratch + N * C;
  dots<T>(h, s, dirs, KC, false, dirs_dots, KC, stream);
  stats_rows_kernel<T><<<blocks_for(N), kThreads, 0, stream>>>(h, s, layout, dirs_dots, p_scratch, coef);
  check(cudaGetLastError(), "hgkernels stats_rows kernel");
  const int diag_begin = layout.diag_begin();
  const int64_t outputs = int64_t(s.num_envs) * W * h.head_width();
  if (outputs == 0) return;
  reduce_kernel<T><<<blocks_for(outputs), kThreads, 0, stream>>>(
      h, s, coef, W, diag_begin, layout.hess_diag ? diag_begin + C : diag_begin, out);
  check(cudaGetLastError(), "hgkernels reduce kernel");
}

template <typename T>
bool per_sample_backward(const Head<T>& h, const Segments& s, BackwardLayout layout, const T* grad_up, const T* dirs,
                         const T* ups, const T* gam, HeadTerm<T> head, T* work, T* d_logits, T* d_features,
                         Launch launch) {
  // The fused head term is the CPU kernels' (native.py adds it with torch ops on CUDA).
  if (head.weight) throw std::invalid_argument("hgkernels: the CUDA per-sample backward takes no fused head term");
  const auto stream = reinterpret_cast<cudaStream_t>(launch.stream);
  const int C = h.C, KC = layout.K * h.C, W = layout.width();
  const int64_t N = s.num_samples;
  const BackwardWork<T> buf(work, N, layout);
  T *dots_out = buf.dots, *dots_sq = buf.dots_sq, *scratch = buf.scratch, *coef = buf.coef, *coef_sq = buf.coef_sq;
  Parts<T> parts{};
  if (layout.gradient) parts.part[parts.count++] = {grad_up, C, 0};
  if (KC) {
    parts.part[parts.count++] = {dirs, KC, layout.dirs_begin()};
    parts.part[parts.count++] = {ups, KC, layout.ups_begin()};
  }
  for (int p = 0; p < parts.count; ++p)
    dots<T>(h, s, parts.part[p].mats, parts.part[p].rows, false, dots_out + parts.part[p].first_coef, W, stream);
  if (gam) dots<T>(h, s, gam, C, true, dots_sq, C, stream);
  backward_rows_kernel<T><<<blocks_for(N), kThreads, 0, stream>>>(
      h, s, layout, dots_out, gam ? dots_sq : nullptr, scratch, coef, gam ? coef_sq : nullptr, d_logits);
  check(cudaGetLastError(), "hgkernels backward_rows kernel");
  expand_kernel<T><<<blocks_for(N * h.D), kThreads, 0, stream>>>(h, s, coef, W, parts, gam ? coef_sq : nullptr, gam,
                                                                 d_features);
  check(cudaGetLastError(), "hgkernels expand kernel");
  return false;
}

HGK_INSTANTIATE_PRIMITIVES(float)
HGK_INSTANTIATE_PRIMITIVES(double)

}  // namespace cuda
}  // namespace hgk
