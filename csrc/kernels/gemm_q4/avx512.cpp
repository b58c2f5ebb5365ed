// INT4 matmuls, AVX-512: tiles of MR rows x J panels of 16 columns.
// One 64-byte load holds 16 columns x 8 k: AND 0x0F gives k0..k0+3, shift 4 gives k0+4..k0+7.
// W4A8: VPDPBUSD(u8 nibbles, s8 activations broadcast 4 at a time) per 32-k block, folded with the
// block's activation scale. W4A32: nibbles to floats by VPERMPS from a 0..15 table, one FMA per k
// in k order.
#include <immintrin.h>
#include <cstring>
#include <utility>
#include "kernels/isa.h"
#include "kernels/dot512.h"
#include "kernels/stream.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

inline __mmask16 tail_mask(const Q4Args* g, int64_t panel) {
  const int64_t left = g->N - panel * kPanel;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// f += fma(d, I, m * A), or with `direct` f = fma(d, I, f), for the group's 16 columns of panel `panel` (see kernels.h).
inline __m512 fold(const Q4Args* g, int64_t grp, int64_t panel, __m512 I, float A, __m512 f, bool direct) {
  const int64_t at = (panel * (g->Kp / g->group) + grp) * kPanel;
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->scales + at)));
  if (direct) return _mm512_fmadd_ps(d, I, grp == 0 ? _mm512_setzero_ps() : f);  // symmetric W4A8 (kernels.h)
  const __m512 m =
      g->mins    ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->mins + at)))
      : g->zeros ? _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_setzero_si512(),
                       _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g->zeros + at))))))
                 : _mm512_mul_ps(d, _mm512_set1_ps(-8.f));
  const __m512 term = _mm512_fmadd_ps(d, I, _mm512_mul_ps(m, _mm512_set1_ps(A)));
  return grp == 0 ? term : _mm512_add_ps(f, term);
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

}  // namespace

void gemm_q4a8(const Q4Args* g, int64_t p0, int64_t p1) {
  g->asum ? run<kA8Sym>(g, p0, p1) : run<kA8>(g, p0, p1);
}
void gemm_q4f32(const Q4Args* g, int64_t p0, int64_t p1) { run<kF32>(g, p0, p1); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
