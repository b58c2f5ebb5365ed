// Block-format matmuls (formats.h), AVX-512: one template over the format's descriptor, tiles of
// MR rows x J panels of 16 columns. Values are rebuilt per 8 k as two 16-column x 4-k byte
// vectors: nibbles AND 0x0F / shift 4, the grid by VPSHUFB, each bit plane added under its 64-bit
// mask (VPADDB with a k-mask); then VPDPBUSD (u8 values x s8 activations) per sub-block, or
// float FMAs in k order, each weight's float by VPERMPS / VPERMT2PS from a table indexed by the
// value (formats of up to 5 bits; the others shift, mask and convert). Scales follow the
// reference's fold exactly (gemm_blk/ref.cpp).
// code_dot formats (Q2_K, Q3_K) with int8 activations build bytes code * (u - offset) + bias
// instead: the sub-block's code bytes, doubled per plane, are added under each plane's mask to
// bias - offset * code, so that one VPDPBUSD chain covers the 32-input activation block and the
// float fold runs once per 32 inputs (d and dmin once per 256).
#include <immintrin.h>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include "formats.h"
#include "kernels/isa.h"
#include "kernels/dot512.h"
#include "kernels/stream.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

// This thread's buffer for a panel pair's value bytes (run), 64-byte aligned, grown as needed and
// shared by every format.
uint8_t* value_buffer(int64_t bytes) {
  struct Buffer {
    uint8_t* p = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (buf.size < bytes) {
    std::free(buf.p);
    buf.p = (uint8_t*)std::aligned_alloc(64, (size_t)(bytes + 63) / 64 * 64);
    buf.size = buf.p ? bytes : 0;
    if (!buf.p) throw std::bad_alloc();
  }
  return buf.p;
}

// The u8 values of panel p's 16 columns at k8*8 .. k8*8+7: lo (k 0-3) and hi (k 4-7).
// grid = false: the grid formats' 4-bit indices, not their values.
template <int F, bool grid = true>
inline void values(const BlkArgs* g, int64_t p, int64_t k8, __m512i& lo, __m512i& hi) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  if (fmt.bits == 8) {
    const uint8_t* at = g->q8 + p * g->K * 16 + k8 * 128;
    lo = _mm512_loadu_si512(at);
    hi = _mm512_loadu_si512(at + 64);
    return;
  }
  if (fmt.nib) {
    const uint8_t* at = g->nib + p * g->K * 8 + k8 * 64;
    const __m512i v = _mm512_loadu_si512(at), nib = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(v, nib);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
  } else {
    lo = hi = _mm512_setzero_si512();
  }
  if (grid && fmt.lut != Lut::None) {
    const __m512i lut = _mm512_broadcast_i32x4(
        _mm_loadu_si128((const __m128i*)(fmt.lut == Lut::IQ4 ? kLutIQ4 : kLutMXFP4)));
    lo = _mm512_shuffle_epi8(lut, lo);
    hi = _mm512_shuffle_epi8(lut, hi);
  }
  if (fmt.planes) {
    const uint64_t* w = g->bits + (p * (g->K / 4) + 2 * k8) * fmt.planes;
    LOWBIT_UNROLL
    for (int j = 0; j < fmt.planes; ++j) {
      const __m512i bit = _mm512_set1_epi8((char)(1 << ((fmt.nib ? 4 : 0) + j)));
      lo = _mm512_mask_add_epi8(lo, (__mmask64)w[j], lo, bit);
      hi = _mm512_mask_add_epi8(hi, (__mmask64)w[fmt.planes + j], hi, bit);
    }
  }
}

