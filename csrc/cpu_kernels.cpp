// CPU kernels (OpenMP). Work is split into fixed tasks (environment × row block × column
// block) whose boundaries depend only on the problem's shape, and each output element is
// summed by one task in a fixed order, so results are bitwise identical for any thread count.
// The GEMM-shaped sums (sum_i coef_i zh_i^T, coef @ matrices, matrices @ zh) run through
// small register tiles of SIMD vectors: each lane is its own sum, so nothing is reassociated.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "hgk_kernels.h"
#include "hgk_tuning.h"

namespace hgk {
namespace {

constexpr int kMaxParts = 6;  // a backward's per-environment matrices: Lam, two runs each of V and U, a head

// Threads for a region of `work` multiply-adds (kMinParallelWork).
int threads_for(Launch launch, double work) { return work >= kMinParallelWork ? launch.threads : 1; }

// Rows per task for work that is independent per row (dots, the per-sample backward): kRowBlock,
// or fewer for small batches, so each thread gets a few tasks (whole blocks leave threads unevenly
// loaded). Per-row results do not depend on the blocking.
int64_t row_block_for(int64_t num_samples, int threads) {
  return std::max<int64_t>(kTileRows, std::min<int64_t>(kRowBlock, (num_samples + kTasksPerThread * threads - 1) / (kTasksPerThread * threads)));
}

// Pieces of the sorted rows, piece p being [N p / P, N (p + 1) / P): a multiple of the thread count, so a
// static schedule gives each thread the same number of rows whatever the environments' sizes (per-environment
// blocks do not), and of about kRowBlock rows.
int64_t row_pieces(int64_t num_samples, int threads) {
  const int64_t per_thread = (num_samples / threads + kRowBlock - 1) / kRowBlock;
  return std::max<int64_t>(2, per_thread) * threads;
}

// fn(e, begin, end) for each environment's part of sorted rows [row_begin, row_end), in order (from the first
// environment ending past row_begin: a search, so that pieces of rows do not each walk every environment).
template <typename Fn>
void env_runs(const Segments& s, int64_t row_begin, int64_t row_end, Fn&& fn) {
  const int64_t* first = std::upper_bound(s.offsets + 1, s.offsets + s.num_envs + 1, row_begin);
  for (int e = int(first - (s.offsets + 1)); e < s.num_envs && s.offsets[e] < row_end; ++e) {
    const int64_t begin = std::max(row_begin, s.offsets[e]), end = std::min(row_end, s.offsets[e + 1]);
    if (begin < end) fn(e, begin, end);
  }
}

struct Task {
  int env;
  int64_t row_begin, row_end;
};

// Blocks of `row_block` rows in the caller's order, across environments (env = -1).
std::vector<Task> natural_blocks(const Segments& s, int64_t row_block) {
  std::vector<Task> out;
  for (int64_t r = 0; r < s.num_samples; r += row_block) out.push_back({-1, r, std::min(r + row_block, s.num_samples)});
  return out;
}

// Blocks of `row_block` sorted rows within each environment.
std::vector<Task> env_blocks(const Segments& s, int64_t row_block) {
  std::vector<Task> out;
  for (int e = 0; e < s.num_envs; ++e)
    for (int64_t r = s.offsets[e]; r < s.offsets[e + 1]; r += row_block)
      out.push_back({e, r, std::min(r + row_block, s.offsets[e + 1])});
  return out;
}

template <typename T>
T inv_count(const Segments& s, int e) {
  return T(1) / T(s.offsets[e + 1] - s.offsets[e]);
}

// One SIMD register of T through the GCC/Clang vector extension (the compiler's auto-vectorizer
// does not keep the accumulator tiles below in registers); loads need only T's alignment.
// 32-byte vectors, and kWideBytes ones where hgk_tuning.h says they gain.
template <typename T, int Bytes = 32>
struct Simd {
  typedef T type __attribute__((vector_size(Bytes), aligned(sizeof(T))));
  static constexpr int lanes = Bytes / sizeof(T);
  static type load(const T* p) { return *reinterpret_cast<const type*>(p); }
  static void store(T* p, type v) { *reinterpret_cast<type*>(p) = v; }
};

// Keeps v in a register: the compiler otherwise folds a vector's load into each multiply-add that
// uses it (one load per use), and a tile's loads, not its multiply-adds, then bound it. Only on x86-64 and
// where V fits one register of the build's widest (without AVX a 32-byte vector is an SSE pair).
template <typename V>
void keep_in_register(V& v) {
#if defined(__x86_64__)
#if defined(__AVX512F__)
  constexpr size_t kRegisterBytes = 64;
#elif defined(__AVX__)
  constexpr size_t kRegisterBytes = 32;
#else
  constexpr size_t kRegisterBytes = 16;
#endif
  if constexpr (sizeof(V) <= kRegisterBytes) asm("" : "+v"(v));
#endif
}

// The end of every SIMD dot product: its lanes' partial sums added in lane order, then the columns
// [d, D) past the last full vector (x squared when Square). One order for all of them, so the tiled,
// paired and single dots give the same bits.
template <typename T, bool Square, int Bytes = 32>
T finish_dot(const typename Simd<T, Bytes>::type& acc, const T* x, const T* m, int d, int D) {
  T total = T(0);
  for (int l = 0; l < Simd<T, Bytes>::lanes; ++l) total += acc[l];
  for (int t = d; t < D; ++t) total += (Square ? x[t] * x[t] : x[t]) * m[t];
  return total;
}

// out[r][q] = m[q] . x[r] over D (x squared when Square) for Rows rows: lanes of partial sums per pair,
// added in lane order.
template <typename T, bool Square, int Mats, int Rows = kDotRows, int Bytes = 32>
void dots_tile(const T* const* x, const T* const* m, int D, T (*out)[kDotMats]) {
  using V = Simd<T, Bytes>;
  typename V::type acc[Rows][Mats] = {};
  int d = 0;
  for (; d + V::lanes <= D; d += V::lanes) {
    typename V::type mv[Mats];
    for (int q = 0; q < Mats; ++q) {
      mv[q] = V::load(m[q] + d);
      keep_in_register(mv[q]);
    }
    for (int r = 0; r < Rows; ++r) {
      typename V::type xv = V::load(x[r] + d);
      keep_in_register(xv);
      if (Square) xv = xv * xv;
      for (int q = 0; q < Mats; ++q) acc[r][q] += xv * mv[q];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int q = 0; q < Mats; ++q) out[r][q] = finish_dot<T, Square, Bytes>(acc[r][q], x[r], m[q], d, D);
}

// dots_tile for n <= kDotMats matrix rows: one register tile of the width at hand (a tile per row
// re-reads the samples for each of the last few rows).
template <typename T, bool Square, int Rows, int Bytes = 32>
void dots_tile_n(const T* const* x, const T* const* m, int n, int D, T (*out)[kDotMats]) {
  switch (n) {
    case 1: dots_tile<T, Square, 1, Rows, Bytes>(x, m, D, out); break;
    case 2: dots_tile<T, Square, 2, Rows, Bytes>(x, m, D, out); break;
    case 3: dots_tile<T, Square, 3, Rows, Bytes>(x, m, D, out); break;
    default: dots_tile<T, Square, kDotMats, Rows, Bytes>(x, m, D, out);
  }
}

// out[j * out_stride + m] = mats[m] . x_j (x_j = zh_j, or zh_j ⊙ zh_j when Square) for sorted rows
// [row_begin, row_end) and matrix rows [mat_begin, mat_end) of one environment's (rows, Dh) mats.
// Tiles of Rows samples by kDotMats matrix rows of Bytes-wide vectors: every row goes through the same
// tile code wherever a block starts (blocks follow the thread count), so its bits do not depend on it.
template <typename T, bool Square, int Rows = kDotRows, int Bytes = 32>
void dots_block(const Head<T>& h, const Segments& s, int64_t row_begin, int64_t row_end, const T* mats,
                int mat_begin, int mat_end, T* out, int64_t out_stride) {
  const int Dh = h.head_width();
  // Matrix rows outer: each quad of rows is read from memory once per block of samples.
  for (int q0 = mat_begin; q0 < mat_end; q0 += kDotMats) {
    const T* m[kDotMats];
    for (int q = 0; q < kDotMats; ++q) m[q] = mats + int64_t(std::min(q0 + q, mat_end - 1)) * Dh;
    for (int64_t j = row_begin; j < row_end; j += Rows) {
      const T* x[Rows];
      for (int r = 0; r < Rows; ++r)  // rows past the block repeat its last one; never stored
        x[r] = h.features + s.order[std::min(j + r, row_end - 1)] * h.features_row_stride;
      T tile[Rows][kDotMats];
      dots_tile_n<T, Square, Rows, Bytes>(x, m, std::min(kDotMats, mat_end - q0), h.D, tile);
      for (int r = 0; r < Rows && j + r < row_end; ++r)
        for (int q = 0; q < kDotMats && q0 + q < mat_end; ++q)
          out[(j + r) * out_stride + q0 + q] = tile[r][q] + (h.bias ? m[q][h.D] : T(0));  // bias: zh_D = 1
    }
  }
}

// dots_block for the statistics' direction dots and the blocked backward: tiles of kPassRows samples of
// 64-byte vectors (AVX-512 builds) from kWideMinClasses classes; smaller heads keep 2-sample tiles of
// 32-byte vectors.
template <typename T, bool Square>
void wide_dots_block(const Head<T>& h, const Segments& s, int64_t row_begin, int64_t row_end, const T* mats,
                     int mat_begin, int mat_end, T* out, int64_t out_stride) {
  if (h.C >= kWideMinClasses)
    dots_block<T, Square, kPassRows, kWideBytes>(h, s, row_begin, row_end, mats, mat_begin, mat_end, out, out_stride);
  else
    dots_block<T, Square>(h, s, row_begin, row_end, mats, mat_begin, mat_end, out, out_stride);
}

// acc[r][v] += sum_k a[k][r] * b[k][v] for r < Rows, k < K: the register tile of reduce and expand
// (a: K x kTileRows with stride a_stride, b: K rows of kTileCols with stride b_stride).
template <typename T, int Rows = kTileRows>
void rank_k_tile(int K, const T* a, int64_t a_stride, const T* b, int64_t b_stride, T (*acc)[kTileCols]) {
  using V = Simd<T, kWideBytes>;
  constexpr int vecs = kTileCols / V::lanes;
  typename V::type tile[Rows][vecs];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < vecs; ++v) tile[r][v] = V::load(acc[r] + v * V::lanes);
  for (int k = 0; k < K; ++k) {
    typename V::type bk[vecs];
    for (int v = 0; v < vecs; ++v) bk[v] = V::load(b + k * b_stride + v * V::lanes);
    for (int r = 0; r < Rows; ++r) {
      const T ak = a[k * a_stride + r];
      for (int v = 0; v < vecs; ++v) tile[r][v] += ak * bk[v];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < vecs; ++v) V::store(acc[r] + v * V::lanes, tile[r][v]);
}

// One environment's (rows, Dh) matrix whose row m pairs with coefficient column first_coef + m.
template <typename T>
struct Part {
  const T* mats;
  int rows, first_coef;
};

// acc (kRowBlock, D) += coef[:, part] @ part.mats[:, :D] for the block's rows: panels of kPanelRows
// matrix rows (a few pages, so the column sweep stays within the TLB) by register tiles.
template <typename T>
void expand_part(const Head<T>& h, const Part<T>& part, const T* coef_t, int rows, T* acc) {
  const int Dh = h.head_width(), D = h.D, full = D - D % kTileCols;
  for (int m0 = 0; m0 < part.rows; m0 += kPanelRows) {
    const int panel = std::min(kPanelRows, part.rows - m0);
    const T* a = coef_t + size_t(part.first_coef + m0) * kRowBlock;
    const T* b = part.mats + int64_t(m0) * Dh;
    for (int d0 = 0; d0 < full; d0 += kTileCols)
      for (int r0 = 0; r0 < rows; r0 += kTileRows) {
        T tile[kTileRows][kTileCols];
        for (int r = 0; r < kTileRows; ++r) std::copy(acc + size_t(r0 + r) * D + d0, acc + size_t(r0 + r) * D + d0 + kTileCols, tile[r]);
        rank_k_tile<T>(panel, a + r0, kRowBlock, b + d0, Dh, tile);
        for (int r = 0; r < kTileRows; ++r) std::copy(tile[r], tile[r] + kTileCols, acc + size_t(r0 + r) * D + d0);
      }
    for (int m = 0; m < panel; ++m)  // columns past the last full tile
      for (int r = 0; r < rows; ++r)
        for (int d = full; d < D; ++d) acc[size_t(r) * D + d] += a[size_t(m) * kRowBlock + r] * b[int64_t(m) * Dh + d];
  }
}

// out[r][q] = mats[q] . x[r] over D for q < n and R rows (x squared when Square): register tiles of
// R rows by up to kDotMats matrix rows (runtime-indexed accumulators would live on the stack, and their
// loads and stores would bound the per-sample backward). Each dot in finish_dot's order, the blocked path's
// order (the compiler may contract multiply-adds differently in each tile's code, so the last bit of a
// row can depend on the tile that computed it: see the passes of backward_rows_direct).
template <typename T, bool Square, int R, int Cap, int Bytes>
void rows_dots(const T* const* x, const T* const* mats, int n, int D, T (*out)[Cap]) {
  for (int q0 = 0; q0 < n; q0 += kDotMats) {
    T tile[R][kDotMats];
    dots_tile_n<T, Square, R, Bytes>(x, mats + q0, std::min(kDotMats, n - q0), D, tile);
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < kDotMats && q0 + q < n; ++q) out[r][q0 + q] = tile[r][q];
  }
}

// R samples' d_features for few matrix rows (W + C <= kDirectBackwardRows): coef @ the
// stacked rows (mats, W of them) + x ⊙ (coef_sq @ gam). Register tiles of R rows by Vecs SIMD vectors of
// columns (each matrix vector loaded once for the R rows); every element sums its rows in order (the
// matrix rows, then the Gam rows times x) in any tile.
template <typename T, int R, int Cap, int Vecs, int Bytes>
void expand_rows_tile(const T* const* x, const T (*coef)[2 * Cap], const T* const* mats, int W,
                      const T (*coef_sq)[Cap], const T* gam, int C, int64_t Dh, int d, T* const* dx) {
  using V = Simd<T, Bytes>;
  typename V::type acc[R][Vecs] = {};
  for (int m = 0; m < W; ++m) {
    typename V::type mv[Vecs];
    for (int v = 0; v < Vecs; ++v) {
      mv[v] = V::load(mats[m] + d + v * V::lanes);
      keep_in_register(mv[v]);
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < Vecs; ++v) acc[r][v] += coef[r][m] * mv[v];
  }
  if (gam) {
    typename V::type acc_sq[R][Vecs] = {};
    for (int c = 0; c < C; ++c) {
      typename V::type gv[Vecs];
      for (int v = 0; v < Vecs; ++v) {
        gv[v] = V::load(gam + c * Dh + d + v * V::lanes);
        keep_in_register(gv[v]);
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < Vecs; ++v) acc_sq[r][v] += coef_sq[r][c] * gv[v];
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < Vecs; ++v) acc[r][v] += V::load(x[r] + d + v * V::lanes) * acc_sq[r][v];
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < Vecs; ++v) V::store(dx[r] + d + v * V::lanes, acc[r][v]);
}

template <typename T, int R, int Cap, int Bytes>
void expand_rows_direct(const T* const* x, const T (*coef)[2 * Cap], const T* const* mats, int W,
                        const T (*coef_sq)[Cap], const T* gam, int C, int D, int64_t Dh, T* const* dx) {
  const int lanes = Simd<T, Bytes>::lanes, wide = D - D % (kExpandVecs * lanes), full = D - D % lanes;
  int d = 0;
  for (; d < wide; d += kExpandVecs * lanes)
    expand_rows_tile<T, R, Cap, kExpandVecs, Bytes>(x, coef, mats, W, coef_sq, gam, C, Dh, d, dx);
  for (; d < full; d += lanes) expand_rows_tile<T, R, Cap, 1, Bytes>(x, coef, mats, W, coef_sq, gam, C, Dh, d, dx);
  for (int r = 0; r < R; ++r)
    for (d = full; d < D; ++d) {
      T acc = T(0), acc_sq = T(0);
      for (int m = 0; m < W; ++m) acc += coef[r][m] * mats[m][d];
      if (gam) {
        for (int c = 0; c < C; ++c) acc_sq += coef_sq[r][c] * gam[c * Dh + d];
        acc += x[r][d] * acc_sq;
      }
      dx[r][d] = acc;
    }
}

// The fused head's gradient from a pass of R rows: part[c][:D] += sum_r a[r][first + c] x[r] and, with a bias,
// part[c][D] += sum_r a[r][first + c], adding the rows in order. One load and store of `part` per pass
// (per row, those loads and stores would bound it).
template <typename T, int R, int Cap, int Bytes>
void head_rows_update(const T (*a)[2 * Cap], int first, const T* const* x, int C, int D, bool bias, int64_t Dh,
                      T* part) {
  using V = Simd<T, Bytes>;
  int d = 0;
  for (; d + V::lanes <= D; d += V::lanes) {
    typename V::type xv[R];
    for (int r = 0; r < R; ++r) xv[r] = V::load(x[r] + d);
    for (int c = 0; c < C; ++c) {
      T* out = part + c * Dh + d;
      typename V::type acc = V::load(out);
      for (int r = 0; r < R; ++r) acc += a[r][first + c] * xv[r];
      V::store(out, acc);
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int t = d; t < D; ++t)
      for (int r = 0; r < R; ++r) part[c * Dh + t] += a[r][first + c] * x[r][t];
    for (int r = 0; bias && r < R; ++r) part[c * Dh + D] += a[r][first + c];
  }
}

// A row's V and U blocks of dots (BackwardLayout order) from known dots of the caller's row i.
template <typename T>
void copy_known_dots(const KnownDots<T>& known, int64_t i, BackwardLayout layout, T* row, T* gam_row) {
  const int C = layout.C, KC = layout.K * C;
  if (KC) {
    std::copy(known.dirs + i * known.dirs_stride, known.dirs + i * known.dirs_stride + KC, row + layout.dirs_begin());
    std::copy(known.ups + i * known.ups_stride, known.ups + i * known.ups_stride + KC, row + layout.ups_begin());
  }
  for (int c = 0; known.lam_add && layout.gradient && c < C; ++c) row[c] += known.lam_add[i * C + c];
  for (int c = 0; known.gam_add && gam_row && c < C; ++c) gam_row[c] += known.gam_add[i * C + c];
}

// The pairs' terms of caller's row i (KnownDots::pairs) added to its d_features row dx: a strip of columns at a
// time, the sums over the environment's rows in registers.
template <typename T>
void add_pair_terms(const Head<T>& h, const KnownDots<T>& known, int64_t i, T* dx) {
  typedef T Vec __attribute__((vector_size(kWideBytes), aligned(sizeof(T))));
  constexpr int lanes = kWideBytes / sizeof(T), vecs = 4, strip = vecs * lanes;
  const Segments& s = *known.pairs;
  const int64_t at = known.position[i];
  const int e = int(std::upper_bound(s.offsets, s.offsets + s.num_envs + 1, at) - s.offsets) - 1;
  const int64_t first = s.offsets[e], n = s.offsets[e + 1] - first;
  const T* cf = known.pair_coef + known.pair_at[e] + 2 * (at - first) * n;  // (lin, sq) with each row b
  auto row = [&](int64_t b) { return h.features + s.order[first + b] * h.features_row_stride; };
  const T* x = h.features + i * h.features_row_stride;
  const int D = h.D;
  int d = 0;
  for (; d + strip <= D; d += strip) {
    Vec sum[vecs] = {}, sum_sq[vecs] = {};
    for (int64_t b = 0; b < n; ++b)
      for (int v = 0; v < vecs; ++v) {
        const Vec y = *reinterpret_cast<const Vec*>(row(b) + d + v * lanes), y2 = y * y;
        sum[v] += cf[2 * b] * y;
        if (known.pair_squares) sum_sq[v] += cf[2 * b + 1] * y2;
      }
    for (int v = 0; v < vecs; ++v) {
      Vec* out = reinterpret_cast<Vec*>(dx + d + v * lanes);
      *out += known.pair_squares ? sum[v] + *reinterpret_cast<const Vec*>(x + d + v * lanes) * sum_sq[v] : sum[v];
    }
  }
  for (; d < D; ++d) {
    T sum = T(0), sum_sq = T(0);
    for (int64_t b = 0; b < n; ++b) sum += cf[2 * b] * row(b)[d], sum_sq += cf[2 * b + 1] * row(b)[d] * row(b)[d];
    dx[d] += known.pair_squares ? sum + x[d] * sum_sq : sum;
  }
}

// BackwardMatrices' scales on one row's Lam and U entries (row, BackwardLayout's order) and its Gam entries
// (gam_row, nullptr: none): dots before the closed form, coefficients after it.
template <typename T>
void scale_upstream(BackwardLayout layout, const BackwardMatrices<T>& mats, T* row, T* gam_row) {
  for (int c = 0; layout.gradient && c < layout.C; ++c) row[c] *= mats.lam_scale;
  for (int k = layout.ups_begin(); k < layout.width(); ++k) row[k] *= mats.ups_scale;
  for (int c = 0; gam_row && c < layout.C; ++c) gam_row[c] *= mats.gam_scale;
}

// fn(std::integral_constant<int, rows>) for a pass of 1..kPassRows rows.
template <typename Fn>
void with_rows(int rows, Fn&& fn) {
  switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    default: fn(std::integral_constant<int, kPassRows>{});
  }
}

// The whole backward of the caller's rows [row_begin, row_end) (order given: of the sorted rows, whose caller's
// rows order holds), all of one environment (weight w; with row_envs, rows of any environments whose matrices
// are all shared, each weighted by its own environment), for few matrix
// rows: kPassRows samples at a time (the matrices, read from L2 for every row, are loaded once per pass),
// their dots, closed form and d_features while the feature rows are in L1. A head term adds its C
// weight rows to the expansion, with the row's (total) d_logits as their coefficients.
template <typename T, int Cap, int Bytes>
void backward_rows_direct(const Head<T>& h, BackwardLayout layout, const int64_t* order, int64_t row_begin,
                          int64_t row_end, T w, const Segments* row_envs, const Part<T>* parts, int num_parts,
                          const BackwardMatrices<T>& scales, const T* gam, HeadTerm<T> head, T* head_partials,
                          T* d_logits, T* d_features, const KnownDots<T>* known) {
  const int C = h.C, D = h.D, W = layout.width(), expand_rows = W + (head.weight ? C : 0);
  const int dot_rows = known ? layout.dirs_begin() : W;  // the V and U blocks' dots are known
  const int64_t Dh = h.head_width();
  const T* mats[2 * Cap];
  const T* gam_rows[Cap];
  for (int p = 0; p < num_parts; ++p)
    for (int m = 0; m < parts[p].rows; ++m) mats[parts[p].first_coef + m] = parts[p].mats + m * Dh;
  for (int c = 0; head.weight && c < C; ++c) mats[W + c] = head.weight + c * Dh;
  for (int c = 0; gam && c < C; ++c) gam_rows[c] = gam + c * Dh;
  T dots[kPassRows][Cap], dots_sq[kPassRows][Cap], p[Cap], dp[Cap];
  T coef[kPassRows][2 * Cap], coef_sq[kPassRows][Cap];
  for (int64_t i0 = row_begin, rows; i0 < row_end; i0 += rows) {
    // Passes end at multiples of kPassRows (or the run's end): which rows share a pass, and so which
    // tile code computes a row, must not depend on the row blocks, which follow the thread count
    // (the compiler contracts multiply-adds differently in each tile width).
    rows = std::min<int64_t>(kPassRows - i0 % kPassRows, row_end - i0);
    const T* x[kPassRows];
    T* dx[kPassRows];
    int64_t row[kPassRows];  // the caller's rows
    for (int r = 0; r < rows; ++r) {
      row[r] = order ? order[i0 + r] : i0 + r;
      x[r] = h.features + row[r] * h.features_row_stride, dx[r] = d_features + row[r] * D;
    }
    auto dots_of = [&](auto num_rows) {
      rows_dots<T, false, decltype(num_rows)::value, Cap, Bytes>(x, mats, dot_rows, D, dots);
      if (gam) rows_dots<T, true, decltype(num_rows)::value, Cap, Bytes>(x, gam_rows, C, D, dots_sq);
    };
    auto expand = [&](auto num_rows) {
      expand_rows_direct<T, decltype(num_rows)::value, Cap, Bytes>(x, coef, mats, expand_rows, coef_sq, gam, C, D, Dh, dx);
    };
    with_rows(rows, dots_of);
    for (int r = 0; r < rows; ++r) {
      const int64_t i = row[r];
      if (h.bias) {  // zh_D = 1 (and its square); known dots include it
        for (int m = 0; m < dot_rows; ++m) dots[r][m] += mats[m][D];
        for (int c = 0; gam && c < C; ++c) dots_sq[r][c] += gam_rows[c][D];
      }
      if (known) copy_known_dots(*known, i, layout, dots[r], gam ? dots_sq[r] : nullptr);
      T* da = d_logits + i * C;
      scale_upstream(layout, scales, dots[r], gam ? dots_sq[r] : nullptr);
      const T row_w = row_envs ? inv_count<T>(*row_envs, int(row_envs->env_ids[i])) : w;
      backward_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i), row_w,
                      dots[r], dots_sq[r], p, dp, coef[r], coef_sq[r], da, 1);
      scale_upstream(layout, scales, coef[r], gam ? coef_sq[r] : nullptr);
      for (int c = 0; head.weight && c < C; ++c) coef[r][W + c] = da[c] += head.extra[i * C + c];
    }
    with_rows(rows, expand);
    for (int r = 0; known && known->pairs && r < rows; ++r) add_pair_terms<T>(h, *known, row[r], dx[r]);
    if (head_partials)  // the head's gradient d_logits_i zh_i^T; a pass lies in one kHeadGradRows group
      with_rows(rows, [&](auto num_rows) {
        head_rows_update<T, decltype(num_rows)::value, Cap, Bytes>(coef, W, x, C, D, h.bias, Dh,
                                                            head_partials + (i0 / kHeadGradRows) * C * Dh);
      });
  }
}

