// INT4 matmuls, AVX-512: tiles of MR rows x J panels of 16 columns.
// One 64-byte load holds 16 columns x 8 k: AND 0x0F gives k0..k0+3, shift 4 gives k0+4..k0+7.
// W4A8: VPDPBUSD(u8 nibbles, s8 activations broadcast 4 at a time) per 32-k block, folded with the
// block's activation scale; compiled for the amx set, calls of kQ4AmxMinRows rows or more run the
// dots on AMX tiles instead (amx_a8, same fold). W4A32: nibbles to floats by VPERMPS from a 0..15
// table, one FMA per k in k order.
#include <immintrin.h>
#include <cstring>
#include <utility>
#include "kernels/isa.h"
#include "kernels/dot512.h"
#include "kernels/stream.h"
#include "kernels/amx.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

inline __mmask16 tail_mask(const Q4Args* g, int64_t panel) {
  const int64_t left = g->N - panel * kPanel;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// The group's scales d and minima m (kernels.h) of panel `panel`'s 16 columns.
struct GroupScales {
  __m512 d, m;
};
inline GroupScales group_scales(const Q4Args* g, int64_t grp, int64_t panel, bool direct) {
  const int64_t at = (panel * (g->Kp / g->group) + grp) * kPanel;
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->scales + at)));
  if (direct) return {d, d};  // symmetric W4A8: m unused
  const __m512 m =
      g->mins    ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->mins + at)))
      : g->zeros ? _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(),
                       _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g->zeros + at))))))
                 : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
  return {d, m};
}

// f += fma(d, I, m * A) (the term alone for the first group), or with `direct` f = fma(d, I, f).
inline __m512 fold(const GroupScales& s, bool first, __m512 I, float A, __m512 f, bool direct) {
  if (direct) return _mm512_fmadd_ps(s.d, I, first ? _mm512_setzero_ps() : f);  // symmetric W4A8 (kernels.h)
  const __m512 term = _mm512_fmadd_ps(s.d, I, _mm512_mul_ps(s.m, _mm512_set1_ps(A)));
  return first ? term : _mm512_add_ps(f, term);
}
inline __m512 fold(const Q4Args* g, int64_t grp, int64_t panel, __m512 I, float A, __m512 f, bool direct) {
  return fold(group_scales(g, grp, panel, direct), grp == 0, I, A, f, direct);
}

inline void store(const Q4Args* g, int64_t m, int64_t panel, __m512 f) {
  const __mmask16 mask = tail_mask(g, panel);
  const __m512 y = g->bias ? _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, g->bias + panel * kPanel)) : f;
  _mm512_mask_storeu_ps(g->c + m * g->ldc + panel * kPanel, mask, y);
}

template <int MR, int J, bool SYM, bool STREAM>  // SYM: symmetric weights, g->asum given (kernels.h)
void tile_a8(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group, nblocks = g->Kp / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  if (MR > 1) prefetch_for_write(g->c + m0 * g->ldc + p * kPanel, g->ldc, MR, J);
  __m512 f[MR * J], I[MR * J];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (STREAM) group_ahead<J>(g, p, grp, G);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
      __m512i acc[MR * J];  // symmetric weights: from -8 sum(q_a), so that the dot is of q_w - 8
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m512i start =
            SYM ? _mm512_set1_epi32(-8 * g->asum[(m0 + m) * nblocks + k0 / kActBlock]) : _mm512_setzero_si512();
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) acc[m * J + j] = start;
      }
      LOWBIT_UNROLL
      for (int s = 0; s < kActBlock / kQ4Step; ++s) {
        __m512i lo[J], hi[J];
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const __m512i v = _mm512_loadu_si512(b + j * ps + (k0 / kQ4Step + s) * 64);
          lo[j] = _mm512_and_si512(v, nib);
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        if (STREAM) stream_ahead<J>(g, p, k0 / kQ4Step + s);
        dot8<MR, J>(acc, lo, hi, a, g->lda, k0 + 8 * s);
      }
      const bool first = k0 == grp * g->group;
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m512 sb = _mm512_set1_ps(g->ablock[(m0 + m) * nblocks + k0 / kActBlock]);
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const __m512 t = _mm512_cvtepi32_ps(acc[m * J + j]);
          I[m * J + j] = first ? _mm512_mul_ps(t, sb) : _mm512_fmadd_ps(t, sb, I[m * J + j]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j)
        f[m * J + j] = fold(g, grp, p + j, I[m * J + j], g->agroup[(m0 + m) * G + grp], f[m * J + j], SYM);
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) store(g, m0 + m, p + j, f[m * J + j]);
}