// D and B of sub-block s for panel p's 16 columns (blk_scale, 16 lanes at once).
template <int F>
inline void scales(const BlkArgs* g, int64_t p, int64_t s, __m512& D, __m512& B) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  const int64_t at_blk = (p * (g->K / fmt.block) + s * fmt.sub / fmt.block) * kPanel;
  const int64_t at_sub = (p * (g->K / fmt.sub) + s) * kPanel;
  const __m512 neg = _mm512_set1_ps(-0.f);
  if (fmt.scale == ScaleKind::E8M0) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)((const uint8_t*)g->d + at_blk)));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    const __m512i tiny = _mm512_sllv_epi32(_mm512_set1_epi32(0x00200000), e);
    D = _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2)), normal, tiny));
  } else {
    D = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)g->d + at_blk)));
  }
  __m128i codes = _mm_setzero_si128();
  if (fmt.scale == ScaleKind::Code || fmt.pair4) codes = _mm_loadu_si128((const __m128i*)(g->sc + at_sub));
  if (fmt.scale == ScaleKind::Code) {
    const __m512i c = fmt.pair4 ? _mm512_and_si512(_mm512_cvtepu8_epi32(codes), _mm512_set1_epi32(0x0F))
                                : _mm512_cvtepi8_epi32(codes);
    D = _mm512_mul_ps(D, _mm512_cvtepi32_ps(c));
  }
  B = _mm512_setzero_ps();
  if (fmt.min == MinKind::Half)
    B = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->dm + at_blk)));
  if (fmt.min == MinKind::Code) {
    const __m512i c = fmt.pair4 ? _mm512_srli_epi32(_mm512_cvtepu8_epi32(codes), 4)
                                : _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g->mc + at_sub)));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->dm + at_blk)));
    B = _mm512_xor_ps(_mm512_mul_ps(dmin, _mm512_cvtepi32_ps(c)), neg);
  }
}

inline __mmask16 tail_mask(const BlkArgs* g, int64_t panel) {
  const int64_t left = g->N - panel * kPanel;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

inline void store(const BlkArgs* g, int64_t m, int64_t panel, __m512 f) {
  const __mmask16 mask = tail_mask(g, panel);
  const __m512 y = g->bias ? _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, g->bias + panel * kPanel)) : f;
  _mm512_mask_storeu_ps(g->c + m * g->ldc + panel * kPanel, mask, y);
}

// Value bytes rebuilt once per panel for every row tile (run): per 8 k, lo then hi, 128 bytes.
inline void load_pre(const BlkArgs* g, const uint8_t* pre, int j, int64_t k8, __m512i& lo, __m512i& hi) {
  const uint8_t* at = pre + j * g->K * 16 + k8 * 128;
  lo = _mm512_loadu_si512(at);  // Q8_0 reads its own bytes, aligned as the file was
  hi = _mm512_loadu_si512(at + 64);
}

// Formats whose D or B take a multiply keep them per sub-block after the pair's value bytes
// (unpack), 128 bytes each; the others load their float16 scales as they go.
template <int F>
constexpr bool kPreScales = kBlockFormats[F].scale == ScaleKind::Code && !kBlockFormats[F].code_dot;

template <int F>
inline float* pre_scales(const BlkArgs* g, const uint8_t* pre, int j, int64_t s) {
  return (float*)(pre + 2 * g->K * 16 + (j * (g->K / kBlockFormats[F].sub) + s) * 128);
}

template <int F>
inline void load_pre_scales(const BlkArgs* g, const uint8_t* pre, int j, int64_t s, __m512& D, __m512& B) {
  const float* at = pre_scales<F>(g, pre, j, s);
  D = _mm512_load_ps(at);
  B = _mm512_load_ps(at + 16);
}

template <int F, int MR, int J, bool PRE>
void tile_a8(const BlkArgs* g, int64_t m0, int64_t p, const uint8_t* pre) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub, H = kActBlock / S;  // sub-blocks per activation block
  static_assert(H == 1 || fmt.min == MinKind::None, "minima fold per 32-input sub-block");
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  if (MR > 1) prefetch_for_write(g->c + m0 * g->ldc + p * kPanel, g->ldc, MR, J);
  __m512 f[MR * J];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J; ++i) f[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < n32; ++b) {
    __m512 t[MR * J];  // H > 1: the block's sum of D_s * i_s
    LOWBIT_UNROLL
    for (int h = 0; h < H; ++h) {
      const int64_t s = b * H + h, k0 = s * S;
      __m512i acc[MR * J];
      LOWBIT_UNROLL
      for (int i = 0; i < MR * J; ++i) acc[i] = _mm512_setzero_si512();
      LOWBIT_UNROLL
      for (int st = 0; st < S / 8; ++st) {
        __m512i lo[J], hi[J];
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          if (PRE) load_pre(g, pre, j, k0 / 8 + st, lo[j], hi[j]);
          else values<F>(g, p + j, k0 / 8 + st, lo[j], hi[j]);
        }
        if (MR == 1 || ((!PRE || fmt.bits == 8) && m0 == 0)) stream_ahead<F, J>(g, p, k0 / 8 + st);  // Q8_0: in place
        dot8<MR, J>(acc, lo, hi, a, g->lda, k0 + 8 * st);
      }
      __m512 D[J], B[J];
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) {
        if (PRE && kPreScales<F>) load_pre_scales<F>(g, pre, j, s, D[j], B[j]);
        else scales<F>(g, p + j, s, D[j], B[j]);
      }
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const float sb = g->ablock[(m0 + m) * n32 + b];
        const int32_t* as = g->asum + (m0 + m) * n16 + k0 / 16;
        const int32_t asum = S == 16 ? as[0] : as[0] + as[1];
        const __m512 sbv = _mm512_set1_ps(sb), av = _mm512_set1_ps(sb * (float)asum);
        const __m512i off = _mm512_set1_epi32(fmt.offset * asum);
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const __m512i i = fmt.offset ? _mm512_sub_epi32(acc[m * J + j], off) : acc[m * J + j];
          const __m512 fi = _mm512_cvtepi32_ps(i);
          __m512& fo = f[m * J + j];
          if (H == 1) {
            if (fmt.min != MinKind::None) fo = _mm512_fmadd_ps(B[j], av, fo);
            fo = _mm512_fmadd_ps(D[j], _mm512_mul_ps(fi, sbv), fo);
          } else {
            t[m * J + j] = h ? _mm512_fmadd_ps(D[j], fi, t[m * J + j]) : _mm512_mul_ps(D[j], fi);
            if (h == H - 1) fo = _mm512_fmadd_ps(sbv, t[m * J + j], fo);
          }
        }
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) store(g, m0 + m, p + j, f[m * J + j]);
}