// d_features of sorted rows [row_begin, row_end) (at most kRowBlock): coef @ stacked parts
// + zh ⊙ (coef_sq @ gam), the feature columns only. acc and acc_sq are (kRowBlock, D) scratch.
// head_coef (the rows' total d_logits, caller's rows, C each) or nullptr: the coefficients of a
// head part among `parts` at first_coef W (HeadTerm).
template <typename T>
void expand_block(const Head<T>& h, const Segments& s, int64_t row_begin, int64_t row_end, const T* coef, int W,
                  const Part<T>* parts, int num_parts, const T* head_coef, const T* coef_sq, const T* env_gam,
                  T* d_features, std::vector<T>& coef_t, std::vector<T>& acc, std::vector<T>& acc_sq) {
  const int C = h.C, D = h.D, rows = int(row_end - row_begin), width = W + (head_coef ? C : 0);
  // Coefficients transposed to (width, kRowBlock), zero past the block's rows: a register tile of
  // kTileRows samples reads them as one contiguous run per matrix row.
  coef_t.assign(size_t(std::max(width, C)) * kRowBlock, T(0));
  acc.assign(size_t(kRowBlock) * D, T(0));
  for (int r = 0; r < rows; ++r) {
    for (int m = 0; m < W; ++m) coef_t[size_t(m) * kRowBlock + r] = coef[(row_begin + r) * W + m];
    for (int c = 0; head_coef && c < C; ++c)
      coef_t[size_t(W + c) * kRowBlock + r] = head_coef[s.order[row_begin + r] * C + c];
  }
  for (int p = 0; p < num_parts; ++p) expand_part<T>(h, parts[p], coef_t.data(), rows, acc.data());
  if (env_gam) {
    coef_t.assign(coef_t.size(), T(0));
    acc_sq.assign(size_t(kRowBlock) * D, T(0));
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < C; ++c) coef_t[size_t(c) * kRowBlock + r] = coef_sq[(row_begin + r) * C + c];
    expand_part<T>(h, Part<T>{env_gam, C, 0}, coef_t.data(), rows, acc_sq.data());
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t i = s.order[row_begin + r];
    const T* x = h.features + i * h.features_row_stride;
    const T* a = acc.data() + size_t(r) * D;
    T* dx = d_features + i * D;
    if (env_gam) {
      const T* a_sq = acc_sq.data() + size_t(r) * D;
      for (int d = 0; d < D; ++d) dx[d] = a[d] + x[d] * a_sq[d];
    } else {
      std::copy(a, a + D, dx);
    }
  }
}

