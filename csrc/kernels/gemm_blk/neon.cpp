// Block-format matmuls (formats.h), NEON: one template over the format's descriptor, compiled for
// the neon (ARMv8.0), dotprod and i8mm sets. Per 8 k a panel's values are rebuilt, 4 rows at a
// time, as signed bytes v = sgn * (u - voff), 4 rows x 4 k per register (lo: k 0-3, hi: k 4-7):
// nibbles AND 0x0F / shift 4, a grid by TBL, each 64-bit plane word spread to bytes by TBL + CMTST
// and put in place by SLI (above a nibble, the top plane inverted so that the byte is already
// u - voff) or a byte MLA (planes only: v = -u). Dots: SDOT by lane (dotprod; one row on i8mm),
// SMMLA of zipped weight row pairs x activation row pairs (i8mm), SMULL / SMLAL in int16 chains too
// short to overflow (neon); Q8_0 on i8mm keeps u unsigned (USDOT / USMMLA). Scales follow the
// reference's fold exactly (gemm_blk/ref.cpp); ints and bytes become floats without SCVTF.
// code_dot formats (Q2_K, Q3_K) multiply each sub-block's exact dot by its codes in int32 (MUL /
// MLA) and fold per 32 inputs.
#include <arm_neon.h>
#include <cstdint>
#include "formats.h"
#include "kernels/isa.h"
#include "kernels/stream.h"


namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

#if defined(__ARM_FEATURE_MATMUL_INT8)
constexpr bool kI8mm = true;
#else
constexpr bool kI8mm = false;
#endif
#if defined(__ARM_FEATURE_DOTPROD)
constexpr bool kDotprod = true;
#else
constexpr bool kDotprod = false;
#endif

enum Dot { kSdot, kMmla, kMlal };

constexpr int lut_max(const uint8_t* t) {
  int m = 0;
  for (int i = 0; i < 16; ++i) {
    const int v = t[i] < 128 ? 128 - t[i] : t[i] - 128;
    m = v > m ? v : m;
  }
  return m;
}

// How format F's value registers hold its values u: v = sgn * (u - voff), so that
//   sum u a - offset * asum = sgn * sum v a + fix * asum   (exact int32)
// as signed bytes, or with U as unsigned ones (USDOT / USMMLA for Q8_0, and the float path).
template <int F, bool U>
struct Enc {
  static constexpr BlockFormat fmt = kBlockFormats[F];
  static_assert(fmt.lut == Lut::None || fmt.planes == 0, "a grid format with bit planes");
  static constexpr bool planes_only = !fmt.nib && fmt.bits != 8;
  static constexpr int sgn = planes_only && !U ? -1 : 1;
  static constexpr int voff = fmt.nib && fmt.planes ? (8 << fmt.planes) - (U ? 128 : 0)
                              : U                     ? 0
                              : fmt.bits == 8 || fmt.lut != Lut::None ? 128
                                                                      : 0;
  static constexpr int fix = voff - fmt.offset;
  // the largest |v| (signed encodings): bounds the int16 chains of the neon set
  static constexpr int vmax = fmt.bits == 8          ? 128
                              : fmt.lut == Lut::IQ4   ? lut_max(kLutIQ4)
                              : fmt.lut == Lut::MXFP4 ? lut_max(kLutMXFP4)
                              : planes_only           ? (1 << fmt.planes) - 1
                              : fmt.planes            ? voff
                                                      : 15;
};

// Compile-time immediates from an unrolled loop's index.
inline uint8x16_t sli(uint8x16_t a, uint8x16_t b, int n) {
  switch (n) {
    case 4: return vsliq_n_u8(a, b, 4);
    case 5: return vsliq_n_u8(a, b, 5);
    case 6: return vsliq_n_u8(a, b, 6);
    default: return vsliq_n_u8(a, b, 7);
  }
}

inline int8x16_t lane4(int8x16_t a, int lane) {  // the 4 bytes of 32-bit lane `lane`, everywhere
  const int32x4_t x = vreinterpretq_s32_s8(a);
  switch (lane) {
    case 0: return vreinterpretq_s8_s32(vdupq_laneq_s32(x, 0));
    case 1: return vreinterpretq_s8_s32(vdupq_laneq_s32(x, 1));
    case 2: return vreinterpretq_s8_s32(vdupq_laneq_s32(x, 2));
    default: return vreinterpretq_s8_s32(vdupq_laneq_s32(x, 3));
  }
}

