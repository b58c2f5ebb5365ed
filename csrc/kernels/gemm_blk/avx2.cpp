// Block-format matmuls (formats.h), AVX2 (and AVX-VNNI with -mavxvnni): as gemm_blk/avx512.cpp
// with each panel's 16 columns as two 8-column halves. A bit plane's 32-bit half-mask becomes
// bytes by VPSHUFB + compare. Without VNNI the dot is VPMADDUBSW then VPMADDWD: exact while
// values stay <= 127 (pair sums <= 2*127*128); grid and 8-bit values (up to 255) are split as
// (u & 127) + 128 * (u >> 7), each product exact. code_dot formats (Q2_K, Q3_K) multiply each
// sub-block's exact dot by its codes in int32 (VPMULLD) and fold per 32 inputs, as the reference.
#include <immintrin.h>
#include <cstring>
#include "formats.h"
#include "kernels/isa.h"
#include "kernels/stream.h"
#include "kernels/vec.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Values up to 127 take one VPMADDUBSW; Wide ones (up to 255) kernels/vec.h's exact dot4 (the
// split in two products, or VPDPBUSD with -mavxvnni).
template <bool Wide>
inline __m256i dot4(__m256i acc, __m256i u, __m256i a) {
#ifndef __AVXVNNI__
  if (!Wide)
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)));
#endif
  return (__m256i)dot4((vi)acc, (vi)u, (vi)a);
}

// 32 bytes of 0xFF / 0x00 from the 32 bits of a mask: byte i is bit i.
inline __m256i expand_mask(uint32_t m) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)m), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                  2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

// The u8 values of columns 8h .. 8h+7 of panel p at k8*8 .. k8*8+7: lo (k 0-3) and hi (k 4-7).
template <int F>
inline void values(const BlkArgs* g, int64_t p, int64_t k8, int h, __m256i& lo, __m256i& hi) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  if (fmt.bits == 8) {
    const uint8_t* at = g->q8 + p * g->K * 16 + k8 * 128 + 32 * h;
    lo = _mm256_loadu_si256((const __m256i*)at);
    hi = _mm256_loadu_si256((const __m256i*)(at + 64));
    return;
  }
  if (fmt.nib) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(g->nib + p * g->K * 8 + k8 * 64 + 32 * h));
    const __m256i nib = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, nib);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  } else {
    lo = hi = _mm256_setzero_si256();
  }
  if (fmt.lut != Lut::None) {
    const __m256i lut = _mm256_broadcastsi128_si256(
        _mm_loadu_si128((const __m128i*)(fmt.lut == Lut::IQ4 ? kLutIQ4 : kLutMXFP4)));
    lo = _mm256_shuffle_epi8(lut, lo);
    hi = _mm256_shuffle_epi8(lut, hi);
  }
  const uint64_t* w = g->bits + (p * (g->K / 4) + 2 * k8) * fmt.planes;
  LOWBIT_UNROLL
  for (int j = 0; j < fmt.planes; ++j) {
    const __m256i bit = _mm256_set1_epi8((char)(1 << ((fmt.nib ? 4 : 0) + j)));
    lo = _mm256_add_epi8(lo, _mm256_and_si256(expand_mask((uint32_t)(w[j] >> (32 * h))), bit));
    hi = _mm256_add_epi8(hi, _mm256_and_si256(expand_mask((uint32_t)(w[fmt.planes + j] >> (32 * h))), bit));
  }
}