// m . x over D: lanes of partial sums added in lane order, then the tail (dots_tile's order).
// One dot at a time: for the statistics' one or two directions a rows_dots tile costs more than it saves.
template <typename T>
T row_dot(const T* x, const T* m, int D) {
  using V = Simd<T>;
  typename V::type acc = {};
  int d = 0;
  for (; d + V::lanes <= D; d += V::lanes) acc += V::load(x + d) * V::load(m + d);
  return finish_dot<T, false>(acc, x, m, d, D);
}

// head_stats for few coefficient columns (W <= kDirectRows and W × Dh partial sums that fit in L1,
// e.g. C = 1 heads), in one pass: packing
// feature groups for register tiles would cost more than the few multiply-adds per element. Each
// task streams whole feature rows of one environment's block of kDirectBlockRows samples (sequential
// memory, which the prefetchers follow); per row it takes the direction dots, the row's closed form
// and the rank-1 update of W × Dh partial sums while the row is in L1. The blocks' partials are then
// added in block order. Fixed blocks and orders: the same bits for any thread count.
template <typename T>
void stats_direct(const Head<T>& h, const Segments& s, StatsLayout layout, const RowRuns<T>& dirs, T* out,
                  T* dots_out, Launch launch) {
  using V = Simd<T>;
  const int C = h.C, KC = layout.K * C, W = layout.width(), Dh = h.head_width(), D = h.D;
  const int simd_cols = D / V::lanes * V::lanes;
  const int square_begin = layout.diag_begin(), square_end = layout.hess_diag ? square_begin + C : square_begin;
  const bool any_square = square_begin < square_end;
  // When every environment's partial sums fit in L1 together, blocks walk the rows in the caller's
  // order and each row adds into its environment's partial: memory order whatever the ids' order
  // (shuffled ids read rows at random through `order` otherwise). Else blocks follow each environment.
  const bool natural = s.env_ids && size_t(s.num_envs) * W * Dh * sizeof(T) <= size_t(kDirectAccBytes);
  const std::vector<Task> blocks = natural ? natural_blocks(s, kDirectBlockRows) : env_blocks(s, kDirectBlockRows);
  const int block_envs = natural ? s.num_envs : 1;
  std::vector<T> partial(blocks.size() * size_t(block_envs) * W * Dh);
  const int threads = threads_for(launch, double(s.num_samples) * (W + KC) * Dh);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < int64_t(blocks.size()); ++t) {
    const Task& block = blocks[t];
    T* block_acc = partial.data() + size_t(t) * block_envs * W * Dh;
    std::fill(block_acc, block_acc + size_t(block_envs) * W * Dh, T(0));
    T dots[kDirectRows], p[kDirectRows], cf[kDirectRows];  // KC, C, W <= kDirectRows
    for (int64_t j = block.row_begin; j < block.row_end; ++j) {
      const int64_t i = natural ? j : s.order[j];
      const int e = natural ? int(s.env_ids[i]) : block.env;
      T* acc = block_acc + (natural ? size_t(e) * W * Dh : 0);
      const T w = inv_count<T>(s, e);
      const T* x = h.features + i * h.features_row_stride;
      for (int k = 0; k < KC; ++k) {
        const T* dir = dirs.row(e, k, Dh);
        dots[k] = row_dot<T>(x, dir, D) + (h.bias ? dir[D] : T(0));
      }
      if (dots_out) std::copy(dots, dots + KC, dots_out + i * KC);
      stats_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i), w, dots, p,
                   cf);
      for (int d = 0; d < simd_cols; d += V::lanes) {
        const typename V::type xv = V::load(x + d);
        const typename V::type xv2 = any_square ? xv * xv : xv;
        for (int m = 0; m < W; ++m) {
          T* a = acc + size_t(m) * Dh + d;
          V::store(a, V::load(a) + cf[m] * (m >= square_begin && m < square_end ? xv2 : xv));
        }
      }
      for (int d = simd_cols; d < Dh; ++d) {  // the last feature columns, then the bias column (zh = 1)
        const T xd = d < D ? x[d] : T(1);
        for (int m = 0; m < W; ++m) acc[size_t(m) * Dh + d] += cf[m] * (m >= square_begin && m < square_end ? xd * xd : xd);
      }
    }
  }
  // out[e] = its blocks' partials in block order, parallel over output elements. Per-environment blocks are
  // consecutive in `blocks`: environment e reads only its own (first_block[e], ...), not every block.
  const int64_t per_env = int64_t(W) * Dh;
  std::vector<size_t> first_block(s.num_envs + 1, blocks.size());
  if (!natural)
    for (size_t t = blocks.size(); t-- > 0;) first_block[blocks[t].env] = t;
  for (int e = s.num_envs - 1; !natural && e >= 0; --e) first_block[e] = std::min(first_block[e], first_block[e + 1]);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t k = 0; k < int64_t(s.num_envs) * per_env; ++k) {
    const int e = int(k / per_env);
    T total = T(0);
    if (natural)
      for (size_t t = 0; t < blocks.size(); ++t) total += partial[t * s.num_envs * per_env + k];
    else
      for (size_t t = first_block[e]; t < first_block[e + 1]; ++t) total += partial[t * per_env + k % per_env];
    out[k] = total;
  }
}