inline float32x4_t fma_lane(float32x4_t acc, float32x4_t w, float32x4_t x, int lane) {
  switch (lane) {
    case 0: return vfmaq_laneq_f32(acc, w, x, 0);
    case 1: return vfmaq_laneq_f32(acc, w, x, 1);
    case 2: return vfmaq_laneq_f32(acc, w, x, 2);
    default: return vfmaq_laneq_f32(acc, w, x, 3);
  }
}

#if defined(__ARM_FEATURE_DOTPROD)
template <bool U>
inline int32x4_t sdot(int32x4_t acc, int8x16_t w, int8x16_t a, int lane) {
#if defined(__ARM_FEATURE_MATMUL_INT8)
  if (U) {
    const uint8x16_t u = vreinterpretq_u8_s8(w);
    switch (lane) {
      case 0: return vusdotq_laneq_s32(acc, u, a, 0);
      case 1: return vusdotq_laneq_s32(acc, u, a, 1);
      case 2: return vusdotq_laneq_s32(acc, u, a, 2);
      default: return vusdotq_laneq_s32(acc, u, a, 3);
    }
  }
#endif
  switch (lane) {
    case 0: return vdotq_laneq_s32(acc, w, a, 0);
    case 1: return vdotq_laneq_s32(acc, w, a, 1);
    case 2: return vdotq_laneq_s32(acc, w, a, 2);
    default: return vdotq_laneq_s32(acc, w, a, 3);
  }
}
#endif

// Bytes to floats without SCVTF (two micro-ops on N1's V0, V1's and V2's V0/V2): TBL builds the
// bit patterns 0x4B0000bb (2^23 + b, exactly) from byte idx[4l] of c for lane l, and an FSUB of
// 2^23 + bias leaves b - bias, exactly.
constexpr uint8_t kMagic[16] = {0x00, 0x4B};
inline float32x4_t bytes_to_f32(uint8x16_t c, uint8x16_t idx, float32x4_t two23_bias) {
  const uint8x16x2_t t = {{c, vld1q_u8(kMagic)}};
  return vsubq_f32(vreinterpretq_f32_u8(vqtbl2q_u8(t, idx)), two23_bias);
}

// Byte tables for bytes_to_f32: rows 4q..4q+3 of 16 per-row bytes (scale codes), and k = i of a
// 4-row x 4-k value register (float activations).
constexpr uint8_t kRowsF[4][16] = {
    {0, 16, 16, 17, 1, 16, 16, 17, 2, 16, 16, 17, 3, 16, 16, 17},
    {4, 16, 16, 17, 5, 16, 16, 17, 6, 16, 16, 17, 7, 16, 16, 17},
    {8, 16, 16, 17, 9, 16, 16, 17, 10, 16, 16, 17, 11, 16, 16, 17},
    {12, 16, 16, 17, 13, 16, 16, 17, 14, 16, 16, 17, 15, 16, 16, 17}};
constexpr uint8_t kKF[4][16] = {{0, 16, 16, 17, 4, 16, 16, 17, 8, 16, 16, 17, 12, 16, 16, 17},
                                {1, 16, 16, 17, 5, 16, 16, 17, 9, 16, 16, 17, 13, 16, 16, 17},
                                {2, 16, 16, 17, 6, 16, 16, 17, 10, 16, 16, 17, 14, 16, 16, 17},
                                {3, 16, 16, 17, 7, 16, 16, 17, 11, 16, 16, 17, 15, 16, 16, 17}};