// code_dot: byte = code * (u - offset) + kBias, within [0, 255] for every u and code (formats.h)
template <int F>
struct CodeDot {
  static constexpr BlockFormat fmt = kBlockFormats[F];
  static_assert(!fmt.code_dot || (fmt.sub == 16 && !fmt.nib && fmt.bits == fmt.planes &&
                                  (fmt.offset & (fmt.offset - 1)) == 0),
                "code_dot: 16-input sub-blocks of bit planes, a power-of-two offset");
  // Q2_K: code 0..15, u 0..3: 0..45.  Q3_K: code -32..31, u - 4 in -4..3: -124..128, + 127.
  static constexpr int kBias = fmt.offset ? 127 : 0;
};

// Sub-block s's code bytes of panel p, each column's code in all 4 bytes of its lane: c, and the
// plane addends c << j (bytes, wrapping) and the start kBias - offset * c.
template <int F>
inline void coded(const BlkArgs* g, int64_t p, int64_t s, __m512i& start, __m512i add[]) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  alignas(64) static const int8_t kRep[64] = {
      0,  0,  0,  0,  1,  1,  1,  1,  2,  2,  2,  2,  3,  3,  3,  3,   4,  4,  4,  4,  5,  5,
      5,  5,  6,  6,  6,  6,  7,  7,  7,  7,  8,  8,  8,  8,  9,  9,  9,  9,  10, 10, 10, 10,
      11, 11, 11, 11, 12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15};
  const __m128i raw = _mm_loadu_si128((const __m128i*)(g->sc + (p * (g->K / fmt.sub) + s) * kPanel));
  __m512i c = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(raw), _mm512_load_si512(kRep));
  if (fmt.pair4) c = _mm512_and_si512(c, _mm512_set1_epi8(0x0F));
  __m512i off = _mm512_setzero_si512();
  LOWBIT_UNROLL
  for (int j = 0; j < 8; ++j) {
    if (j < fmt.planes) add[j] = c;
    if (fmt.offset == 1 << j) off = c;
    c = _mm512_add_epi8(c, c);
  }
  start = _mm512_sub_epi8(_mm512_set1_epi8((char)CodeDot<F>::kBias), off);
}

// Q2_K's minima per 32-block: each lane the pair (mcode of s, mcode of s + 1) as int16.
template <int F>
inline __m512i min_pairs(const BlkArgs* g, int64_t p, int64_t s) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  static_assert(fmt.min != MinKind::Code || fmt.pair4, "code_dot minima: Q2_K's shared byte");
  const uint8_t* sc = (const uint8_t*)g->sc + (p * (g->K / fmt.sub) + s) * kPanel;
  const __m512i m0 = _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)sc)), 4);
  const __m512i m1 = _mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(sc + kPanel))), 4);
  return _mm512_or_si512(m0, _mm512_slli_epi32(m1, 16));
}