// out[e] = sum_{j in e} coef_j^T x_j over (E, W, Dh); x_j = zh_j ⊙ zh_j for coefficient columns in
// [square_begin, square_end), zh_j for the others. One task per (environment, coefficient block,
// column block) sums its whole environment in row order, kGroupRows rows at a time: the group's
// features are packed once and stay in L1 while every register tile of the task passes over them.
template <typename T>
void reduce(const Head<T>& h, const Segments& s, const T* coef, int W, int square_begin, int square_end, T* out,
            Launch launch) {
  const int Dh = h.head_width();
  struct Tile {
    int env, coef_begin, coef_end, col_begin, col_end;
  };
  std::vector<Tile> tiles;
  for (int e = 0; e < s.num_envs; ++e)
    for (int c = 0; c < W; c += kCoefBlock)
      for (int d = 0; d < Dh; d += kColBlock)
        tiles.push_back({e, c, std::min(c + kCoefBlock, W), d, std::min(d + kColBlock, Dh)});
#pragma omp parallel for schedule(static) num_threads(threads_for(launch, double(s.num_samples) * W * Dh))
  for (int64_t t = 0; t < int64_t(tiles.size()); ++t) {
    const Tile& tile = tiles[t];
    const int d0 = tile.col_begin, cols = tile.col_end - tile.col_begin;
    const int feature_cols = std::max(0, std::min(cols, h.D - d0));  // then the bias column, then zero padding
    const bool any_square = tile.coef_begin < square_end && square_begin < tile.coef_end;
    std::vector<T> acc(size_t(kCoefBlock) * kColBlock, T(0));
    std::vector<T> x(size_t(kGroupRows) * kColBlock), x2(any_square ? x.size() : 0);
    T coef_group[kGroupRows * kTileRows];
    for (int64_t g0 = s.offsets[tile.env]; g0 < s.offsets[tile.env + 1]; g0 += kGroupRows) {
      const int group = int(std::min<int64_t>(kGroupRows, s.offsets[tile.env + 1] - g0));
      for (int k = 0; k < group; ++k) {
        const T* row = h.features + s.order[g0 + k] * h.features_row_stride + d0;
        T* xk = x.data() + size_t(k) * kColBlock;
        for (int d = 0; d < feature_cols; ++d) xk[d] = row[d];
        for (int d = feature_cols; d < kColBlock; ++d) xk[d] = d < cols ? T(1) : T(0);
        if (any_square)
          for (int d = 0; d < kColBlock; ++d) x2[size_t(k) * kColBlock + d] = xk[d] * xk[d];
      }
      // Tiles of kTileRows coefficient columns that never straddle the squared range.
      for (int c0 = tile.coef_begin; c0 < tile.coef_end;) {
        const bool square = c0 >= square_begin && c0 < square_end;
        const int limit = square ? square_end : (c0 < square_begin ? std::min(square_begin, tile.coef_end) : tile.coef_end);
        const int rows = std::min(kTileRows, std::min(limit, tile.coef_end) - c0);
        for (int k = 0; k < group; ++k)
          for (int r = 0; r < kTileRows; ++r) coef_group[k * kTileRows + r] = r < rows ? coef[(g0 + k) * W + c0 + r] : T(0);
        const T* src = square ? x2.data() : x.data();
        for (int v0 = 0; v0 < cols; v0 += kTileCols) {
          T part[kTileRows][kTileCols];
          T* base = acc.data() + size_t(c0 - tile.coef_begin) * kColBlock + v0;
          for (int r = 0; r < kTileRows; ++r)
            for (int v = 0; v < kTileCols; ++v) part[r][v] = r < rows ? base[size_t(r) * kColBlock + v] : T(0);
          switch (rows) {  // heads with C = 1 have single-row tiles: skip the padding rows' work
            case 1: rank_k_tile<T, 1>(group, coef_group, kTileRows, src + v0, kColBlock, part); break;
            case 2: rank_k_tile<T, 2>(group, coef_group, kTileRows, src + v0, kColBlock, part); break;
            case 3: rank_k_tile<T, 3>(group, coef_group, kTileRows, src + v0, kColBlock, part); break;
            default: rank_k_tile<T>(group, coef_group, kTileRows, src + v0, kColBlock, part);
          }
          for (int r = 0; r < rows; ++r)
            for (int v = 0; v < kTileCols; ++v) base[size_t(r) * kColBlock + v] = part[r][v];
        }
        c0 += rows;
      }
    }
    for (int c = tile.coef_begin; c < tile.coef_end; ++c)
      std::copy(acc.data() + size_t(c - tile.coef_begin) * kColBlock,
                acc.data() + size_t(c - tile.coef_begin) * kColBlock + cols, out + (int64_t(tile.env) * W + c) * Dh + d0);
  }
}

