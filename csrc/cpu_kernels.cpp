// CPU kernels (OpenMP). Work is split into fixed tasks (environment × row block × column
// block) whose boundaries depend only on the problem's shape, and each output element is
// summed by one task in row order, so results are bitwise identical for any thread count.
// Inner loops run over contiguous columns into small accumulator tiles kept in L1, which
// the compiler vectorizes without reassociating any sum.
#include <algorithm>
#include <vector>

#include "hgk_kernels.h"

namespace hgk {
namespace {

constexpr int kLanes = 8;         // dot-product partial sums per pair (one AVX register of floats)
constexpr int kDotRows = 2;       // samples per dot micro-tile
constexpr int kDotMats = 4;       // matrix rows per dot micro-tile
constexpr int kRowBlock = 16;     // sorted samples per task (and per backward pass block)
constexpr int kMatBlock = 32;     // matrix rows per dots task
constexpr int kColBlock = 64;     // head columns per accumulator tile
constexpr int kReduceRows = 4;    // coefficient columns per reduce tile

struct Task {
  int env;
  int64_t row_begin, row_end;
  int col_begin, col_end;
};

// Environment blocks of `row_block` sorted rows crossed with column blocks of [0, cols).
std::vector<Task> tasks(const Segments& s, int64_t row_block, int cols, int col_block) {
  std::vector<Task> out;
  for (int e = 0; e < s.num_envs; ++e)
    for (int64_t r = s.offsets[e]; r < s.offsets[e + 1]; r += row_block)
      for (int c = 0; c < cols; c += col_block)
        out.push_back({e, r, std::min(r + row_block, s.offsets[e + 1]), c, std::min(c + col_block, cols)});
  return out;
}

int env_of(const Segments& s, int64_t j) {
  return int(std::upper_bound(s.offsets, s.offsets + s.num_envs + 1, j) - s.offsets) - 1;
}

template <typename T>
T inv_count(const Segments& s, int e) {
  return T(1) / T(s.offsets[e + 1] - s.offsets[e]);
}

template <typename T, bool Square, int Mats>
void dots_tile(const T* const* x, const T* const* m, int D, T (*out)[kDotMats]) {
  T acc[kDotRows][Mats][kLanes] = {};
  int d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int r = 0; r < kDotRows; ++r) {
      T xv[kLanes];
      for (int l = 0; l < kLanes; ++l) xv[l] = Square ? x[r][d + l] * x[r][d + l] : x[r][d + l];
      for (int q = 0; q < Mats; ++q)
        for (int l = 0; l < kLanes; ++l) acc[r][q][l] += xv[l] * m[q][d + l];
    }
  for (int r = 0; r < kDotRows; ++r)
    for (int q = 0; q < Mats; ++q) {
      T total = T(0);
      for (int l = 0; l < kLanes; ++l) total += acc[r][q][l];
      for (int t = d; t < D; ++t) total += (Square ? x[r][t] * x[r][t] : x[r][t]) * m[q][t];
      out[r][q] = total;
    }
}

// out[j * M + m] = mats[m] . x_j (x_j = zh_j, or zh_j ⊙ zh_j when Square) for sorted rows
// [row_begin, row_end) and matrix rows [mat_begin, mat_end) of one environment's (M, Dh) mats.
template <typename T, bool Square>
void dots_block(const Head<T>& h, const Segments& s, int64_t row_begin, int64_t row_end, const T* mats, int M,
                int mat_begin, int mat_end, T* out) {
  const int Dh = h.head_width();
  for (int64_t j = row_begin; j < row_end; j += kDotRows) {
    const T* x[kDotRows];
    for (int r = 0; r < kDotRows; ++r)  // rows past the block repeat its last one; never stored
      x[r] = h.features + s.order[std::min(j + r, row_end - 1)] * h.features_row_stride;
    for (int q0 = mat_begin; q0 < mat_end; q0 += kDotMats) {
      const T* m[kDotMats];
      for (int q = 0; q < kDotMats; ++q) m[q] = mats + int64_t(std::min(q0 + q, mat_end - 1)) * Dh;
      T tile[kDotRows][kDotMats];
      if (q0 + kDotMats <= mat_end)
        dots_tile<T, Square, kDotMats>(x, m, h.D, tile);
      else  // the last few matrix rows, one at a time (C = 1 heads have only these)
        for (int q = 0; q < mat_end - q0; ++q) {
          T one[kDotRows][kDotMats];
          dots_tile<T, Square, 1>(x, m + q, h.D, one);
          for (int r = 0; r < kDotRows; ++r) tile[r][q] = one[r][0];
        }
      for (int r = 0; r < kDotRows && j + r < row_end; ++r)
        for (int q = 0; q < kDotMats && q0 + q < mat_end; ++q)
          out[(j + r) * M + q0 + q] = tile[r][q] + (h.bias ? m[q][h.D] : T(0));  // bias: zh_D = 1
    }
  }
}

// d_features of sorted rows [row_begin, row_end) of environment env (at most kRowBlock):
// coef @ mats + zh ⊙ (coef_sq @ gam), the feature columns only.
template <typename T>
void expand_block(const Head<T>& h, const Segments& s, int env, int64_t row_begin, int64_t row_end, const T* coef,
                  const T* mats, int M, const T* coef_sq, const T* gam, T* d_features) {
  const int Dh = h.head_width(), C = h.C;
  const int rows = int(row_end - row_begin);
  for (int d0 = 0; d0 < h.D; d0 += kColBlock) {
    const int cols = std::min(kColBlock, h.D - d0);
    T acc[kRowBlock][kColBlock] = {};
    for (int m = 0; m < M; ++m) {
      const T* mrow = mats + (int64_t(env) * M + m) * Dh + d0;
      for (int r = 0; r < rows; ++r) {
        const T cf = coef[(row_begin + r) * M + m];
        for (int d = 0; d < cols; ++d) acc[r][d] += cf * mrow[d];
      }
    }
    if (gam) {
      T acc_sq[kRowBlock][kColBlock] = {};
      for (int c = 0; c < C; ++c) {
        const T* grow = gam + (int64_t(env) * C + c) * Dh + d0;
        for (int r = 0; r < rows; ++r) {
          const T cf = coef_sq[(row_begin + r) * C + c];
          for (int d = 0; d < cols; ++d) acc_sq[r][d] += cf * grow[d];
        }
      }
      for (int r = 0; r < rows; ++r) {
        const T* x = h.features + s.order[row_begin + r] * h.features_row_stride + d0;
        for (int d = 0; d < cols; ++d) acc[r][d] += x[d] * acc_sq[r][d];
      }
    }
    for (int r = 0; r < rows; ++r)
      std::copy(acc[r], acc[r] + cols, d_features + s.order[row_begin + r] * h.D + d0);
  }
}

// out[e] = sum_{j in e} coef_j^T x_j over (E, W, Dh); x_j = zh_j ⊙ zh_j for coefficient columns in
// [square_begin, square_end), zh_j for the others. One task per (environment, column tile) sums its
// whole environment in row order.
template <typename T>
void reduce(const Head<T>& h, const Segments& s, const T* coef, int W, int square_begin, int square_end, T* out,
            Launch launch) {
  const int Dh = h.head_width();
  struct Tile {
    int env, coef_begin, coef_end, col_begin, col_end;
  };
  std::vector<Tile> tiles;
  for (int e = 0; e < s.num_envs; ++e)
    for (int c = 0; c < W; c += kReduceRows)
      for (int d = 0; d < Dh; d += kColBlock)
        tiles.push_back({e, c, std::min(c + kReduceRows, W), d, std::min(d + kColBlock, Dh)});
#pragma omp parallel for schedule(static) num_threads(launch.threads)
  for (int64_t t = 0; t < int64_t(tiles.size()); ++t) {
    const Tile& tile = tiles[t];
    const int c0 = tile.coef_begin, rows = tile.coef_end - tile.coef_begin;
    const int d0 = tile.col_begin, cols = tile.col_end - tile.col_begin;
    const int feature_cols = std::max(0, std::min(cols, h.D - d0));  // the rest is the bias column
    bool square[kReduceRows];
    for (int c = 0; c < rows; ++c) square[c] = c0 + c >= square_begin && c0 + c < square_end;
    T acc[kReduceRows][kColBlock] = {};
    T x[kColBlock], x2[kColBlock];
    for (int64_t j = s.offsets[tile.env]; j < s.offsets[tile.env + 1]; ++j) {
      const T* row = h.features + s.order[j] * h.features_row_stride + d0;
      for (int d = 0; d < feature_cols; ++d) x[d] = row[d];
      for (int d = feature_cols; d < cols; ++d) x[d] = T(1);
      for (int d = 0; d < cols; ++d) x2[d] = x[d] * x[d];
      const T* cf = coef + j * W + c0;
      for (int c = 0; c < rows; ++c) {
        const T* src = square[c] ? x2 : x;
        for (int d = 0; d < cols; ++d) acc[c][d] += cf[c] * src[d];
      }
    }
    for (int c = 0; c < rows; ++c)
      std::copy(acc[c], acc[c] + cols, out + (int64_t(tile.env) * W + c0 + c) * Dh + d0);
  }
}

}  // namespace