// A plane word's 16 bits of rows 4q..4q+3 (bytes 2q, 2q+1) spread to one byte each, then tested
// bit by bit. Words come in pairs from one 16-byte load: the second word's bytes are 8 higher.
constexpr uint8_t kSpread[2][4][16] = {
    {{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
     {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
     {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
     {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7}},
    {{8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
     {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
     {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
     {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}}};
constexpr uint8_t kBitOf[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};

// The value registers of panel p's rows 4q..4q+3 at k8*8 .. k8*8+7: lo (k 0-3) and hi (k 4-7).
// Built one row group at a time, next to the dots that use them, to keep few registers live.
template <int F, bool U>
inline void values(const BlkArgs* g, int64_t p, int64_t k8, int q, int8x16_t& lo, int8x16_t& hi) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  if constexpr (fmt.bits == 8) {
    const uint8_t* at = g->q8 + p * g->K * 16 + k8 * 128;
    const uint8x16_t a = vld1q_u8(at + 16 * q), b = vld1q_u8(at + 64 + 16 * q);
    lo = vreinterpretq_s8_u8(U ? a : veorq_u8(a, vdupq_n_u8(0x80)));
    hi = vreinterpretq_s8_u8(U ? b : veorq_u8(b, vdupq_n_u8(0x80)));
    return;
  }
  uint8x16_t x[2];
  if constexpr (fmt.nib) {
    const uint8_t* at = g->nib + p * g->K * 8 + k8 * 64;
    const uint8x16_t b = vld1q_u8(at + 16 * q);
    x[0] = fmt.planes ? b : vandq_u8(b, vdupq_n_u8(0x0F));  // SLI keeps only the low nibble
    x[1] = vshrq_n_u8(b, 4);
    if constexpr (fmt.lut != Lut::None) {
      const uint8x16_t lut = vld1q_u8(fmt.lut == Lut::IQ4 ? kLutIQ4 : kLutMXFP4);
      const uint8x16_t grid = U ? lut : veorq_u8(lut, vdupq_n_u8(0x80));
      x[0] = vqtbl1q_u8(grid, x[0]);
      x[1] = vqtbl1q_u8(grid, x[1]);
    }
  }
  if constexpr (fmt.planes > 0) {
    // 2 * planes words (lo: k 0-3, then hi: k 4-7), two per 16-byte load
    const uint64_t* w = g->bits + (p * (g->K / 4) + 2 * k8) * fmt.planes;
    const uint8x16_t bit = vld1q_u8(kBitOf);
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h)
      LOWBIT_UNROLL
      for (int j = 0; j < fmt.planes; ++j) {
        const int t = h * fmt.planes + j;
        uint8x16_t word = vld1q_u8((const uint8_t*)(w + 2 * (t / 2)));
        // above a nibble the top plane goes in inverted: its SLI then leaves u - 2^(3 + planes)
        if (fmt.nib && j == fmt.planes - 1) word = vmvnq_u8(word);
        const uint8x16_t spread = vqtbl1q_u8(word, vld1q_u8(kSpread[t % 2][q]));
        const uint8x16_t m = vtstq_u8(spread, bit);  // 0xFF where the bit is set
        uint8x16_t& y = x[h];
        if (fmt.nib)
          y = sli(y, m, 4 + j);
        else
          y = j == 0 ? m : vmlaq_u8(y, m, vdupq_n_u8((uint8_t)(1 << j)));  // -= 2^j per set bit
      }
    LOWBIT_UNROLL
    for (int i = 0; i < 2 && U; ++i)  // unsigned: u - voff + 128, or u from -u
      x[i] = fmt.nib ? veorq_u8(x[i], vdupq_n_u8(0x80))
                     : vreinterpretq_u8_s8(vnegq_s8(vreinterpretq_s8_u8(x[i])));
  }
  lo = vreinterpretq_s8_u8(x[0]);
  hi = vreinterpretq_s8_u8(x[1]);
}

// The per-row int32 results res[m][q] (rows 4q..4q+3 of the panel, q in [Q0, Q0 + G)) of
// sub-block [k0, k0 + sub) for MR activation rows a[m]: sum v a, v as values() builds them;
// stream: this tile reads the weights first, and prefetches ahead (stream.h).
template <int F, int MR, Dot D, int Q0 = 0, int G = 4>
inline void dots(const BlkArgs* g, int64_t p, const int8_t* const* a, int64_t k0,
                 int32x4_t res[][4], bool stream) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub;
  if constexpr (D == kSdot) {
#if defined(__ARM_FEATURE_DOTPROD)
    constexpr bool U = kI8mm && fmt.bits == 8;  // USDOT: Q8_0 without its XOR
    // One chain per accumulator, lo and hi alike: even a lone row's chains (S / 4 deep) are
    // shorter than the value and scale work around them, and the next sub-block's overlap.
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int q = Q0; q < Q0 + G; ++q) res[m][q] = vdupq_n_s32(0);
    LOWBIT_UNROLL
    for (int t = 0; t < S / 16; ++t) {
      int8x16_t x[MR];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) x[m] = vld1q_s8(a[m] + k0 + 16 * t);
      LOWBIT_UNROLL
      for (int st = 0; st < 2; ++st) {
        if (stream && Q0 == 0) stream_ahead<F, 1>(g, p, k0 / 8 + 2 * t + st);
        LOWBIT_UNROLL
        for (int q = Q0; q < Q0 + G; ++q) {
          int8x16_t lo, hi;
          values<F, U>(g, p, k0 / 8 + 2 * t + st, q, lo, hi);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m) {
            res[m][q] = sdot<U>(res[m][q], lo, x[m], 2 * st);
            res[m][q] = sdot<U>(res[m][q], hi, x[m], 2 * st + 1);
          }
        }
      }
    }
#endif
  } else if constexpr (D == kMmla) {
#if defined(__ARM_FEATURE_MATMUL_INT8)
    // SMMLA: 2 weight rows x 8 k (lo and hi zipped) against a 2-row x 8-k activation pair; the
    // weights go first, so each result holds [r m0, r m1, r' m0, r' m1] and UZP1 / UZP2 sort it.
    static_assert(MR % 2 == 0, "row pairs");
    constexpr bool U = fmt.bits == 8;  // USMMLA: Q8_0 without its XOR
    constexpr int PR = MR / 2;
    int32x4_t acc[PR][8];
    LOWBIT_UNROLL
    for (int r = 0; r < PR; ++r)
      LOWBIT_UNROLL
      for (int i = 2 * Q0; i < 2 * (Q0 + G); ++i) acc[r][i] = vdupq_n_s32(0);
    LOWBIT_UNROLL
    for (int k8 = 0; k8 < S / 8; ++k8) {
      if (stream && Q0 == 0) stream_ahead<F, 1>(g, p, k0 / 8 + k8);
      int8x16_t ap[PR];
      LOWBIT_UNROLL
      for (int r = 0; r < PR; ++r)
        ap[r] = vcombine_s8(vld1_s8(a[2 * r] + k0 + 8 * k8),
                            vld1_s8(a[2 * r + 1] + k0 + 8 * k8));
      LOWBIT_UNROLL
      for (int q = Q0; q < Q0 + G; ++q) {
        int8x16_t vlo, vhi;
        values<F, U>(g, p, k0 / 8 + k8, q, vlo, vhi);
        const int32x4_t lo = vreinterpretq_s32_s8(vlo), hi = vreinterpretq_s32_s8(vhi);
        const int8x16_t b[2] = {vreinterpretq_s8_s32(vzip1q_s32(lo, hi)),
                                vreinterpretq_s8_s32(vzip2q_s32(lo, hi))};
        LOWBIT_UNROLL
        for (int i = 0; i < 2; ++i)
          LOWBIT_UNROLL
          for (int r = 0; r < PR; ++r)
            acc[r][2 * q + i] =
                U ? vusmmlaq_s32(acc[r][2 * q + i], vreinterpretq_u8_s8(b[i]), ap[r])
                  : vmmlaq_s32(acc[r][2 * q + i], b[i], ap[r]);
      }
    }
    LOWBIT_UNROLL
    for (int r = 0; r < PR; ++r)
      LOWBIT_UNROLL
      for (int q = Q0; q < Q0 + G; ++q) {
        res[2 * r][q] = vuzp1q_s32(acc[r][2 * q], acc[r][2 * q + 1]);
        res[2 * r + 1][q] = vuzp2q_s32(acc[r][2 * q], acc[r][2 * q + 1]);
      }
#endif
  } else {
    // SMULL / SMLAL: int16 lanes (row, k % 4) take L products before SADALP widens them, L small
    // enough that |sum| <= L * vmax * 128 <= 32767; SADDLP / ADDP then sum the 4 k of each row.
    static_assert(Q0 == 0 && G == 4, "whole panels");
    using E = Enc<F, false>;
    constexpr int L = 32767 / (E::vmax * 128), H = S / 4;  // H products per lane per sub-block
    static_assert(L >= 1, "int16 products");
    int16x8_t h[MR][8];
    int32x4_t w[MR][8];
    LOWBIT_UNROLL
    for (int t = 0; t < S / 16; ++t) {
      int8x16_t x[MR];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) x[m] = vld1q_s8(a[m] + k0 + 16 * t);
      LOWBIT_UNROLL
      for (int st = 0; st < 2; ++st) {
        int8x16_t a4[MR][2];
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m)
          LOWBIT_UNROLL
          for (int hs = 0; hs < 2; ++hs) a4[m][hs] = lane4(x[m], 2 * st + hs);
        if (stream) stream_ahead<F, 1>(g, p, k0 / 8 + 2 * t + st);
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q) {
          int8x16_t v[2];
          values<F, false>(g, p, k0 / 8 + 2 * t + st, q, v[0], v[1]);
          LOWBIT_UNROLL
          for (int hs = 0; hs < 2; ++hs) {
            const int n = 4 * t + 2 * st + hs;  // this product's place in the lanes' chains
            LOWBIT_UNROLL
            for (int m = 0; m < MR; ++m) {
              if (n % L == 0) {
                h[m][2 * q] = vmull_s8(vget_low_s8(v[hs]), vget_low_s8(a4[m][hs]));
                h[m][2 * q + 1] = vmull_high_s8(v[hs], a4[m][hs]);
              } else {
                h[m][2 * q] = vmlal_s8(h[m][2 * q], vget_low_s8(v[hs]), vget_low_s8(a4[m][hs]));
                h[m][2 * q + 1] = vmlal_high_s8(h[m][2 * q + 1], v[hs], a4[m][hs]);
              }
              if (n % L == L - 1 || n == H - 1)
                LOWBIT_UNROLL
                for (int i = 2 * q; i < 2 * q + 2; ++i)
                  w[m][i] = n < L ? vpaddlq_s16(h[m][i]) : vpadalq_s16(w[m][i], h[m][i]);
            }
          }
        }
      }
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) res[m][q] = vpaddq_s32(w[m][2 * q], w[m][2 * q + 1]);
  }
}

