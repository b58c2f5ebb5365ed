// GEMV weight streaming, shared by every ISA's 4-bit and block-format kernels: the tiles of a
// call's first rows (m0 == 0; and every one-row tile, where the test is a constant: as a run-time
// test it cost a hot 576 x 576 int4 call 10%; in AVX-512's multi-row int4 tiles, m0 == 0 cost a
// symmetric W4A8 GEMM 20-25%, so that file builds its row tiles with and without the prefetches),
// which read the weights from memory (the later row tiles of the same panels find them in cache;
// with many rows and int8 activations, AVX-512 unpacks each block-format panel once, except
// Q8_0's, and reads the unpacked bytes instead). A tile reads
// J panels at once, each part of a weight (nibbles, bit planes, scales, minima) one stream per
// panel: at small K a panel's stream is a few KB, too short for the hardware prefetcher to reach
// full speed before it ends, and the next tile's streams start cold. So a tile prefetches, from
// every part, what it will read kAheadSteps steps of 8 inputs later; past its panels' end, the same
// places in the next J panels (the next tile's). For 2-8 rows (weights from DRAM, Zen 4, 2 threads)
// that made 576-row layers 20-55% faster.
//
// Every function here is always_inline: GCC 12 judges a function whose only effect is
// __builtin_prefetch to have none, and deletes its calls. Until they were forced inline, no
// prefetch of this file reached the kernels (tests/native/run.sh now checks that they do). With
// them, SmolLM2 decode on Zen 4 (2 threads) went from 187 to 253 tok/s (Q4_K_M) and from 211
// to 284 (Q4_1), one process, alternated with prefetching off.
#pragma once
#include <cstdint>
#include "formats.h"
#include "kernels.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

// 32 steps (11 KB ahead for four Q5_0 panels): 16 and 64 were within the noise of it on the
// decode calls, and 16 was 5-10% slower on one thread.
constexpr int64_t kAheadSteps = 32;
#define LOWBIT_STREAM_INLINE __attribute__((always_inline)) inline

// Panel p and position k (steps, or groups: `count` of them per panel) that tile [p, p + J)
// reaches `ahead` positions after position `at`; false past the last of `panels`.
LOWBIT_STREAM_INLINE bool ahead_of(int64_t& p, int64_t& k, int64_t at, int64_t ahead, int J,
                                   int64_t count, int64_t panels) {
  k = at + ahead;
  while (k >= count) {
    k -= count;
    p += J;
  }
  return p < panels;
}

// Into L2 on x86: a prefetch into L1 holds one of its few miss buffers until the line arrives, and
// from memory that capped the stream (Zen 4, weights read cold: INT8 GEMV 26-32 -> 32-43 GB/s,
// 1 x 11008 x 4096 1.4x faster on 2 threads, 1.8x on 1; a read probe 25-29 -> 32-53 GB/s without
// any). Only a weight held in L3 between calls reads faster with L1 prefetches (10-25%), a case a
// decode step never meets.
#if defined(__x86_64__) || defined(__i386__)
constexpr int kPrefetchLocality = 2;  // PREFETCHT1
#else
constexpr int kPrefetchLocality = 3;  // (not measured on aarch64)
#endif
LOWBIT_STREAM_INLINE void prefetch_line(const void* p) { __builtin_prefetch(p, 0, kPrefetchLocality); }
// The address `offset` bytes past base, in integers: the last tile's ahead panels may lie past an
// array's end, where a prefetch is harmless but pointer arithmetic is undefined.
LOWBIT_STREAM_INLINE void prefetch_at(const void* base, int64_t offset) {
  prefetch_line((const void*)((uintptr_t)base + (uintptr_t)offset));
}

