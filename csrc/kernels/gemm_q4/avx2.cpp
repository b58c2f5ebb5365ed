// INT4 matmuls, AVX2 (and AVX-VNNI with -mavxvnni): as gemm_q4/avx512.cpp with 8-lane vectors, a
// panel's 64-byte block read as two halves (columns 0-7, 8-15). Without VNNI the W4A8 dot is
// VPMADDUBSW (nibble x s8: pair sums <= 2*15*127, no saturation) then VPMADDWD by ones.
#include <immintrin.h>
#include <cstring>
#include "kernels/isa.h"
#include "kernels/stream.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256i lanes_below(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? (left < 0 ? 0 : left) : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256i dot4(__m256i acc, __m256i w_u8, __m256i a_s8) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(acc, w_u8, a_s8);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, a_s8), _mm256_set1_epi16(1)));
#endif
}

// f += fma(d, I, m * A), or with `direct` f = fma(d, I, f), for 8 columns starting at `col` (see kernels.h).
inline __m256 fold(const Q4Args* g, int64_t grp, int64_t col, __m256 I, float A, __m256 f, bool direct) {
  const int64_t at = (col / kPanel * (g->Kp / g->group) + grp) * kPanel + col % kPanel;
  const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g->scales + at)));
  if (direct) return _mm256_fmadd_ps(d, I, grp == 0 ? _mm256_setzero_ps() : f);  // symmetric W4A8 (kernels.h)
  const __m256 m =
      g->mins    ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g->mins + at)))
      : g->zeros ? _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(),
                       _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(g->zeros + at))))))
                 : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
  const __m256 term = _mm256_fmadd_ps(d, I, _mm256_mul_ps(m, _mm256_set1_ps(A)));
  return grp == 0 ? term : _mm256_add_ps(f, term);
}

inline void store(const Q4Args* g, int64_t m, int64_t col, __m256 f) {
  const __m256i mask = lanes_below(g->N - col);
  const __m256 y = g->bias ? _mm256_add_ps(f, _mm256_maskload_ps(g->bias + col, mask)) : f;
  _mm256_maskstore_ps(g->c + m * g->ldc + col, mask, y);
}

// MR rows x one panel (two 8-column halves h).
template <int MR>
void tile_a8(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group, nblocks = g->Kp / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 f[MR * 2], I[MR * 2];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (MR == 1 || m0 == 0) group_ahead<1>(g, p, grp, G);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
      __m256i acc[MR * 2];  // symmetric weights: from -8 sum(q_a), so that the dot is of q_w - 8
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        acc[m * 2] = acc[m * 2 + 1] =
            g->asum ? _mm256_set1_epi32(-8 * g->asum[(m0 + m) * nblocks + k0 / kActBlock]) : _mm256_setzero_si256();
      for (int s = 0; s < kActBlock / kQ4Step; ++s) {
        if (MR == 1 || m0 == 0) stream_ahead<1>(g, p, k0 / kQ4Step + s);
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(b + (k0 / kQ4Step + s) * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m) {
            acc[m * 2 + h] = dot4(acc[m * 2 + h], lo, bcast4(a + m * g->lda + k0 + 8 * s));
            acc[m * 2 + h] = dot4(acc[m * 2 + h], hi, bcast4(a + m * g->lda + k0 + 8 * s + 4));
          }
        }
      }
      const bool first = k0 == grp * g->group;
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m256 sb = _mm256_set1_ps(g->ablock[(m0 + m) * nblocks + k0 / kActBlock]);
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          const __m256 t = _mm256_cvtepi32_ps(acc[m * 2 + h]);
          I[m * 2 + h] = first ? _mm256_mul_ps(t, sb) : _mm256_fmadd_ps(t, sb, I[m * 2 + h]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h)
        f[m * 2 + h] = fold(g, grp, p * kPanel + 8 * h, I[m * 2 + h], g->agroup[(m0 + m) * G + grp], f[m * 2 + h], g->asum != nullptr);
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) store(g, m0 + m, p * kPanel + 8 * h, f[m * 2 + h]);
}

template <int MR>
void tile_f32(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group;
  const float* x = (const float*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  const __m256i nib = _mm256_set1_epi8(0x0F), byte = _mm256_set1_epi32(0xFF);
  __m256 f[MR * 2], S[MR * 2];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (MR == 1 || m0 == 0) group_ahead<1>(g, p, grp, G);
    LOWBIT_UNROLL
    for (int i = 0; i < MR * 2; ++i) S[i] = _mm256_setzero_ps();
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kQ4Step) {
      if (MR == 1 || m0 == 0) stream_ahead<1>(g, p, k0 / kQ4Step);
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(b + k0 / kQ4Step * 64 + 32 * h));
        const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        LOWBIT_UNROLL
        for (int i = 0; i < kQ4Step; ++i) {  // k0 + i, in order: each lane is one column's sum
          const __m256i src = i < 4 ? lo : hi;
          const __m256i q = (i % 4) == 3 ? _mm256_srli_epi32(src, 24)
                                         : _mm256_and_si256(_mm256_srli_epi32(src, 8 * (i % 4)), byte);
          const __m256 w = _mm256_cvtepi32_ps(q);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m)
            S[m * 2 + h] = _mm256_fmadd_ps(w, _mm256_set1_ps(x[m * g->lda + k0 + i]), S[m * 2 + h]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h)
        f[m * 2 + h] = fold(g, grp, p * kPanel + 8 * h, S[m * 2 + h], g->agroup[(m0 + m) * G + grp], f[m * 2 + h], false);
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) store(g, m0 + m, p * kPanel + 8 * h, f[m * 2 + h]);
}

template <bool A8>
void run(const Q4Args* g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < 2 ? g->M - m : 2);
      if (mr == 2)
        A8 ? tile_a8<2>(g, m, p) : tile_f32<2>(g, m, p);
      else
        A8 ? tile_a8<1>(g, m, p) : tile_f32<1>(g, m, p);
      m += mr;
    }
}

}  // namespace

void gemm_q4a8(const Q4Args* g, int64_t p0, int64_t p1) { run<true>(g, p0, p1); }
void gemm_q4f32(const Q4Args* g, int64_t p0, int64_t p1) { run<false>(g, p0, p1); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