// One file block's float scales for panel p's 16 rows (4 lanes each): d (or 2^(e - 128)) and dm.
template <int F, int Q0 = 0, int G = 4>
inline void block_scales(const BlkArgs* g, int64_t p, int64_t b, float32x4_t d[4],
                         float32x4_t dm[4]) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  const int64_t at = (p * (g->K / fmt.block) + b) * kPanel;
  if constexpr (fmt.scale == ScaleKind::E8M0) {  // ggml_e8m0_to_fp32_half
    const uint8x16_t e8 = vld1q_u8((const uint8_t*)g->d + at);
    const uint16x8_t e16[2] = {vmovl_u8(vget_low_u8(e8)), vmovl_high_u8(e8)};
    LOWBIT_UNROLL
    for (int q = Q0; q < Q0 + G; ++q) {
      const uint32x4_t e =
          q % 2 ? vmovl_high_u16(e16[q / 2]) : vmovl_u16(vget_low_u16(e16[q / 2]));
      const uint32x4_t normal = vshlq_n_u32(vsubq_u32(e, vdupq_n_u32(1)), 23);
      const uint32x4_t tiny = vshlq_u32(vdupq_n_u32(0x00200000), vreinterpretq_s32_u32(e));
      d[q] = vreinterpretq_f32_u32(vbslq_u32(vcltq_u32(e, vdupq_n_u32(2)), tiny, normal));
    }
  } else {
    const uint16_t* h = (const uint16_t*)g->d + at;
    LOWBIT_UNROLL
    for (int q = Q0; q < Q0 + G; ++q)
      d[q] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + 4 * q)));
  }
  if constexpr (fmt.min != MinKind::None) {
    LOWBIT_UNROLL
    for (int q = Q0; q < Q0 + G; ++q)
      dm[q] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(g->dm + at + 4 * q)));
  }
}