// The code_dot bytes of panel p at k8 (lo: k 0-3, hi: k 4-7) from its sub-block's coded().
template <int F>
inline void code_values(const BlkArgs* g, int64_t p, int64_t k8, __m512i start, const __m512i add[],
                        __m512i& lo, __m512i& hi) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  const uint64_t* w = g->bits + (p * (g->K / 4) + 2 * k8) * fmt.planes;
  lo = hi = start;
  LOWBIT_UNROLL
  for (int b = 0; b < fmt.planes; ++b) {
    lo = _mm512_mask_add_epi8(lo, (__mmask64)w[b], lo, add[b]);
    hi = _mm512_mask_add_epi8(hi, (__mmask64)w[fmt.planes + b], hi, add[b]);
  }
}

template <int F, int MR, int J, bool PRE>
void tile_code_dot(const BlkArgs* g, int64_t m0, int64_t p, const uint8_t* pre) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr bool mins = fmt.min != MinKind::None;
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  if (MR > 1) prefetch_for_write(g->c + m0 * g->ldc + p * kPanel, g->ldc, MR, J);
  alignas(64) float fbuf[MR * J][16];
  for (int64_t t = 0; t < g->K / fmt.block; ++t) {
    __m512 gs[MR * J], hs[MR * J];
    LOWBIT_UNROLL
    for (int i = 0; i < MR * J; ++i) gs[i] = hs[i] = _mm512_setzero_ps();
    for (int64_t k0 = t * fmt.block; k0 < (t + 1) * fmt.block; k0 += kActBlock) {
      __m512i acc[MR * J];
      LOWBIT_UNROLL
      for (int i = 0; i < MR * J; ++i) acc[i] = _mm512_setzero_si512();
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) {  // the block's two sub-blocks
        const int64_t s = k0 / 16 + h;
        __m512i start[J], add[J][fmt.planes];
        if (!PRE) {
          LOWBIT_UNROLL
          for (int j = 0; j < J; ++j) coded<F>(g, p + j, s, start[j], add[j]);
        }
        LOWBIT_UNROLL
        for (int st = 0; st < 2; ++st) {
          const int64_t k8 = 2 * s + st;
          __m512i lo[J], hi[J];
          LOWBIT_UNROLL
          for (int j = 0; j < J; ++j) {
            if (PRE) load_pre(g, pre, j, k8, lo[j], hi[j]);
            else code_values<F>(g, p + j, k8, start[j], add[j], lo[j], hi[j]);
          }
          if (MR == 1 || (!PRE && m0 == 0)) stream_ahead<F, J>(g, p, k8);
          dot8<MR, J>(acc, lo, hi, a, g->lda, 8 * k8);
        }
      }
      __m512i mp[J];
      if (mins) {
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) mp[j] = min_pairs<F>(g, p + j, k0 / 16);
      }
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m512 sb = _mm512_set1_ps(g->ablock[(m0 + m) * n32 + k0 / kActBlock]);
        const int32_t* as = g->asum + (m0 + m) * n16 + k0 / 16;
        const __m512i bias = _mm512_set1_epi32(CodeDot<F>::kBias * (as[0] + as[1]));
        const __m512i apair = _mm512_set1_epi32((int32_t)((uint32_t)(uint16_t)as[0] | (uint32_t)as[1] << 16));
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const __m512i i = CodeDot<F>::kBias ? _mm512_sub_epi32(acc[m * J + j], bias) : acc[m * J + j];
          gs[m * J + j] = _mm512_fmadd_ps(sb, _mm512_cvtepi32_ps(i), gs[m * J + j]);
          if (mins) hs[m * J + j] = _mm512_fmadd_ps(sb, _mm512_cvtepi32_ps(_mm512_madd_epi16(mp[j], apair)), hs[m * J + j]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) {
      const int64_t at = ((p + j) * (g->K / fmt.block) + t) * kPanel;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)g->d + at)));
      const __m512 ndm = mins ? _mm512_xor_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g->dm + at))),
                                              _mm512_set1_ps(-0.f))
                              : _mm512_setzero_ps();
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        __m512 f = t ? _mm512_load_ps(fbuf[m * J + j]) : _mm512_setzero_ps();
        if (mins) f = _mm512_fmadd_ps(ndm, hs[m * J + j], f);
        _mm512_store_ps(fbuf[m * J + j], _mm512_fmadd_ps(d, gs[m * J + j], f));
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) store(g, m0 + m, p + j, _mm512_load_ps(fbuf[m * J + j]));
}

// Float activations: each weight as a float, (u - offset) or the grid's value, by VPERMPS from a
// table indexed by u itself (values of up to 5 bits: every format but Q6_K and Q8_0), where the
// byte's shift, mask, offset and convert took four operations a weight vector; the same floats.
template <int F>
constexpr bool kTableF32 = kBlockFormats[F].bits <= 5;