// D and B of sub-block s for columns 8h .. 8h+7 of panel p (blk_scale, 8 lanes at once).
template <int F>
inline void scales(const BlkArgs* g, int64_t p, int64_t s, int h, __m256& D, __m256& B) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  const int64_t at_blk = (p * (g->K / fmt.block) + s * fmt.sub / fmt.block) * kPanel + 8 * h;
  const int64_t at_sub = (p * (g->K / fmt.sub) + s) * kPanel + 8 * h;
  if (fmt.scale == ScaleKind::E8M0) {
    const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)((const uint8_t*)g->d + at_blk)));
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    D = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
  } else {
    D = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)g->d + at_blk)));
  }
  __m128i codes = _mm_setzero_si128();
  if (fmt.scale == ScaleKind::Code) codes = _mm_loadl_epi64((const __m128i*)(g->sc + at_sub));
  if (fmt.scale == ScaleKind::Code) {
    const __m256i c = fmt.pair4 ? _mm256_and_si256(_mm256_cvtepu8_epi32(codes), _mm256_set1_epi32(0x0F))
                                : _mm256_cvtepi8_epi32(codes);
    D = _mm256_mul_ps(D, _mm256_cvtepi32_ps(c));
  }
  B = _mm256_setzero_ps();
  if (fmt.min == MinKind::Half) B = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g->dm + at_blk)));
  if (fmt.min == MinKind::Code) {
    const __m256i c = fmt.pair4 ? _mm256_srli_epi32(_mm256_cvtepu8_epi32(codes), 4)
                                : _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(g->mc + at_sub)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g->dm + at_blk)));
    B = _mm256_xor_ps(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(c)), _mm256_set1_ps(-0.f));
  }
}

inline __m256i lanes_below(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? (left < 0 ? 0 : left) : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline void store(const BlkArgs* g, int64_t m, int64_t col, __m256 f) {
  const __m256i mask = lanes_below(g->N - col);
  const __m256 y = g->bias ? _mm256_add_ps(f, _mm256_maskload_ps(g->bias + col, mask)) : f;
  _mm256_maskstore_ps(g->c + m * g->ldc + col, mask, y);
}

// MR rows x one panel (two 8-column halves).
template <int F, int MR>
void tile_a8(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub, H = kActBlock / S;  // sub-blocks per activation block
  static_assert(H == 1 || fmt.min == MinKind::None, "minima fold per 32-input sub-block");
  constexpr bool wide = fmt.lut != Lut::None || fmt.bits == 8;
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  __m256 f[MR * 2];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * 2; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n32; ++b) {
    __m256 t[MR * 2];  // H > 1: the block's sum of D_s * i_s
    LOWBIT_UNROLL
    for (int hs = 0; hs < H; ++hs) {
      const int64_t s = b * H + hs, k0 = s * S;
      __m256i acc[MR * 2];
      LOWBIT_UNROLL
      for (int i = 0; i < MR * 2; ++i) acc[i] = _mm256_setzero_si256();
      for (int st = 0; st < S / 8; ++st) {
        if (MR == 1 || m0 == 0) stream_ahead<F, 1>(g, p, k0 / 8 + st);
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          __m256i lo, hi;
          values<F>(g, p, k0 / 8 + st, h, lo, hi);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m) {
            acc[m * 2 + h] = dot4<wide>(acc[m * 2 + h], lo, bcast4(a + m * g->lda + k0 + 8 * st));
            acc[m * 2 + h] = dot4<wide>(acc[m * 2 + h], hi, bcast4(a + m * g->lda + k0 + 8 * st + 4));
          }
        }
      }
      __m256 D[2], B[2];
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) scales<F>(g, p, s, h, D[h], B[h]);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const float sb = g->ablock[(m0 + m) * n32 + b];
        const int32_t* as = g->asum + (m0 + m) * n16 + k0 / 16;
        const int32_t asum = S == 16 ? as[0] : as[0] + as[1];
        const __m256 sbv = _mm256_set1_ps(sb), av = _mm256_set1_ps(sb * (float)asum);
        const __m256i off = _mm256_set1_epi32(fmt.offset * asum);
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          const __m256i i = fmt.offset ? _mm256_sub_epi32(acc[m * 2 + h], off) : acc[m * 2 + h];
          const __m256 fi = _mm256_cvtepi32_ps(i);
          __m256& fo = f[m * 2 + h];
          if (H == 1) {
            if (fmt.min != MinKind::None) fo = _mm256_fmadd_ps(B[h], av, fo);
            fo = _mm256_fmadd_ps(D[h], _mm256_mul_ps(fi, sbv), fo);
          } else {
            t[m * 2 + h] = hs ? _mm256_fmadd_ps(D[h], fi, t[m * 2 + h]) : _mm256_mul_ps(D[h], fi);
            if (hs == H - 1) fo = _mm256_fmadd_ps(sbv, t[m * 2 + h], fo);
          }
        }
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) store(g, m0 + m, p * kPanel + 8 * h, f[m * 2 + h]);
}