// Sub-block s's D and, for formats with minima, X: B = X (MinKind::Half) or B = -X (Code).
template <int F, int Q0 = 0, int G = 4>
inline void sub_scales(const BlkArgs* g, int64_t p, int64_t s, const float32x4_t d[4],
                       const float32x4_t dm[4], float32x4_t D[4], float32x4_t X[4]) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  const int64_t at = (p * (g->K / fmt.sub) + s) * kPanel;
  // scale codes as unsigned bytes: int8 codes + 128, Q2_K's two nibbles apart
  uint8x16_t sc = vdupq_n_u8(0), mc = vdupq_n_u8(0);
  if constexpr (fmt.scale == ScaleKind::Code) sc = vld1q_u8((const uint8_t*)g->sc + at);
  if constexpr (fmt.pair4) {
    mc = vshrq_n_u8(sc, 4);
    sc = vandq_u8(sc, vdupq_n_u8(0x0F));
  } else {
    sc = veorq_u8(sc, vdupq_n_u8(0x80));
    if constexpr (fmt.min == MinKind::Code) mc = vld1q_u8(g->mc + at);
  }
  const float32x4_t sc_bias = vdupq_n_f32(fmt.pair4 ? 8388608.f : 8388736.f);
  const float32x4_t mc_bias = vdupq_n_f32(8388608.f);
  LOWBIT_UNROLL
  for (int q = Q0; q < Q0 + G; ++q) {
    const uint8x16_t rows = vld1q_u8(kRowsF[q]);
    D[q] = fmt.scale == ScaleKind::Code ? vmulq_f32(d[q], bytes_to_f32(sc, rows, sc_bias)) : d[q];
    if (fmt.min == MinKind::Half) X[q] = dm[q];
    if (fmt.min == MinKind::Code) X[q] = vmulq_f32(dm[q], bytes_to_f32(mc, rows, mc_bias));
  }
}