template <int F>
struct TableF32 {
  alignas(64) float v[32] = {};
  constexpr TableF32() {
    constexpr BlockFormat fmt = kBlockFormats[F];
    for (int u = 0; u < (kTableF32<F> ? 1 << fmt.bits : 0); ++u)
      v[u] = fmt.lut == Lut::IQ4     ? (float)(kLutIQ4[u] - fmt.offset)
             : fmt.lut == Lut::MXFP4 ? (float)(kLutMXFP4[u] - fmt.offset)
                                     : (float)(u - fmt.offset);
  }
};
template <int F>
constexpr TableF32<F> kTableF32Of{};

// Panel p's weights at k8 * 8 + i (i in 0..7) as floats, for table formats (kTableF32).
template <int F>
struct WeightsF32 {
  static constexpr BlockFormat fmt = kBlockFormats[F];
  static constexpr bool kPacked = fmt.nib && !fmt.planes;  // nibbles straight from the file bytes
  __m512i v[2];  // kPacked: the 64 packed bytes (v[0]); else the u bytes lo / hi (values)
  __m512 t0, t1;
  WeightsF32() : t0(_mm512_load_ps(kTableF32Of<F>.v)), t1(_mm512_load_ps(kTableF32Of<F>.v + 16)) {}
  void load(const BlkArgs* g, int64_t p, int64_t k8) {
    if (kPacked) v[0] = _mm512_loadu_si512(g->nib + p * g->K * 8 + k8 * 64);
    else values<F, false>(g, p, k8, v[0], v[1]);
  }
  __m512 at(int i) const {  // VPERMPS reads the index's low 4 bits, VPERMT2PS its low 5
    const int shift = kPacked ? 8 * (i % 4) + 4 * (i / 4) : 8 * (i % 4);
    const __m512i src = kPacked ? v[0] : v[i / 4];
    const __m512i idx = shift ? _mm512_srli_epi32(src, shift) : src;
    return fmt.bits <= 4 ? _mm512_permutexvar_ps(idx, t0) : _mm512_permutex2var_ps(t0, idx, t1);
  }
};

template <int F, int MR, int J>
void tile_f32(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub;
  const int64_t nsub = g->K / S;
  const float* x = (const float*)g->a + m0 * g->lda;
  const __m512i byte = _mm512_set1_epi32(0xFF), off = _mm512_set1_epi32(fmt.offset);
  struct None {};
  std::conditional_t<kTableF32<F>, WeightsF32<F>, None> tw[J];
  __m512 f[MR * J];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J; ++i) f[i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nsub; ++s) {
    const int64_t k0 = s * S;
    __m512 acc[MR * J];
    LOWBIT_UNROLL
    for (int i = 0; i < MR * J; ++i) acc[i] = _mm512_setzero_ps();
    for (int st = 0; st < S / 8; ++st) {
      __m512i v[2][J];
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) {
        if constexpr (kTableF32<F>) tw[j].load(g, p + j, k0 / 8 + st);
        else values<F>(g, p + j, k0 / 8 + st, v[0][j], v[1][j]);
      }
      if (MR == 1 || m0 == 0) stream_ahead<F, J>(g, p, k0 / 8 + st);
      LOWBIT_UNROLL
      for (int i = 0; i < 8; ++i) {  // k0 + 8 st + i, in order: byte i % 4 of each lane
        __m512 w[J];
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          if constexpr (kTableF32<F>) {
            w[j] = tw[j].at(i);
          } else {
            const __m512i q = _mm512_and_si512(_mm512_srli_epi32(v[i / 4][j], 8 * (i % 4)), byte);
            w[j] = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, off));
          }
        }
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const __m512 xv = _mm512_set1_ps(x[m * g->lda + k0 + 8 * st + i]);
          LOWBIT_UNROLL
          for (int j = 0; j < J; ++j) acc[m * J + j] = _mm512_fmadd_ps(w[j], xv, acc[m * J + j]);
        }
      }
    }
    __m512 D[J], B[J];
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) scales<F>(g, p + j, s, D[j], B[j]);
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) {
        if (fmt.min != MinKind::None)
          f[m * J + j] = _mm512_fmadd_ps(B[j], _mm512_set1_ps(g->xsum[(m0 + m) * nsub + s]), f[m * J + j]);
        f[m * J + j] = _mm512_fmadd_ps(D[j], acc[m * J + j], f[m * J + j]);
      }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) store(g, m0 + m, p + j, f[m * J + j]);
}