template <int MR, int J, bool STREAM>
void tile_f32(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group;
  const float* x = (const float*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  // VPERMPS reads only the low 4 bits of each index: a shifted block indexes this table directly
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 f[MR * J], S[MR * J];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (STREAM) group_ahead<J>(g, p, grp, G);
    LOWBIT_UNROLL
    for (int i = 0; i < MR * J; ++i) S[i] = _mm512_setzero_ps();
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kQ4Step) {
      __m512i v[J];
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) v[j] = _mm512_loadu_si512(b + j * ps + k0 / kQ4Step * 64);
      if (STREAM) stream_ahead<J>(g, p, k0 / kQ4Step);
      LOWBIT_UNROLL
      for (int i = 0; i < kQ4Step; ++i) {  // k0 + i, in order: each lane is one column's sum
        // k0+i sits in byte i%4 of each column's lane, low nibble for i < 4, high nibble after
        const int shift = 8 * (i % 4) + 4 * (i / 4);
        __m512 w[J];
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j)
          w[j] = _mm512_permutexvar_ps(shift ? _mm512_srli_epi32(v[j], shift) : v[j], values);
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const __m512 xv = _mm512_set1_ps(x[m * g->lda + k0 + i]);
          LOWBIT_UNROLL
          for (int j = 0; j < J; ++j) S[m * J + j] = _mm512_fmadd_ps(w[j], xv, S[m * J + j]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j)
        f[m * J + j] = fold(g, grp, p + j, S[m * J + j], g->agroup[(m0 + m) * G + grp], f[m * J + j], false);
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) store(g, m0 + m, p + j, f[m * J + j]);
}

using TileFn = void (*)(const Q4Args*, int64_t, int64_t);

enum Mode { kF32, kA8, kA8Sym };
template <int MODE, int MR, int J, bool STREAM = MR == 1>
void tile(const Q4Args* g, int64_t m0, int64_t p) {
  if constexpr (MODE == kF32) tile_f32<MR, J, STREAM>(g, m0, p);
  else tile_a8<MR, J, MODE == kA8Sym, STREAM>(g, m0, p);
}

// Tiles: a single row streams several panels at once (GEMV: independent chains; W4A32 needs 8 to
// cover the FMA latency); several rows share each unpacked weight vector, 4 rows x 2 panels.
// STREAM: the tile prefetches ahead (stream.h), one-row tiles and a call's first rows (`first`).
// It is a template argument, not a run-time test: as a test in the 4-row tile, a 128 x 4096 x 4096
// symmetric W4A8 GEMM ran 20-25% slower (Zen 4, 2 threads).
template <int MODE>
TileFn pick(int mr, int j, bool first) {
  static const TileFn one_row[] = {tile<MODE, 1, 1>,  tile<MODE, 1, 2>,  tile<MODE, 1, 3>,
                                   tile<MODE, 1, 4>,  tile<kF32, 1, 5>, tile<kF32, 1, 6>,
                                   tile<kF32, 1, 7>, tile<kF32, 1, 8>};
  static const TileFn rows[2][3][2] = {{{tile<MODE, 2, 1>, tile<MODE, 2, 2>},
                                        {tile<MODE, 3, 1>, tile<MODE, 3, 2>},
                                        {tile<MODE, 4, 1>, tile<MODE, 4, 2>}},
                                       {{tile<MODE, 2, 1, true>, tile<MODE, 2, 2, true>},
                                        {tile<MODE, 3, 1, true>, tile<MODE, 3, 2, true>},
                                        {tile<MODE, 4, 1, true>, tile<MODE, 4, 2, true>}}};
  return mr == 1 ? one_row[j - 1] : rows[first][mr - 2][j - 1];
}

template <int MODE>
void run(const Q4Args* g, int64_t p0, int64_t p1) {
  const int max_j = g->M == 1 ? (MODE != kF32 ? 4 : 8) : 2;
  for (int64_t p = p0; p < p1;) {
    const int j = (int)(p1 - p < max_j ? p1 - p : max_j);
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < 4 ? g->M - m : 4);
      pick<MODE>(mr, j, m == 0)(g, m, p);
      m += mr;
    }
    p += j;
  }
}