// code_dot formats: i_b = sum over the 32-block's two sub-blocks of code_s * (dot_s - offset *
// asum_s), m_b = sum of mcode_s * asum_s, both exact in int32; the fold of gemm_blk/ref.cpp.
template <int F, int MR>
void tile_code_dot(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr bool mins = fmt.min != MinKind::None;
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  __m256 f[MR * 2];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * 2; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < g->K / fmt.block; ++t) {
    __m256 gs[MR * 2], hs[MR * 2];
    LOWBIT_UNROLL
    for (int i = 0; i < MR * 2; ++i) gs[i] = hs[i] = _mm256_setzero_ps();
    for (int64_t k0 = t * fmt.block; k0 < (t + 1) * fmt.block; k0 += kActBlock) {
      __m256i ib[MR * 2], mb[MR * 2];
      LOWBIT_UNROLL
      for (int i = 0; i < MR * 2; ++i) ib[i] = mb[i] = _mm256_setzero_si256();
      for (int64_t s = k0 / 16; s < k0 / 16 + 2; ++s) {
        __m256i acc[MR * 2];
        LOWBIT_UNROLL
        for (int i = 0; i < MR * 2; ++i) acc[i] = _mm256_setzero_si256();
        LOWBIT_UNROLL
        for (int st = 0; st < 2; ++st) {
          if (MR == 1 || m0 == 0) stream_ahead<F, 1>(g, p, 2 * s + st);
          LOWBIT_UNROLL
          for (int h = 0; h < 2; ++h) {
            __m256i lo, hi;
            values<F>(g, p, 2 * s + st, h, lo, hi);
            LOWBIT_UNROLL
            for (int m = 0; m < MR; ++m) {
              acc[m * 2 + h] = dot4<false>(acc[m * 2 + h], lo, bcast4(a + m * g->lda + 16 * s + 8 * st));
              acc[m * 2 + h] = dot4<false>(acc[m * 2 + h], hi, bcast4(a + m * g->lda + 16 * s + 8 * st + 4));
            }
          }
        }
        __m256i code[2], mcode[2];
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          const __m128i raw = _mm_loadl_epi64((const __m128i*)(g->sc + (p * (g->K / 16) + s) * kPanel + 8 * h));
          code[h] = fmt.pair4 ? _mm256_and_si256(_mm256_cvtepu8_epi32(raw), _mm256_set1_epi32(0x0F))
                              : _mm256_cvtepi8_epi32(raw);
          mcode[h] = _mm256_srli_epi32(_mm256_cvtepu8_epi32(raw), 4);
        }
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const int32_t asum = g->asum[(m0 + m) * n16 + s];
          LOWBIT_UNROLL
          for (int h = 0; h < 2; ++h) {
            const __m256i i = _mm256_sub_epi32(acc[m * 2 + h], _mm256_set1_epi32(fmt.offset * asum));
            ib[m * 2 + h] = _mm256_add_epi32(ib[m * 2 + h], _mm256_mullo_epi32(code[h], i));
            if (mins)
              mb[m * 2 + h] = _mm256_add_epi32(mb[m * 2 + h], _mm256_mullo_epi32(mcode[h], _mm256_set1_epi32(asum)));
          }
        }
      }
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m256 sb = _mm256_set1_ps(g->ablock[(m0 + m) * n32 + k0 / kActBlock]);
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) {
          gs[m * 2 + h] = _mm256_fmadd_ps(sb, _mm256_cvtepi32_ps(ib[m * 2 + h]), gs[m * 2 + h]);
          if (mins) hs[m * 2 + h] = _mm256_fmadd_ps(sb, _mm256_cvtepi32_ps(mb[m * 2 + h]), hs[m * 2 + h]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (p * (g->K / fmt.block) + t) * kPanel + 8 * h;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)g->d + at)));
      const __m256 ndm = mins ? _mm256_xor_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(g->dm + at))),
                                              _mm256_set1_ps(-0.f))
                              : _mm256_setzero_ps();
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        if (mins) f[m * 2 + h] = _mm256_fmadd_ps(ndm, hs[m * 2 + h], f[m * 2 + h]);
        f[m * 2 + h] = _mm256_fmadd_ps(d, gs[m * 2 + h], f[m * 2 + h]);
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) store(g, m0 + m, p * kPanel + 8 * h, f[m * 2 + h]);
}