template <typename T>
void head_stats(const Head<T>& h, const Segments& s, StatsLayout layout, const T* dirs, T* work, T* out,
                Launch launch) {
  const int C = h.C, KC = layout.K * C, W = layout.width();
  const int64_t N = s.num_samples;
  T* dirs_dots = work;
  T* p_scratch = dirs_dots + N * KC;
  T* coef = p_scratch + N * C;
  if (KC) {  // s_k = V_k zh for every sample: tiles of rows × direction rows
    const std::vector<Task> work_tasks = tasks(s, kRowBlock, KC, kMatBlock);
#pragma omp parallel for schedule(static) num_threads(launch.threads)
    for (int64_t t = 0; t < int64_t(work_tasks.size()); ++t) {
      const Task& task = work_tasks[t];
      dots_block<T, false>(h, s, task.row_begin, task.row_end, dirs + int64_t(task.env) * KC * h.head_width(), KC,
                           task.col_begin, task.col_end, dirs_dots);
    }
  }
#pragma omp parallel for schedule(static) num_threads(launch.threads)
  for (int64_t j = 0; j < N; ++j) {
    const int64_t i = s.order[j];
    stats_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i),
                 inv_count<T>(s, env_of(s, j)), dirs_dots + j * KC, p_scratch + j * C, coef + j * W);
  }
  const int diag_begin = layout.diag_begin();
  reduce<T>(h, s, coef, W, diag_begin, layout.hess_diag ? diag_begin + C : diag_begin, out, launch);
}