// A register tile of reduce_few: acc[r][v] += coef_j[r] * x_j (x_j ⊙ x_j when Square) over rows
// [j0, j1) of one environment, for Rows coefficient columns and one strip of 2 SIMD vectors. The first
// group of rows starts from zero instead of acc (no memset of acc per task);
// the last stores to the output rows (out, row stride out_stride) instead of acc.
template <typename T, int Rows, bool Square>
void few_tile(const Head<T>& h, const Segments& s, const T* coef, int W, int64_t j0, int64_t j1, int d0,
              bool first, bool last, T (*acc)[2 * Simd<T, kWideBytes>::lanes], T* out, int64_t out_stride) {
  using V = Simd<T, kWideBytes>;
  typename V::type tile[Rows][2] = {};
  for (int r = 0; !first && r < Rows; ++r)
    for (int v = 0; v < 2; ++v) tile[r][v] = V::load(acc[r] + v * V::lanes);
  for (int64_t j = j0; j < j1; ++j) {
    const T* x = h.features + s.order[j] * h.features_row_stride + d0;
    typename V::type xv[2] = {V::load(x), V::load(x + V::lanes)};
    if (Square) xv[0] = xv[0] * xv[0], xv[1] = xv[1] * xv[1];
    const T* cf = coef + j * W;
    for (int r = 0; r < Rows; ++r)
      for (int v = 0; v < 2; ++v) tile[r][v] += cf[r] * xv[v];
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < 2; ++v) V::store((last ? out + r * out_stride : acc[r]) + v * V::lanes, tile[r][v]);
}