template <int F, int MR>
void tile_f32(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub;
  const int64_t nsub = g->K / S;
  const float* x = (const float*)g->a + m0 * g->lda;
  const __m256i byte = _mm256_set1_epi32(0xFF), off = _mm256_set1_epi32(fmt.offset);
  __m256 f[MR * 2];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * 2; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t s = 0; s < nsub; ++s) {
    const int64_t k0 = s * S;
    __m256 acc[MR * 2];
    LOWBIT_UNROLL
    for (int i = 0; i < MR * 2; ++i) acc[i] = _mm256_setzero_ps();
    for (int st = 0; st < S / 8; ++st) {
      if (MR == 1 || m0 == 0) stream_ahead<F, 1>(g, p, k0 / 8 + st);
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        __m256i v[2];
        values<F>(g, p, k0 / 8 + st, h, v[0], v[1]);
        LOWBIT_UNROLL
        for (int i = 0; i < 8; ++i) {  // k0 + 8 st + i, in order: byte i % 4 of each lane
          const __m256i q = _mm256_and_si256(_mm256_srli_epi32(v[i / 4], 8 * (i % 4)), byte);
          const __m256 w = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, off));
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m)
            acc[m * 2 + h] = _mm256_fmadd_ps(w, _mm256_set1_ps(x[m * g->lda + k0 + 8 * st + i]), acc[m * 2 + h]);
        }
      }
    }
    __m256 D[2], B[2];
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) scales<F>(g, p, s, h, D[h], B[h]);
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        if (fmt.min != MinKind::None)
          f[m * 2 + h] = _mm256_fmadd_ps(B[h], _mm256_set1_ps(g->xsum[(m0 + m) * nsub + s]), f[m * 2 + h]);
        f[m * 2 + h] = _mm256_fmadd_ps(D[h], acc[m * 2 + h], f[m * 2 + h]);
      }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) store(g, m0 + m, p * kPanel + 8 * h, f[m * 2 + h]);
}

template <int F, bool A8, int MR>
void tile(const BlkArgs* g, int64_t m0, int64_t p) {
  if constexpr (!A8) tile_f32<F, MR>(g, m0, p);
  else if constexpr (kBlockFormats[F].code_dot) tile_code_dot<F, MR>(g, m0, p);
  else tile_a8<F, MR>(g, m0, p);
}

template <int F, bool A8>
void run(const BlkArgs* g, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < 2 ? g->M - m : 2);
      if (mr == 2)
        tile<F, A8, 2>(g, m, p);
      else
        tile<F, A8, 1>(g, m, p);
      m += mr;
    }
}

template <bool A8, int F = 0>
void dispatch(const BlkArgs* g, int64_t p0, int64_t p1) {
  if constexpr (F < kNumBlockFormats) {
    if (g->fmt == F) return run<F, A8>(g, p0, p1);
    dispatch<A8, F + 1>(g, p0, p1);
  }
}

}  // namespace

void gemm_blk_a8(const BlkArgs* g, int64_t p0, int64_t p1) { dispatch<true>(g, p0, p1); }
void gemm_blk_f32(const BlkArgs* g, int64_t p0, int64_t p1) { dispatch<false>(g, p0, p1); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