// One pass over the features: each task takes a block of one environment's rows through
// dots, the per-sample math and the expansion back to d_features while they are in cache.
template <typename T>
void per_sample_backward(const Head<T>& h, const Segments& s, BackwardLayout layout, const T* mats, const T* gam,
                         T* work, T* d_logits, T* d_features, Launch launch) {
  const int C = h.C, W = layout.width(), Dh = h.head_width();
  const int64_t N = s.num_samples;
  T* dots = work;
  T* dots_sq = dots + N * W;
  T* scratch = dots_sq + N * C;
  T* coef = scratch + 2 * N * C;
  T* coef_sq = coef + N * W;
  const std::vector<Task> blocks = tasks(s, kRowBlock, 1, 1);
#pragma omp parallel for schedule(static) num_threads(launch.threads)
  for (int64_t t = 0; t < int64_t(blocks.size()); ++t) {
    const Task& block = blocks[t];
    const int e = block.env;
    dots_block<T, false>(h, s, block.row_begin, block.row_end, mats + int64_t(e) * W * Dh, W, 0, W, dots);
    if (gam) dots_block<T, true>(h, s, block.row_begin, block.row_end, gam + int64_t(e) * C * Dh, C, 0, C, dots_sq);
    const T w = inv_count<T>(s, e);
    for (int64_t j = block.row_begin; j < block.row_end; ++j) {
      const int64_t i = s.order[j];
      backward_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i), w,
                      dots + j * W, gam ? dots_sq + j * C : nullptr, scratch + j * 2 * C, scratch + j * 2 * C + C,
                      coef + j * W, gam ? coef_sq + j * C : nullptr, d_logits + i * C, 1);
    }
    expand_block<T>(h, s, e, block.row_begin, block.row_end, coef, mats, W, coef_sq, gam, d_features);
  }
}

template void head_stats<float>(const Head<float>&, const Segments&, StatsLayout, const float*, float*, float*,
                                Launch);
template void head_stats<double>(const Head<double>&, const Segments&, StatsLayout, const double*, double*, double*,
                                 Launch);
template void per_sample_backward<float>(const Head<float>&, const Segments&, BackwardLayout, const float*,
                                         const float*, float*, float*, float*, Launch);
template void per_sample_backward<double>(const Head<double>&, const Segments&, BackwardLayout, const double*,
                                          const double*, double*, double*, double*, Launch);

}  // namespace hgk