// Step k's lines of part `base` (panel_bytes apart per panel, Bytes bytes per Inputs inputs) in
// panels p .. p + J - 1: every line of the step for parts of a line or more per step, else only
// at a step where a new line starts. One test per part and step, and a few integer operations
// per address: these run inside the kernels' inner loops, where weights in L2 leave no room.
// (Lines are counted from the array's start: a part of 48 bytes a step, Q3_K's bit planes, in an
// array 32 or 48 bytes past a line start misses a third of its lines: the kernel then waits for
// them, nothing else changes.)
template <int64_t Bytes, int64_t Inputs, int J>
LOWBIT_STREAM_INLINE void ahead_part(const void* base, int64_t panel_bytes, int64_t p, int64_t k) {
  static_assert(Bytes * 8 >= Inputs && (Bytes * 8) % Inputs == 0, "a whole number of bytes per step");
  constexpr int64_t num = Bytes * 8 / Inputs;  // bytes per step
  const int64_t off = k * num;
  if (num < 64 && (off & 63) >= num) return;
  const int64_t at = p * panel_bytes + off;
  for (int j = 0; j < J; ++j)
    for (int64_t l = 0; l < num; l += 64) prefetch_at(base, at + j * panel_bytes + l);
}

// A block-format tile's prefetches at step k8 (formats.h's layout: every part the format has).
template <int F, int J>
LOWBIT_STREAM_INLINE void stream_ahead(const BlkArgs* g, int64_t p, int64_t k8) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  int64_t k;
  if (!ahead_of(p, k, k8, kAheadSteps, J, g->K / 8, g->Np / kPanel)) return;
  constexpr int64_t dsize = fmt.scale == ScaleKind::E8M0 ? 1 : 2;
  const int64_t K = g->K;
  if constexpr (fmt.bits == 8) ahead_part<128, 8, J>(g->q8, K * 16, p, k);
  if constexpr (fmt.nib) ahead_part<64, 8, J>(g->nib, K * 8, p, k);
  if constexpr (fmt.planes > 0) ahead_part<16 * fmt.planes, 8, J>(g->bits, K / 4 * fmt.planes * 8, p, k);
  // The parts per sub-block or block, 32 bytes or less a sub-block, start their lines only where
  // sub-blocks start: k is one where k8 is (kAheadSteps and K / 8 are whole sub-blocks). A cheap
  // test, folded away where the caller unrolls its steps.
  static_assert(kAheadSteps % (fmt.sub / 8) == 0, "the distance: whole sub-blocks");
  if (k8 % (fmt.sub / 8) != 0) return;
  ahead_part<16 * dsize, fmt.block, J>(g->d, K / fmt.block * 16 * dsize, p, k);
  if constexpr (fmt.min != MinKind::None) ahead_part<32, fmt.block, J>(g->dm, K / fmt.block * 32, p, k);
  if constexpr (fmt.scale == ScaleKind::Code) ahead_part<16, fmt.sub, J>(g->sc, K / fmt.sub * 16, p, k);
  if constexpr (fmt.min == MinKind::Code && !fmt.pair4) ahead_part<16, fmt.sub, J>(g->mc, K / fmt.sub * 16, p, k);
}

// A 4-bit tile's (kernels.h's Q4Args layout) at step k8: its nibbles. The parts per group come
// from group_ahead, once a group.
template <int J>
LOWBIT_STREAM_INLINE void stream_ahead(const Q4Args* g, int64_t p, int64_t k8) {
  int64_t k;
  if (!ahead_of(p, k, k8, kAheadSteps, J, g->Kp / 8, g->Np / kPanel)) return;
  ahead_part<64, 8, J>(g->b, g->Kp * 8, p, k);
}

// At the start of group grp (of G a panel), the scales, minima or zero points of the group as far
// ahead as the nibbles' prefetch, where a line of them starts (every group is visited, so every
// line is asked for; a line two panels share, by both).
template <int J>
LOWBIT_STREAM_INLINE void group_ahead(const Q4Args* g, int64_t p, int64_t grp, int64_t G) {
  int64_t q;
  if (!ahead_of(p, q, grp, (kAheadSteps * 8 + g->group - 1) / g->group, J, G, g->Np / kPanel)) return;
  const char* parts[] = {(const char*)g->scales, (const char*)g->mins, (const char*)g->zeros};
  constexpr int64_t bytes[] = {32, 32, 16};  // per group and panel
  for (int i = 0; i < 3; ++i) {
    if (!parts[i] || ((q * bytes[i]) & 63) >= bytes[i]) continue;
    const int64_t at = (p * G + q) * bytes[i];
    for (int j = 0; j < J; ++j) prefetch_at(parts[i], at + j * G * bytes[i]);
  }
}

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