// `reduce` for few coefficient columns (W <= kDirectRows, e.g. W = 2C = 14) whose partial sums
// outgrow L1: tasks are (environment, strip of 2 SIMD vectors of columns); per kGroupRows rows, tiles of
// up to kFewRows coefficient columns (never straddling the squared range) read the rows' strips from L1,
// where the first tile brought them; no packing. Each output element sums its environment's rows in
// row order, as `reduce` does. The columns past the last full strip (and the bias column) are summed
// one element at a time in the same order.
template <typename T>
void reduce_few(const Head<T>& h, const Segments& s, const T* coef, int W, int square_begin, int square_end, T* out,
                Launch launch) {
  const int strip = 2 * Simd<T, kWideBytes>::lanes, Dh = h.head_width(), D = h.D;
  const int strips = D / strip, tail_begin = strips * strip;
  const int64_t num_tasks = int64_t(s.num_envs) * (strips + 1);
#pragma omp parallel for schedule(static) num_threads(threads_for(launch, double(s.num_samples) * W * Dh))
  for (int64_t t = 0; t < num_tasks; ++t) {
    const int e = int(t / (strips + 1)), k = int(t % (strips + 1));
    const int64_t r0 = s.offsets[e], r1 = s.offsets[e + 1];
    T* env_out = out + int64_t(e) * W * Dh;
    auto square = [&](int m) { return m >= square_begin && m < square_end; };
    if (k == strips) {  // the last columns, then the bias column (zh = 1)
      for (int m = 0; m < W; ++m)
        for (int d = tail_begin; d < Dh; ++d) {
          T total = T(0);
          for (int64_t j = r0; j < r1; ++j) {
            const T x = d < D ? h.features[s.order[j] * h.features_row_stride + d] : T(1);
            total += coef[j * W + m] * (square(m) ? x * x : x);
          }
          env_out[int64_t(m) * Dh + d] = total;
        }
      continue;
    }
    const int d0 = k * strip;
    T acc[kDirectRows][2 * Simd<T, kWideBytes>::lanes];
    for (int m = 0; r0 == r1 && m < W; ++m)  // an empty environment
      std::fill(env_out + int64_t(m) * Dh + d0, env_out + int64_t(m) * Dh + d0 + strip, T(0));
    for (int64_t g0 = r0; g0 < r1; g0 += kGroupRows) {
      const int64_t g1 = std::min<int64_t>(g0 + kGroupRows, r1);
      for (int m0 = 0; m0 < W;) {
        const bool sq = square(m0);
        int rows = 1;
        while (rows < kFewRows && m0 + rows < W && square(m0 + rows) == sq) ++rows;
        T (*a)[2 * Simd<T, kWideBytes>::lanes] = acc + m0;
        T* o = env_out + int64_t(m0) * Dh + d0;
        const bool first = g0 == r0, last = g1 == r1;
        switch (rows * 2 + int(sq)) {
#define HGK_FEW_TILE(R)                                                                        \
  case 2 * R: few_tile<T, R, false>(h, s, coef + m0, W, g0, g1, d0, first, last, a, o, Dh); break; \
  case 2 * R + 1: few_tile<T, R, true>(h, s, coef + m0, W, g0, g1, d0, first, last, a, o, Dh); break;
          HGK_FEW_TILE(1) HGK_FEW_TILE(2) HGK_FEW_TILE(3) HGK_FEW_TILE(4) HGK_FEW_TILE(5) HGK_FEW_TILE(6)
          HGK_FEW_TILE(7) HGK_FEW_TILE(8)
#undef HGK_FEW_TILE
        }
        m0 += rows;
      }
    }
  }
}

}  // namespace