#ifdef __AMX_INT8__
// W4A8 on AMX tiles, for kQ4AmxMinRows rows or more. Each 32-k activation block is one tile step:
// tiles of 16 rows x 32 k-bytes of activations (4-5) times the block's weights unpacked to bytes,
// 8 k-quads x 16 columns x 4 (6-7: a 64-byte nibble block's low nibbles are one k-quad, its high
// nibbles the next), into 2 x 2 tiles of exact int32 dots (0-3): TDPBSUD on q in 0..15, or TDPBSSD
// on q - 8 for symmetric weights (that is the block's symmetric dot itself). Then the float fold of
// tile_a8 above, in the same order, so the results are the same bits. Weights are unpacked one
// block ahead: a tile load of bytes just stored waits for the stores to complete.
// Reads whole 32-row blocks of activations (kernels.h). On a Sapphire Rapids class Xeon, 16 rows
// ran 0.75-0.95x the VPDPBUSD kernel's speed and 128 rows 1.5-1.6x (bench/RESULTS.md).
constexpr int64_t kQ4AmxRows = 64;  // rows per pass: their float sums (2 x 8 KB) stay in L1

// The 32-k block `blk` of panel p's nibbles as the bytes of an 8 x 64 B tile (q - 8 when SYM).
template <bool SYM>
inline void unpack_block(const Q4Args* g, int64_t p, int64_t blk, int8_t* out) {
  const uint8_t* src = g->b + p * g->Kp * kQ4Step + blk * (kActBlock / kQ4Step) * 64;
  const __m512i nib = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int s = 0; s < kActBlock / kQ4Step; ++s) {
    const __m512i v = _mm512_loadu_si512(src + 64 * s);
    __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
    if (SYM) {
      lo = _mm512_sub_epi8(lo, eight);
      hi = _mm512_sub_epi8(hi, eight);
    }
    _mm512_store_si512(out + 128 * s, lo);
    _mm512_store_si512(out + 128 * s + 64, hi);
  }
}

// The fold of block `blk` (group `grp`) for `rows` rows from m0: dots [rows][32] int32, the
// partial group sums I and the sums F [rows][32] float; NP panels. One variant per kind of block,
// so that the loop over rows has no test in it (it bounds the kernel: 3 vector operations per 16
// outputs of the block against a quarter of a TDPBSSD).
template <bool SYM, int NP, bool FIRST, bool LAST, bool GRP0>
void fold_rows(const Q4Args* g, int64_t m0, int64_t rows, int64_t blk, int64_t grp,
               const GroupScales* gs, const int32_t* dots, float* I, float* F) {
  const int64_t nblocks = g->Kp / kActBlock, G = g->Kp / g->group;
  const float* sb_at = g->ablock + m0 * nblocks + blk;
  const float* a_at = g->agroup + m0 * G + grp;
  GroupScales s[NP];
  for (int j = 0; j < NP; ++j) s[j] = gs[j];
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 sb = _mm512_set1_ps(sb_at[r * nblocks]);
    const float A = SYM || !LAST ? 0.f : a_at[r * G];
    LOWBIT_UNROLL
    for (int j = 0; j < NP; ++j) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(dots + r * 32 + 16 * j));
      float* Ir = I + r * 32 + 16 * j;
      float* Fr = F + r * 32 + 16 * j;
      const __m512 iv = FIRST ? _mm512_mul_ps(v, sb) : _mm512_fmadd_ps(v, sb, _mm512_load_ps(Ir));
      if (!LAST)
        _mm512_store_ps(Ir, iv);
      else
        _mm512_store_ps(Fr, fold(s[j], GRP0, iv, A, GRP0 ? _mm512_setzero_ps() : _mm512_load_ps(Fr), SYM));
    }
  }
}

template <bool SYM, int NP>
using FoldRows = void (*)(const Q4Args*, int64_t, int64_t, int64_t, int64_t, const GroupScales*,
                          const int32_t*, float*, float*);
template <bool SYM, int NP>
FoldRows<SYM, NP> fold_rows_for(bool first, bool last, bool grp0) {
  static const FoldRows<SYM, NP> fns[8] = {
      fold_rows<SYM, NP, false, false, false>, fold_rows<SYM, NP, false, false, true>,
      fold_rows<SYM, NP, false, true, false>,  fold_rows<SYM, NP, false, true, true>,
      fold_rows<SYM, NP, true, false, false>,  fold_rows<SYM, NP, true, false, true>,
      fold_rows<SYM, NP, true, true, false>,   fold_rows<SYM, NP, true, true, true>};
  return fns[first * 4 + last * 2 + grp0];
}