template <int Q0 = 0, int G = 4>
inline void store(const BlkArgs* g, int64_t m, int64_t p, const float32x4_t f[4]) {
  const int64_t n0 = p * kPanel, left = g->N - n0;
  float* c = g->c + m * g->ldc + n0;
  LOWBIT_UNROLL
  for (int q = Q0; q < Q0 + G; ++q) {
    if (left >= 4 * q + 4) {
      vst1q_f32(c + 4 * q, g->bias ? vaddq_f32(f[q], vld1q_f32(g->bias + n0 + 4 * q)) : f[q]);
    } else if (left > 4 * q) {
      float t[4];
      vst1q_f32(t, f[q]);
      for (int64_t l = 0; l < left - 4 * q; ++l)
        c[4 * q + l] = g->bias ? t[l] + g->bias[n0 + 4 * q + l] : t[l];
    }
  }
}

// Rows 4q .. 4q+3 of 16 signed bytes, as int32.
inline int32x4_t rows_s32(int8x16_t v, int q) {
  const int16x8_t h = q < 2 ? vmovl_s8(vget_low_s8(v)) : vmovl_high_s8(v);
  return q % 2 ? vmovl_high_s16(h) : vmovl_s16(vget_low_s16(h));
}

// code_dot formats, sub-block s (16 inputs): i_s = sgn * res + fix * asum_s is exact; the
// 32-block's sums gather code_s * i_s and mcode_s * asum_s, and its second sub-block folds them
// with the block's activation scale (gemm_blk/ref.cpp).
template <int F, typename E, int MR, int Q0, int G>
inline void code_dot_step(const BlkArgs* g, int64_t p, int64_t m0, int64_t s, const int32x4_t res[][4],
                          int32x4_t ib[][4], int32x4_t mb[][4], float32x4_t gs[][4], float32x4_t hs[][4]) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  static_assert(fmt.sub == 16 && (fmt.min == MinKind::None || fmt.pair4), "code_dot: formats.h");
  const int8x16_t raw = vld1q_s8(g->sc + (p * (g->K / 16) + s) * kPanel);
  const int8x16_t sc = fmt.pair4 ? vandq_s8(raw, vdupq_n_s8(0x0F)) : raw;
  const int8x16_t mc = vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(raw), 4));
  const bool first = s % 2 == 0;
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  LOWBIT_UNROLL
  for (int q = Q0; q < Q0 + G; ++q) {
    const int32x4_t code = rows_s32(sc, q), mcode = rows_s32(mc, q);
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      const int32_t asum = g->asum[(m0 + m) * n16 + s];
      const int32x4_t fix = vdupq_n_s32(E::fix * asum);
      const int32x4_t i = E::sgn < 0 ? vsubq_s32(fix, res[m][q]) : vaddq_s32(res[m][q], fix);
      ib[m][q] = first ? vmulq_s32(code, i) : vmlaq_s32(ib[m][q], code, i);
      if (fmt.min != MinKind::None)
        mb[m][q] = first ? vmulq_n_s32(mcode, asum) : vmlaq_n_s32(mb[m][q], mcode, asum);
    }
  }
  if (first) return;
  // |i_b| < 2^22 (32 x 128 x 127): to float as 1.5 * 2^23 + i less 1.5 * 2^23, both exact
  const int32x4_t bias = vdupq_n_s32(0x4B400000);
  const float32x4_t magic = vdupq_n_f32(12582912.f);
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    const float sb = g->ablock[(m0 + m) * n32 + s * 16 / kActBlock];
    LOWBIT_UNROLL
    for (int q = Q0; q < Q0 + G; ++q) {
      const float32x4_t fi = vsubq_f32(vreinterpretq_f32_s32(vaddq_s32(ib[m][q], bias)), magic);
      gs[m][q] = vfmaq_n_f32(gs[m][q], fi, sb);
      if (fmt.min != MinKind::None) {
        const float32x4_t fm = vsubq_f32(vreinterpretq_f32_s32(vaddq_s32(mb[m][q], bias)), magic);
        hs[m][q] = vfmaq_n_f32(hs[m][q], fm, sb);
      }
    }
  }
}