template <typename T>
void head_stats_keeping_dots(const Head<T>& h, const Segments& s, StatsLayout layout, const RowRuns<T>& dirs, T* work,
                             T* out, T* dots_out, Launch launch) {
  const int C = h.C, KC = layout.K * C, W = layout.width();
  if (W <= kDirectRows && size_t(W) * h.head_width() * sizeof(T) <= kDirectAccBytes)
    return stats_direct<T>(h, s, layout, dirs, out, dots_out, launch);
  const int64_t N = s.num_samples;
  T* dirs_dots = work;
  T* p_scratch = dirs_dots + N * KC;
  T* coef = p_scratch + N * C;
  // Per piece of sorted rows: s_k = V_k zh (tiles of rows × direction rows), then each row's coefficients
  // (and its dots to the caller's row).
  const int threads = threads_for(launch, double(N) * (KC * double(h.head_width()) + (W + KC) * 8));
  const int64_t pieces = row_pieces(N, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t piece = 0; piece < pieces; ++piece)
    env_runs(s, N * piece / pieces, N * (piece + 1) / pieces, [&](int e, int64_t row_begin, int64_t row_end) {
      for (int c0 = 0; c0 < KC; c0 += kMatBlock)
        dirs.each([&](const EnvRows<T>& run, int first) {  // direction rows [c0, c0 + kMatBlock) in this run
          const int begin = std::max(c0, first), end = std::min({c0 + kMatBlock, KC, first + run.rows});
          if (begin < end)
            wide_dots_block<T, false>(h, s, row_begin, row_end, run.at(e), begin - first, end - first,
                                      dirs_dots + first, KC);
        });
      for (int64_t j = row_begin; j < row_end; ++j) {
        const int64_t i = s.order[j];
        stats_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i),
                     inv_count<T>(s, e), dirs_dots + j * KC, p_scratch + j * C, coef + j * W);
        if (dots_out) std::copy(dirs_dots + j * KC, dirs_dots + (j + 1) * KC, dots_out + i * KC);
      }
    });
  reduce_coefficients<T>(h, s, layout, coef, out, launch);
}

template <typename T>
void matrix_dots(const Head<T>& h, const Segments& s, const T* mats, int rows, T* out, Launch launch) {
  const int64_t N = s.num_samples;
  const int threads = threads_for(launch, double(N) * rows * h.head_width());
  const int64_t pieces = row_pieces(N, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t piece = 0; piece < pieces; ++piece)
    wide_dots_block<T, false>(h, s, N * piece / pieces, N * (piece + 1) / pieces, mats, 0, rows, out, rows);
}

template <typename T>
void reduce_coefficients(const Head<T>& h, const Segments& s, StatsLayout layout, const T* coef, T* out,
                         Launch launch) {
  const int W = layout.width(), diag_begin = layout.diag_begin();
  const int diag_end = layout.hess_diag ? diag_begin + layout.C : diag_begin;
  if (W <= kDirectRows)
    reduce_few<T>(h, s, coef, W, diag_begin, diag_end, out, launch);
  else
    reduce<T>(h, s, coef, W, diag_begin, diag_end, out, launch);
}

namespace cpu {

template <typename T>
void head_stats(const Head<T>& h, const Segments& s, StatsLayout layout, const T* dirs, T* work, T* out,
                Launch launch) {
  head_stats_keeping_dots<T>(h, s, layout, RowRuns<T>::stacked(dirs, layout.K * h.C, h.head_width()), work, out,
                             nullptr, launch);
}

}  // namespace cpu