template <bool SYM>
void amx_a8(const Q4Args* g, int64_t p0, int64_t p1) {
  const int64_t nblocks = g->Kp / kActBlock, per_group = g->group / kActBlock;
  alignas(64) int8_t wt[2][2][8 * 64];  // [block parity][panel]: the weights as bytes
  alignas(64) int32_t dots[32 * 32];    // the 2 x 2 tiles: 32 rows of 32 columns
  alignas(64) float F[kQ4AmxRows * 32], I[kQ4AmxRows * 32];
  tile_configure({16, 16, 16, 16, 16, 16, 8, 8}, {64, 64, 64, 64, 32, 32, 64, 64});
  for (int64_t m0 = 0; m0 < g->M; m0 += kQ4AmxRows) {
    const int64_t rows = g->M - m0 < kQ4AmxRows ? g->M - m0 : kQ4AmxRows;
    const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
    for (int64_t p = p0; p < p1; p += 2) {
      const int np = p + 1 < p1 ? 2 : 1;
      for (int j = 0; j < np; ++j) unpack_block<SYM>(g, p + j, 0, wt[0][j]);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t grp = blk / per_group;
        const bool first = blk % per_group == 0, last = blk % per_group == per_group - 1;
        _tile_loadd(6, wt[blk & 1][0], 64);
        if (np == 2) _tile_loadd(7, wt[blk & 1][1], 64);
        if (blk + 1 < nblocks) {
          for (int j = 0; j < np; ++j) unpack_block<SYM>(g, p + j, blk + 1, wt[(blk + 1) & 1][j]);
          if ((blk + 1) % 2 == 0)  // the next block starts a new line of every row
            for (int64_t r = 0; r < rows; ++r)
              _mm_prefetch((const char*)(a + r * g->lda + (blk + 1) * kActBlock), _MM_HINT_T0);
        }
        GroupScales gs[2] = {};
        if (last)
          for (int j = 0; j < np; ++j) gs[j] = group_scales(g, grp, p + j, SYM);
        const auto fold2 = fold_rows_for<SYM, 2>(first, last, grp == 0);
        const auto fold1 = fold_rows_for<SYM, 1>(first, last, grp == 0);
        for (int64_t r0 = 0; r0 < rows; r0 += 32) {
          const int8_t* ab = a + r0 * g->lda + blk * kActBlock;
          _tile_loadd(4, ab, g->lda);
          _tile_loadd(5, ab + 16 * g->lda, g->lda);
          // (GCC's tile intrinsics paste their tile numbers into the instruction: literals only)
          _tile_zero(0);
          _tile_zero(2);
          if (SYM) {
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(2, 5, 6);
          } else {
            _tile_dpbsud(0, 4, 6);
            _tile_dpbsud(2, 5, 6);
          }
          _tile_stored(0, dots, 128);
          _tile_stored(2, dots + 16 * 32, 128);
          if (np == 2) {
            _tile_zero(1);
            _tile_zero(3);
            if (SYM) {
              _tile_dpbssd(1, 4, 7);
              _tile_dpbssd(3, 5, 7);
            } else {
              _tile_dpbsud(1, 4, 7);
              _tile_dpbsud(3, 5, 7);
            }
            _tile_stored(1, dots + 16, 128);
            _tile_stored(3, dots + 16 * 32 + 16, 128);
          }
          const int64_t n = rows - r0 < 32 ? rows - r0 : 32;
          (np == 2 ? fold2 : fold1)(g, m0 + r0, n, blk, grp, gs, dots, I + r0 * 32, F + r0 * 32);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < np; ++j) store(g, m0 + r, p + j, _mm512_load_ps(F + r * 32 + 16 * j));
    }
  }
  _tile_release();
}
#endif

}  // namespace

void gemm_q4a8(const Q4Args* g, int64_t p0, int64_t p1) {
#ifdef __AMX_INT8__
  if (g->M >= kQ4AmxMinRows) return g->asum ? amx_a8<true>(g, p0, p1) : amx_a8<false>(g, p0, p1);
#endif
  g->asum ? run<kA8Sym>(g, p0, p1) : run<kA8>(g, p0, p1);
}
void gemm_q4f32(const Q4Args* g, int64_t p0, int64_t p1) { run<kF32>(g, p0, p1); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
