// Every tuning threshold of the CPU kernels and plans, with what it trades off. They change speed
// only, except where a line says the value sets a summation grouping (changing it changes the last
// bits of results, though never their dependence on the thread count).
#pragma once

#include <cstddef>
#include <cstdint>

namespace hgk {

// Threads. A parallel region pays a fork and a join, and on a loaded machine may wait a scheduler slice
// for a descheduled thread: regions with less work than kMinParallelWork multiply-adds run on one thread.
constexpr double kMinParallelWork = double(1 << 20);
// The plans' memory-bound passes over (E, M) blocks gain from two threads at far less work than that.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;
// Row tasks per thread for per-row work: more balance the threads, fewer amortise each task's setup.
constexpr int kTasksPerThread = 4;

// Row blocking.
constexpr int kRowBlock = 32;          // sorted samples per task: task overhead vs. the rows' cache footprint
constexpr int kPassRows = 4;           // samples per pass of the one-row backward: matrix reloads vs. registers
constexpr int kHeadGradRows = 16;      // rows per partial of the fused head's gradient (summation grouping)
constexpr int kDirectBlockRows = 2048;  // samples per one-pass statistics task: partial sums to add vs. balance
                                        // (summation grouping)

// Register tiles (SIMD accumulators held in registers; larger tiles spill).
constexpr int kDotRows = 2;    // samples per dot tile: reuse of each matrix load vs. registers
constexpr int kDotMats = 4;    // matrix rows per dot tile: reuse of each sample load vs. registers
constexpr int kTileRows = 4;   // GEMM tile rows (samples or coefficient columns) by kTileCols head columns
constexpr int kExpandVecs = 4;  // SIMD vectors of columns per one-row expansion tile: the same trade
constexpr int kFewRows = 8;    // coefficient columns per reduce_few tile: the same trade

// Cache blocking of the GEMM-shaped sums.
constexpr int kMatBlock = 32;    // matrix rows per dots task: sample reuse vs. the rows kept in cache
constexpr int kColBlock = 512;   // head columns per reduce task: task count vs. the packed group's L1 size
constexpr int kCoefBlock = 64;   // coefficient columns per reduce task: the same, for the accumulators
constexpr int kGroupRows = 32;   // samples packed at a time by a reduce task: packing cost vs. L1 size
constexpr int kPanelRows = 64;   // matrix rows per expand panel: reuse vs. pages swept (TLB reach)
constexpr int64_t kPassChunk = 1024;  // columns per chunk of the plans' passes: L1 residency across the
                                      // environments vs. per-chunk overhead (summation grouping)

// Small-problem paths, which skip packing and tiles where those cost more than the multiply-adds.
constexpr int kDirectRows = 16;           // expansions / reductions with at most this many rows
constexpr int kDirectBackwardRows = 32;   // per-sample backwards with at most this many matrix rows
constexpr int kDirectAccBytes = 16 << 10;  // one-pass statistics only while W x Dh partial sums fit in L1

// Vector width. 64-byte vectors (AVX-512 builds) halve the instructions but lose on short dots'
// horizontal sums, unaligned partial-sum rows and the GEMM tiles' fewer accumulators: only the
// one-row backward and the statistics' dots from kWideMinClasses classes, and reduce_few, use them.
#if defined(__AVX512F__)
constexpr int kWideBytes = 64;
#else
constexpr int kWideBytes = 32;
#endif
constexpr int kWideMinClasses = 4;
// GEMM tile columns (rank_k_tile, in the build's widest vectors): multiply-adds per load vs. registers.
constexpr int kTileCols = kWideBytes / 2;

// Many environments. A plan whose per-environment statistics (E x C x Dh entries) exceed kPlanStateElements keeps
// none of them: it takes pairs of samples within small environments (cpu_plans.cpp), else walks the environments
// in runs of about kEnvRunElements entries, its backward forming each run's statistics again: memory and cache
// residency vs. the repeated statistics (summation grouping).
constexpr int64_t kPlanStateElements = int64_t(1) << 18;
constexpr int64_t kEnvRunElements = int64_t(1) << 18;
// Fishr beyond kPlanStateElements, where no environment has more than kFishrStripRows samples, forms each
// environment's statistics in registers, kFishrClassBlock classes by one SIMD strip of columns at a time (register
// accumulators vs. reloads of each row's strip); a forward task takes kFishrTaskStrips strips (balance vs. each row's
// part kept in L1 across the environment's classes; summation grouping). Larger environments take the runs.
constexpr int kFishrStripRows = 32;
constexpr int kFishrClassBlock = 8;
constexpr int kFishrTaskStrips = 32;
constexpr int kFishrTileStrips = 32;  // the backward's upstream per class block and tile of strips: kept in L1

// Scratch memory a thread keeps between plan calls: memory held vs. allocations (and page faults).
constexpr size_t kScratchKeptBytes = size_t(16) << 20;

}  // namespace hgk