// One pass over the features: each task takes a block of one environment's rows through
// dots, the per-sample math and the expansion back to d_features while they are in cache.
template <typename T>
bool per_sample_backward_from_dots(const Head<T>& h, const Segments& s, BackwardLayout layout,
                                   const BackwardMatrices<T>& mats, HeadTerm<T> head, T* work, T* d_logits,
                                   T* d_features, Launch launch, const KnownDots<T>* known) {
  const int C = h.C, W = layout.width(), Dh = h.head_width();
  const int64_t N = s.num_samples;
  const BackwardWork<T> buf(work, N, layout);
  T *dots = buf.dots, *dots_sq = buf.dots_sq, *scratch = buf.scratch, *coef = buf.coef, *coef_sq = buf.coef_sq;
  // Environment e's stacked matrices [Lam][V_k][U_k] as parts (at most kMaxParts - 1); returns how many.
  // The blocked path appends the head's weight rows after them (first_coef W), its coefficients the rows'
  // d_logits.
  auto env_parts = [&](int e, Part<T>* parts) {
    int num_parts = 0;
    if (layout.gradient) parts[num_parts++] = {mats.lam.at(e), C, 0};
    mats.dirs.each([&](const EnvRows<T>& run, int first) {
      parts[num_parts++] = {run.at(e), run.rows, layout.dirs_begin() + first};
    });
    mats.ups.each([&](const EnvRows<T>& run, int first) {
      parts[num_parts++] = {run.at(e), run.rows, layout.ups_begin() + first};
    });
    return num_parts;
  };
  const T* gam = mats.gam.data;
  auto env_gam_of = [&](int e) { return gam ? mats.gam.at(e) : nullptr; };
  const int threads = threads_for(launch, 2.0 * N * (W + C) * Dh);
  if (W + (gam ? C : 0) <= kDirectBackwardRows && C <= kDirectBackwardRows) {
    // Few matrix rows: one sample at a time, in the caller's row order (memory order whatever the
    // ids' order); each row takes its environment's matrices. Rows are independent: no sums, except
    // the fused head's weight gradient, summed per fixed kHeadGradRows rows (tasks then hold whole
    // such groups) and then over the groups in order. Segments without ids (a plan's run of environments)
    // are read in their sorted order, and leave the head's gradient to the caller.
    const bool natural = s.env_ids != nullptr, head_grad = natural && head.weight && head.weight_grad;
    // Matrices that every environment shares (the plans over pairs): passes need not end where an environment
    // does, which would leave them a row or two long (the matrices are read once per pass).
    bool shared = !layout.gradient || mats.lam.env_stride == 0;
    shared = shared && (!gam || mats.gam.env_stride == 0);
    for (const RowRuns<T>* runs : {&mats.dirs, &mats.ups})
      runs->each([&](const EnvRows<T>& run, int) { shared = shared && run.env_stride == 0; });
    const bool across_envs = natural && shared;
    // Blocks hold whole passes (whole kHeadGradRows groups with a head gradient): see backward_rows_direct.
    const int64_t align = head_grad ? kHeadGradRows : kPassRows;
    const int64_t row_block = (row_block_for(N, threads) + align - 1) / align * align;
    const std::vector<Task> rows = natural ? natural_blocks(s, row_block) : env_blocks(s, row_block);
    std::vector<T> head_partials(head_grad ? size_t((N + kHeadGradRows - 1) / kHeadGradRows) * C * Dh : 0, T(0));
    T* partials = head_grad ? head_partials.data() : nullptr;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < int64_t(rows.size()); ++t) {
      Part<T> parts[kMaxParts];
      for (int64_t i = rows[t].row_begin, run_end; i < rows[t].row_end; i = run_end) {
        const int e = natural ? int(s.env_ids[i]) : rows[t].env;  // a run of consecutive rows of environment e
        for (run_end = i + 1; run_end < rows[t].row_end && (!natural || across_envs || s.env_ids[run_end] == e);
             ++run_end) {
        }
        const int num_parts = env_parts(e, parts);
        // stack arrays sized for the rows at hand: oversized ones slow the few-row case
        const T* env_gam = env_gam_of(e);
        auto rows_direct = [&](auto cap, auto bytes) {
          backward_rows_direct<T, decltype(cap)::value, decltype(bytes)::value>(
              h, layout, natural ? nullptr : s.order, i, run_end, inv_count<T>(s, e), across_envs ? &s : nullptr, parts,
              num_parts, mats, env_gam, head, partials, d_logits, d_features, known);
        };
        using Few = std::integral_constant<int, kDirectRows>;
        using Many = std::integral_constant<int, kDirectBackwardRows>;
        using Wide = std::integral_constant<int, kWideBytes>;
        using Narrow = std::integral_constant<int, 32>;
        const bool few = W + (gam ? C : 0) <= kDirectRows && C <= kDirectRows, wide = C >= kWideMinClasses;
        if (few)
          wide ? rows_direct(Few{}, Wide{}) : rows_direct(Few{}, Narrow{});
        else
          wide ? rows_direct(Many{}, Wide{}) : rows_direct(Many{}, Narrow{});
      }
    }
    if (!head_grad) return false;
    const int64_t groups = (N + kHeadGradRows - 1) / kHeadGradRows, per_group = int64_t(C) * Dh;
#pragma omp parallel for schedule(static) num_threads(threads_for(launch, double(groups) * per_group))
    for (int64_t k = 0; k < per_group; ++k) {
      T total = T(0);
      for (int64_t g = 0; g < groups; ++g) total += partials[g * per_group + k];
      head.weight_grad[k] = total;
    }
    return true;
  }
  const std::vector<Task> blocks = env_blocks(s, row_block_for(N, threads));
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> coef_t, acc, acc_sq;  // per-thread scratch of expand_block
#pragma omp for schedule(static)
    for (int64_t t = 0; t < int64_t(blocks.size()); ++t) {
      const Task& block = blocks[t];
      const int e = block.env;
      Part<T> parts[kMaxParts];
      const int num_parts = env_parts(e, parts);
      const T* env_gam = env_gam_of(e);
      const T w = inv_count<T>(s, e);
      for (int p = 0; p < num_parts; ++p)
        if (!known || parts[p].first_coef < layout.dirs_begin())
          wide_dots_block<T, false>(h, s, block.row_begin, block.row_end, parts[p].mats, 0, parts[p].rows,
                                    dots + parts[p].first_coef, W);
      if (gam) wide_dots_block<T, true>(h, s, block.row_begin, block.row_end, env_gam, 0, C, dots_sq, C);
      for (int64_t j = block.row_begin; known && j < block.row_end; ++j)
        copy_known_dots(*known, s.order[j], layout, dots + j * W, gam ? dots_sq + j * C : nullptr);
      for (int64_t j = block.row_begin; j < block.row_end; ++j) {
        const int64_t i = s.order[j];
        scale_upstream(layout, mats, dots + j * W, gam ? dots_sq + j * C : nullptr);
        backward_row<T>(h.loss, layout, h.logits + i * h.logits_row_stride, h.logits_col_stride, h.target(i), w,
                        dots + j * W, gam ? dots_sq + j * C : nullptr, scratch + j * 2 * C, scratch + j * 2 * C + C,
                        coef + j * W, gam ? coef_sq + j * C : nullptr, d_logits + i * C, 1);
        scale_upstream(layout, mats, coef + j * W, gam ? coef_sq + j * C : nullptr);
        for (int c = 0; head.weight && c < C; ++c) d_logits[i * C + c] += head.extra[i * C + c];
      }
      int expand_parts = num_parts;
      if (head.weight) parts[expand_parts++] = {head.weight, C, W};
      expand_block<T>(h, s, block.row_begin, block.row_end, coef, W, parts, expand_parts,
                      head.weight ? d_logits : nullptr, coef_sq, env_gam, d_features, coef_t, acc, acc_sq);
      for (int64_t j = block.row_begin; known && known->pairs && j < block.row_end; ++j)
        add_pair_terms<T>(h, *known, s.order[j], d_features + s.order[j] * h.D);
    }
  }
  return false;
}

namespace cpu {

template <typename T>
bool per_sample_backward(const Head<T>& h, const Segments& s, BackwardLayout layout, const T* grad_up, const T* dirs,
                         const T* ups, const T* gam, HeadTerm<T> head, T* work, T* d_logits, T* d_features,
                         Launch launch) {
  const int C = h.C, KC = layout.K * C;
  const int64_t Dh = h.head_width();
  const BackwardMatrices<T> mats = BackwardMatrices<T>::none()
                                       .with_lam(EnvRows<T>::stacked(grad_up, C, Dh), T(1))
                                       .with_directions(RowRuns<T>::stacked(dirs, KC, Dh),
                                                        RowRuns<T>::stacked(ups, KC, Dh), T(1))
                                       .with_gam(EnvRows<T>::stacked(gam, C, Dh), T(1));
  return per_sample_backward_from_dots<T>(h, s, layout, mats, head, work, d_logits, d_features, launch, nullptr);
}

HGK_INSTANTIATE_PRIMITIVES(float)
HGK_INSTANTIATE_PRIMITIVES(double)

}  // namespace cpu

#define HGK_INSTANTIATE_KEPT_DOTS(T)                                                                            \
  template void reduce_coefficients<T>(const Head<T>&, const Segments&, StatsLayout, const T*, T*, Launch);       \
  template void matrix_dots<T>(const Head<T>&, const Segments&, const T*, int, T*, Launch);                       \
  template void head_stats_keeping_dots<T>(const Head<T>&, const Segments&, StatsLayout, const RowRuns<T>&, T*,  \
                                           T*, T*, Launch);                                                     \
  template bool per_sample_backward_from_dots<T>(const Head<T>&, const Segments&, BackwardLayout,                \
                                                 const BackwardMatrices<T>&, HeadTerm<T>, T*, T*, T*, Launch,     \
                                                 const KnownDots<T>*);
HGK_INSTANTIATE_KEPT_DOTS(float)
HGK_INSTANTIATE_KEPT_DOTS(double)
#undef HGK_INSTANTIATE_KEPT_DOTS

}  // namespace hgk