using TileFn = void (*)(const BlkArgs*, int64_t, int64_t, const uint8_t*);

template <int F, bool A8, bool PRE, int MR, int J>
void tile(const BlkArgs* g, int64_t m0, int64_t p, const uint8_t* pre) {
  if constexpr (!A8) tile_f32<F, MR, J>(g, m0, p);
  else if constexpr (kBlockFormats[F].code_dot) tile_code_dot<F, MR, J, PRE>(g, m0, p, pre);
  else tile_a8<F, MR, J, PRE>(g, m0, p, pre);
}

// A single row streams up to 4 panels at once (independent chains); several rows share each
// rebuilt weight vector, up to 4 rows x 2 panels.
template <int F, bool A8, bool PRE>
TileFn pick(int mr, int j) {
  static const TileFn one_row[] = {tile<F, A8, PRE, 1, 1>, tile<F, A8, PRE, 1, 2>,
                                   tile<F, A8, PRE, 1, 3>, tile<F, A8, PRE, 1, 4>};
  static const TileFn rows[3][2] = {{tile<F, A8, PRE, 2, 1>, tile<F, A8, PRE, 2, 2>},
                                    {tile<F, A8, PRE, 3, 1>, tile<F, A8, PRE, 3, 2>},
                                    {tile<F, A8, PRE, 4, 1>, tile<F, A8, PRE, 4, 2>}};
  return mr == 1 ? one_row[j - 1] : rows[mr - 2][j - 1];
}

// Panels p .. p + J - 1's value bytes (load_pre's layout), rebuilt once for all row tiles.
template <int F>
void unpack(const BlkArgs* g, int64_t p, int J, uint8_t* out) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  for (int j = 0; j < J; ++j)
    for (int64_t k8 = 0; k8 < g->K / 8; ++k8) {
      __m512i lo, hi;
      if constexpr (fmt.code_dot) {
        __m512i start, add[fmt.planes];
        coded<F>(g, p + j, k8 / 2, start, add);
        code_values<F>(g, p + j, k8, start, add, lo, hi);
      } else {
        values<F>(g, p + j, k8, lo, hi);
      }
      _mm512_store_si512(out + j * g->K * 16 + k8 * 128, lo);
      _mm512_store_si512(out + j * g->K * 16 + k8 * 128 + 64, hi);
    }
  if constexpr (kPreScales<F>)
    for (int j = 0; j < J; ++j)
      for (int64_t s = 0; s < g->K / fmt.sub; ++s) {
        __m512 D, B;
        scales<F>(g, p + j, s, D, B);
        float* at = pre_scales<F>(g, out, j, s);
        _mm512_store_ps(at, D);
        _mm512_store_ps(at + 16, B);
      }
}

// With int8 activations and enough rows, each pair of panels is rebuilt to bytes once (a
// per-thread buffer of 32 bytes per input; Q8_0's bytes are its own), with the K-quants' D and B
// per sub-block as floats, and every row tile reads those: D = d * code and B = -dmin * mcode take
// the FMA pipes VPDPBUSD runs on (Zen 4: multiplies and FMAs do, converts and adds do not).
// Writing and reading back the buffer costs about two thirds of a 4-row tile, so fewer rows rebuild
// the values in each tile: measured on Zen 4, bit planes (Q5_*, Q6_K, Q2_K, Q3_K) pay from 12 rows,
// nibbles and grids (cheap to rebuild) from 32.
template <int F>
constexpr int64_t kPreRows = kBlockFormats[F].planes ? 12 : 32;

template <int F, bool A8>
void run(const BlkArgs* g, int64_t p0, int64_t p1) {
  const int max_j = g->M == 1 ? 4 : 2;
  const bool pre = A8 && g->M >= kPreRows<F>;
  constexpr bool own = kBlockFormats[F].bits == 8;
  uint8_t* buf = pre && !own ? value_buffer(2 * g->K * 16 + (kPreScales<F> ? 2 * (g->K / kBlockFormats[F].sub) * 128 : 0)) : nullptr;
  for (int64_t p = p0; p < p1;) {
    const int j = (int)(p1 - p < max_j ? p1 - p : max_j);
    if (buf) unpack<F>(g, p, j, buf);
    const uint8_t* bytes = own ? g->q8 + p * g->K * 16 : buf;
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < 4 ? g->M - m : 4);
      (pre ? pick<F, A8, true> : pick<F, A8, false>)(mr, j)(g, m, p, bytes);
      m += mr;
    }
    p += j;
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