// MR rows x row groups [Q0, Q0 + G) of panel p.
template <int F, int MR, Dot D, int Q0 = 0, int G = 4>
void tile_a8(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub, H = kActBlock / S;  // sub-blocks per activation block
  static_assert(fmt.code_dot || H == 1 || fmt.min == MinKind::None, "minima fold per 32-input sub-block");
  using E = Enc<F, fmt.bits == 8 && (D == kMmla || (D == kSdot && kI8mm))>;
  const int64_t n16 = g->K / 16, n32 = g->K / kActBlock;
  const int8_t* a[MR];
  float32x4_t f[MR][4];
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    a[m] = (const int8_t*)g->a + (m0 + m) * g->lda;
    LOWBIT_UNROLL
    for (int q = Q0; q < Q0 + G; ++q) f[m][q] = vdupq_n_f32(0.f);
  }
  // one row keeps a block's converted d / dmin in registers; several need those for accumulators
  constexpr bool hold = MR == 1;
  for (int64_t b = 0; b < g->K / fmt.block; ++b) {
    float32x4_t d[4], dm[4];
    if (hold) block_scales<F, Q0, G>(g, p, b, d, dm);
    int32x4_t ib[MR][4], mb[MR][4];  // code_dot: the 32-block's exact sums, the file block's folds
    float32x4_t gs[MR][4], hs[MR][4];
    float32x4_t t[MR][4];  // H > 1: the activation block's sum of D_s * i_s
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int q = Q0; q < Q0 + G; ++q) gs[m][q] = hs[m][q] = vdupq_n_f32(0.f);
    for (int64_t s = b * (fmt.block / S); s < (b + 1) * (fmt.block / S); ++s) {
      const int64_t k0 = s * S;
      int32x4_t res[MR][4];
      dots<F, MR, D, Q0, G>(g, p, a, k0, res, MR == 1 || m0 == 0);
      if constexpr (fmt.code_dot) {
        code_dot_step<F, E, MR, Q0, G>(g, p, m0, s, res, ib, mb, gs, hs);
        continue;
      }
      float32x4_t Dv[4], X[4];
      const int h = (int)(s % H);
      if (!hold) block_scales<F, Q0, G>(g, p, b, d, dm);
      sub_scales<F, Q0, G>(g, p, s, d, dm, Dv, X);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const float sb = g->ablock[(m0 + m) * n32 + k0 / kActBlock];
        const int32_t* as = g->asum + (m0 + m) * n16 + k0 / 16;
        const int32_t asum = S == 16 ? as[0] : as[0] + as[1];
        const float32x4_t sba = vdupq_n_f32(sb * (float)asum);
        // i = sgn * res + fix * asum (|i| < 2^21: |asum| <= 32 * 128) to float without SCVTF:
        // the bits of 1.5 * 2^23 + i, less 1.5 * 2^23, both exact
        const int32x4_t fix = vdupq_n_s32(E::fix * asum + 0x4B400000);
        const float32x4_t magic = vdupq_n_f32(12582912.f);
        LOWBIT_UNROLL
        for (int q = Q0; q < Q0 + G; ++q) {
          const int32x4_t i =
              E::sgn < 0 ? vsubq_s32(fix, res[m][q]) : vaddq_s32(res[m][q], fix);
          const float32x4_t fi = vsubq_f32(vreinterpretq_f32_s32(i), magic);
          if constexpr (H == 1) {
            if (fmt.min == MinKind::Half) f[m][q] = vfmaq_f32(f[m][q], X[q], sba);
            if (fmt.min == MinKind::Code) f[m][q] = vfmsq_f32(f[m][q], X[q], sba);  // fma(-X, ., f)
            f[m][q] = vfmaq_f32(f[m][q], Dv[q], vmulq_n_f32(fi, sb));
          } else {
            t[m][q] = h ? vfmaq_f32(t[m][q], Dv[q], fi) : vmulq_f32(Dv[q], fi);
            if (h == H - 1) f[m][q] = vfmaq_n_f32(f[m][q], t[m][q], sb);
          }
        }
      }
    }
    if constexpr (fmt.code_dot) {
      if (!hold) block_scales<F, Q0, G>(g, p, b, d, dm);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        LOWBIT_UNROLL
        for (int q = Q0; q < Q0 + G; ++q) {
          if (fmt.min != MinKind::None) f[m][q] = vfmsq_f32(f[m][q], dm[q], hs[m][q]);  // fma(-dm, .)
          f[m][q] = vfmaq_f32(f[m][q], d[q], gs[m][q]);
        }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) store<Q0, G>(g, m0 + m, p, f[m]);
}

