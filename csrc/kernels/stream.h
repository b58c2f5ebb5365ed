// GEMV weight streaming, shared by the one-row tiles of every ISA's 4-bit and block-format
// kernels. A one-row tile reads J panels at once, each part of a weight (nibbles, bit planes,
// scales, minima) one stream per panel: at small K a panel's stream is a few KB, too short for
// the hardware prefetcher to reach full speed before it ends, and the next tile's streams start
// cold. So a tile prefetches, from every part, what it will read kAheadSteps steps of 8 inputs
// later; past its panels' end, the same places in the next J panels (the next tile's).
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

// Panel p and step k (of `steps` per panel) that tile [p, p + J) reads kAheadSteps steps after
// step k8; false past the last of `panels`.
LOWBIT_STREAM_INLINE bool ahead_of(int64_t& p, int64_t& k, int64_t k8, int J, int64_t steps, int64_t panels) {
  k = k8 + kAheadSteps;
  while (k >= steps) {
    k -= steps;
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

// Step k's line of a panel's part of Bytes bytes per Inputs inputs, starting at base: every line
// of a step for parts of a line or more per step, else only where a new line starts.
template <int64_t Bytes, int64_t Inputs>
LOWBIT_STREAM_INLINE void ahead_line(const void* base, int64_t k) {
  static_assert(Bytes * 8 >= Inputs ? (Bytes * 8) % Inputs == 0 : Inputs % (Bytes * 8) == 0,
                "a whole number of bytes per step, or of steps per byte");
  constexpr int64_t num = Bytes * 8 >= Inputs ? Bytes * 8 / Inputs : 1;
  constexpr int64_t den = Bytes * 8 >= Inputs ? 1 : Inputs / (Bytes * 8);
  const char* at = (const char*)base + k * num / den;
  if constexpr (num >= 64) {
    for (int64_t l = 0; l < num; l += 64) prefetch_line(at + l);
  } else if (k == 0 || ((k * num / den) ^ ((k - 1) * num / den)) >> 6) {
    prefetch_line(at);
  }
}

// The same for `bytes` bytes every 2^log2_inputs inputs (a group size known at run time).
LOWBIT_STREAM_INLINE void ahead_line(const void* base, int64_t k, int64_t bytes, int log2_inputs) {
  const int shift = log2_inputs - 3;  // steps per group: 2^shift
  const int64_t off = (k >> shift) * bytes;
  if (k == 0 || (off ^ (((k - 1) >> shift) * bytes)) >> 6) prefetch_line((const char*)base + off);
}

// A block-format tile's prefetches at step k8 (formats.h's layout: every part the format has).
template <int F, int J>
LOWBIT_STREAM_INLINE void stream_ahead(const BlkArgs* g, int64_t p, int64_t k8) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  int64_t k;
  if (!ahead_of(p, k, k8, J, g->K / 8, g->Np / kPanel)) return;
  constexpr int64_t dsize = fmt.scale == ScaleKind::E8M0 ? 1 : 2;
  for (int j = 0; j < J; ++j) {
    const int64_t q = p + j;
    if constexpr (fmt.bits == 8) ahead_line<128, 8>(g->q8 + q * g->K * 16, k);
    if constexpr (fmt.nib) ahead_line<64, 8>(g->nib + q * g->K * 8, k);
    if constexpr (fmt.planes > 0) ahead_line<16 * fmt.planes, 8>(g->bits + q * (g->K / 4) * fmt.planes, k);
    ahead_line<16 * dsize, fmt.block>((const uint8_t*)g->d + q * (g->K / fmt.block) * 16 * dsize, k);
    if constexpr (fmt.min != MinKind::None) ahead_line<32, fmt.block>(g->dm + q * (g->K / fmt.block) * 16, k);
    if constexpr (fmt.scale == ScaleKind::Code) ahead_line<16, fmt.sub>(g->sc + q * (g->K / fmt.sub) * 16, k);
    if constexpr (fmt.min == MinKind::Code && !fmt.pair4) ahead_line<16, fmt.sub>(g->mc + q * (g->K / fmt.sub) * 16, k);
  }
}

// A 4-bit tile's (kernels.h's Q4Args layout): nibbles, and the scales, minima or zero points of
// its groups (those of a group size that is not a power of two only at a panel's start).
template <int J>
LOWBIT_STREAM_INLINE void stream_ahead(const Q4Args* g, int64_t p, int64_t k8) {
  int64_t k;
  if (!ahead_of(p, k, k8, J, g->Kp / 8, g->Np / kPanel)) return;
  const int64_t G = g->Kp / g->group;
  const bool pow2 = (g->group & (g->group - 1)) == 0;
  const int log2_group = __builtin_ctzll((unsigned long long)g->group);
  for (int j = 0; j < J; ++j) {
    const int64_t q = p + j;
    ahead_line<64, 8>(g->b + q * g->Kp * 8, k);
    const void* group_parts[] = {g->scales ? (const void*)(g->scales + q * G * 16) : nullptr,
                                 g->mins ? (const void*)(g->mins + q * G * 16) : nullptr,
                                 g->zeros ? (const void*)(g->zeros + q * G * 16) : nullptr};
    const int64_t group_bytes[] = {32, 32, 16};
    for (int i = 0; i < 3; ++i) {
      if (!group_parts[i]) continue;
      if (pow2) ahead_line(group_parts[i], k, group_bytes[i], log2_group);
      else if (k == 0) prefetch_line(group_parts[i]);
    }
  }
}

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