template <int F, int MR>
void tile_f32(const BlkArgs* g, int64_t m0, int64_t p) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int S = fmt.sub;
  const int64_t nsub = g->K / S;
  // w = u - offset = v + fix = (2^23 + v) - (2^23 - fix)
  const float32x4_t bias = vdupq_n_f32(8388608.f - (float)Enc<F, true>::fix);
  const float* x[MR];
  float32x4_t f[MR][4];
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    x[m] = (const float*)g->a + (m0 + m) * g->lda;
    LOWBIT_UNROLL
    for (int q = 0; q < 4; ++q) f[m][q] = vdupq_n_f32(0.f);
  }
  // one row keeps a block's converted d / dmin in registers; several need those for accumulators
  constexpr bool hold = MR == 1;
  for (int64_t b = 0; b < g->K / fmt.block; ++b) {
    float32x4_t d[4], dm[4];
    if (hold) block_scales<F>(g, p, b, d, dm);
    for (int64_t s = b * (fmt.block / S); s < (b + 1) * (fmt.block / S); ++s) {
      const int64_t k0 = s * S;
      float32x4_t acc[MR][4];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q) acc[m][q] = vdupq_n_f32(0.f);
      for (int st = 0; st < S / 8; ++st) {
        float32x4_t xv[MR][2];
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m)
          LOWBIT_UNROLL
          for (int hs = 0; hs < 2; ++hs) xv[m][hs] = vld1q_f32(x[m] + k0 + 8 * st + 4 * hs);
        if (MR == 1 || m0 == 0) stream_ahead<F, 1>(g, p, k0 / 8 + st);
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q) {
          int8x16_t v[2];
          values<F, true>(g, p, k0 / 8 + st, q, v[0], v[1]);
          LOWBIT_UNROLL
          for (int i = 0; i < 8; ++i) {  // k0 + 8 st + i, in order for each accumulator
            const float32x4_t w =
                bytes_to_f32(vreinterpretq_u8_s8(v[i / 4]), vld1q_u8(kKF[i % 4]), bias);
            LOWBIT_UNROLL
            for (int m = 0; m < MR; ++m)
              acc[m][q] = fma_lane(acc[m][q], w, xv[m][i / 4], i % 4);
          }
        }
      }
      float32x4_t Dv[4], X[4];
      if (!hold) block_scales<F>(g, p, b, d, dm);
      sub_scales<F>(g, p, s, d, dm, Dv, X);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const float32x4_t xs =
            vdupq_n_f32(fmt.min != MinKind::None ? g->xsum[(m0 + m) * nsub + s] : 0.f);
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (fmt.min == MinKind::Half) f[m][q] = vfmaq_f32(f[m][q], X[q], xs);
          if (fmt.min == MinKind::Code) f[m][q] = vfmsq_f32(f[m][q], X[q], xs);
          f[m][q] = vfmaq_f32(f[m][q], Dv[q], acc[m][q]);
        }
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) store(g, m0 + m, p, f[m]);
}

// Row tiles per set: i8mm SMMLA on 8 rows x half panels, or on 4 or 2 rows (one row: USDOT /
// SDOT); dotprod SDOT on 8 rows x half panels, or on 1 to 4 rows; neon 2 rows, or 1 where the
// int16 chains end inside a sub-block (their int32 sums double the registers); float
// activations 2 rows. A half panel keeps 16 accumulators and uses each value register 8 times.
template <int F, bool A8>
void run(const BlkArgs* g, int64_t p0, int64_t p1) {
  constexpr BlockFormat fmt = kBlockFormats[F];
  constexpr int L = 32767 / (Enc<F, false>::vmax * 128);
  constexpr int neon_mr = L > 1 && L < fmt.sub / 4 ? 1 : 2;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M;) {
      const int64_t left = g->M - m;
      int mr;
      if constexpr (!A8) {
        mr = left >= 2 ? 2 : 1;
        mr == 2 ? tile_f32<F, 2>(g, m, p) : tile_f32<F, 1>(g, m, p);
      } else if constexpr (kI8mm) {
        mr = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (mr == 8) {
          tile_a8<F, 8, kMmla, 0, 2>(g, m, p);
          tile_a8<F, 8, kMmla, 2, 2>(g, m, p);
        } else if (mr >= 2) {
          mr == 4 ? tile_a8<F, 4, kMmla>(g, m, p) : tile_a8<F, 2, kMmla>(g, m, p);
        } else {
          tile_a8<F, 1, kSdot>(g, m, p);
        }
      } else if constexpr (kDotprod) {
        mr = (int)(left < 4 ? left : left < 8 ? 4 : 8);
        switch (mr) {
          case 8:
            tile_a8<F, 8, kSdot, 0, 2>(g, m, p);
            tile_a8<F, 8, kSdot, 2, 2>(g, m, p);
            break;
          case 4: tile_a8<F, 4, kSdot>(g, m, p); break;
          case 3: tile_a8<F, 3, kSdot>(g, m, p); break;
          case 2: tile_a8<F, 2, kSdot>(g, m, p); break;
          default: tile_a8<F, 1, kSdot>(g, m, p);
        }
      } else {
        mr = left >= neon_mr ? neon_mr : 1;
        mr == 2 ? tile_a8<F, neon_mr, kMlal>(g, m, p) : tile_a8<F, 1, kMlal>(g, m, p);
      }
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
