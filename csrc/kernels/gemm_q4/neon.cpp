// INT4 matmuls, NEON (one source for the neon / dotprod / i8mm sets): a 64-byte block is 4
// registers of 4 columns x 4 k; AND 0x0F gives k0..3, USHR 4 gives k4..7. W4A8 per 32-k block:
// SDOT by lane (dotprod), SMMLA on 2 rows x 2 columns x 8 k where ZIP1 / ZIP2 of (low, high) pair
// one column's 8 k (i8mm), or SMULL / SMLAL into int16 (8 products of 15 x 128 fit) then pairwise
// adds (ARMv8.0); SDOT / SMMLA accumulate onto the bits of 1.5 * 2^23, so one FSUB makes the
// block's dot a float. W4A32: TBL / AND / USHR put one k per column in a lane, UCVTF, one FMLA per
// k in k order. Every float step is gemm_q4/ref.cpp's, in its order: bit-identical results.
#include <arm_neon.h>
#include <cstring>
#include "kernels/isa.h"
#include "kernels/stream.h"


namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

// Four float16 values to float32: FCVTL is exact (ARMv8.0), so no dependence on quant/ref.cpp.
inline float32x4_t half4(const uint16_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

// A group's scales d and offsets m (minima, or d * -z) for 4 columns: panel p, quad q (G groups).
struct Scales {
  float32x4_t d, m;
};
inline Scales group_scales(const Q4Args* g, int64_t G, int64_t grp, int64_t p, int q) {
  const int64_t at = (p * G + grp) * kPanel + 4 * q;
  const float32x4_t d = half4(g->scales + at);
  if (g->mins) return {d, half4(g->mins + at)};
  if (!g->zeros) return {d, vmulq_n_f32(d, -8.f)};
  uint32_t z4;
  std::memcpy(&z4, g->zeros + at, 4);
  const uint32x4_t z = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(z4))));
  return {d, vmulq_f32(d, vcvtq_f32_s32(vnegq_s32(vreinterpretq_s32_u32(z))))};
}

// f += fma(d, I, m * A)  (f = the term for the first group); with `direct` (symmetric W4A8,
// kernels.h) f = fma(d, I, f) from 0.
inline float32x4_t fold(Scales s, float32x4_t I, float32x4_t A, float32x4_t f, bool first, bool direct) {
  if (direct) return vfmaq_f32(first ? vdupq_n_f32(0.f) : f, s.d, I);
  const float32x4_t term = vfmaq_f32(vmulq_f32(s.m, A), s.d, I);
  return first ? term : vaddq_f32(f, term);
}

// Symmetric W4A8: a block's dot of q_w - 8 is the dot of q_w less 8 sum(q_a) (kernels.h).
inline int32_t sym_fix(const Q4Args* g, int64_t m, int64_t k0) {
  return g->asum ? -8 * g->asum[m * (g->Kp / kActBlock) + k0 / kActBlock] : 0;
}

// Row m, columns n..n+3 (those below N) = f + bias.
inline void store4(const Q4Args* g, int64_t m, int64_t n, float32x4_t f) {
  const int64_t left = g->N - n;
  float* c = g->c + m * g->ldc + n;
  if (left >= 4) {
    vst1q_f32(c, g->bias ? vaddq_f32(f, vld1q_f32(g->bias + n)) : f);
  } else if (left > 0) {
    float t[4];
    vst1q_f32(t, f);
    for (int64_t i = 0; i < left; ++i) c[i] = g->bias ? t[i] + g->bias[n + i] : t[i];
  }
}

// SDOT / SMMLA accumulators start at the bits of 1.5 * 2^23, so that they hold the float
// 1.5 * 2^23 + dot (a 32-block's |dot| <= 32 * 15 * 128 < 2^22): one FSUB then gives (float)dot
// exactly, where SCVTF is 2 uops on one pipe (N1) or two (V1, V2).
constexpr int32_t kBiasBits = 0x4B400000;
inline float32x4_t unbias(int32x4_t acc) {
  return vsubq_f32(vreinterpretq_f32_s32(acc), vdupq_n_f32(12582912.f));
}
inline float32x4_t to_float(int32x4_t dot) { return vcvtq_f32_s32(dot); }

// Row-layout tiles (MR rows x J panels, 4 quads of 4 columns each) share the float steps.
// I = dot * s_b for a group's first block, else fma(dot, s_b, I); Cvt turns an accumulator into
// (float)dot.
template <int MR, int J, float32x4_t (*Cvt)(int32x4_t)>
inline void block_fold(const Q4Args* g, int64_t m0, int64_t k0, bool first,
                       const int32x4_t (&dot)[MR][J][4], float32x4_t (&I)[MR][J][4]) {
  const int64_t nblocks = g->Kp / kActBlock;
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    const float32x4_t s = vdupq_n_f32(g->ablock[(m0 + m) * nblocks + k0 / kActBlock]);
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j)
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) {
        const float32x4_t t = Cvt(dot[m][j][q]);
        I[m][j][q] = first ? vmulq_f32(t, s) : vfmaq_f32(I[m][j][q], t, s);
      }
  }
}

template <int MR, int J>
inline void group_fold(const Q4Args* g, int64_t G, int64_t m0, int64_t p, int64_t grp,
                       const float32x4_t (&I)[MR][J][4], float32x4_t (&f)[MR][J][4], bool direct) {
  LOWBIT_UNROLL
  for (int j = 0; j < J; ++j)
    LOWBIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const Scales s = group_scales(g, G, grp, p + j, q);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const float32x4_t A = vdupq_n_f32(g->agroup[(m0 + m) * G + grp]);
        f[m][j][q] = fold(s, I[m][j][q], A, f[m][j][q], grp == 0, direct);
      }
    }
}

template <int MR, int J>
inline void store_rows(const Q4Args* g, int64_t m0, int64_t p, const float32x4_t (&f)[MR][J][4]) {
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m)
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j)
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) store4(g, m0 + m, (p + j) * kPanel + 4 * q, f[m][j][q]);
}

// The 4 registers of one 64-byte block, low nibbles (k0..3) and high nibbles (k4..7).
struct Nibbles {
  uint8x16_t lo[4], hi[4];
};
inline Nibbles unpack(const uint8_t* at) {
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  Nibbles w;
  LOWBIT_UNROLL
  for (int q = 0; q < 4; ++q) {
    const uint8x16_t v = vld1q_u8(at + 16 * q);
    w.lo[q] = vandq_u8(v, nib);
    w.hi[q] = vshrq_n_u8(v, 4);
  }
  return w;
}

#if defined(__ARM_FEATURE_DOTPROD)
// W4A8, SDOT: MR rows x J panels; per 8 k and quad, SDOT lane 0 (k0..3) on the low nibbles and
// lane 1 (k4..7) on the high ones, both into the quad's int32 accumulator.
template <int MR, int J>
void tile_a8(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  float32x4_t f[MR][J][4], I[MR][J][4];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (MR == 1 || m0 == 0) group_ahead<J>(g, p, grp, G);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
      int32x4_t acc[MR][J][4];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j)
          LOWBIT_UNROLL
          for (int q = 0; q < 4; ++q) acc[m][j][q] = vdupq_n_s32(kBiasBits + sym_fix(g, m0 + m, k0));
      _Pragma("GCC unroll 1")  // one step's registers at a time (unrolled, GCC hoists and spills)
      for (int s = 0; s < kActBlock / kQ4Step; ++s) {
        int8x8_t x[MR];
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) x[m] = vld1_s8(a + m * g->lda + k0 + kQ4Step * s);
        if (MR == 1 || m0 == 0) stream_ahead<J>(g, p, k0 / kQ4Step + s);
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const uint8_t* at = b + j * ps + (k0 / kQ4Step + s) * 64;
          const Nibbles w = unpack(at);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m)
            LOWBIT_UNROLL
            for (int q = 0; q < 4; ++q) {
              acc[m][j][q] = vdotq_lane_s32(acc[m][j][q], vreinterpretq_s8_u8(w.lo[q]), x[m], 0);
              acc[m][j][q] = vdotq_lane_s32(acc[m][j][q], vreinterpretq_s8_u8(w.hi[q]), x[m], 1);
            }
        }
      }
      block_fold<MR, J, unbias>(g, m0, k0, k0 == grp * g->group, acc, I);
    }
    group_fold<MR, J>(g, G, m0, p, grp, I, f, g->asum != nullptr);
  }
  store_rows<MR, J>(g, m0, p, f);
}
#else
// W4A8, ARMv8.0: per quad, SMULL / SMLAL of 2 columns x 4 k (nibble x s8) into int16 lanes, the
// 8 products of a 32-block per lane at most 8 * 15 * 128 = 15360; then SADDLP and ADDP give the
// quad's 4 int32 column dots, exact.
template <int MR, int J>
void tile_a8(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  float32x4_t f[MR][J][4], I[MR][J][4];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (MR == 1 || m0 == 0) group_ahead<J>(g, p, grp, G);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
      int16x8_t acc[MR][J][4][2];
      LOWBIT_UNROLL
      for (int s = 0; s < kActBlock / kQ4Step; ++s) {
        int8x16_t xlo[MR], xhi[MR];  // the row's k0..3 / k4..7, repeated in every 4 bytes
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {  // DUP by element: from a general register it costs more
          const int32x2_t v = vreinterpret_s32_s8(vld1_s8(a + m * g->lda + k0 + kQ4Step * s));
          xlo[m] = vreinterpretq_s8_s32(vdupq_lane_s32(v, 0));
          xhi[m] = vreinterpretq_s8_s32(vdupq_lane_s32(v, 1));
        }
        if (MR == 1 || m0 == 0) stream_ahead<J>(g, p, k0 / kQ4Step + s);
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j) {
          const uint8_t* at = b + j * ps + (k0 / kQ4Step + s) * 64;
          const Nibbles w = unpack(at);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m)
            LOWBIT_UNROLL
            for (int q = 0; q < 4; ++q) {
              const int8x16_t lo = vreinterpretq_s8_u8(w.lo[q]), hi = vreinterpretq_s8_u8(w.hi[q]);
              int16x8_t* c = acc[m][j][q];
              if (s == 0) {
                c[0] = vmull_s8(vget_low_s8(lo), vget_low_s8(xlo[m]));
                c[1] = vmull_high_s8(lo, xlo[m]);
              } else {
                c[0] = vmlal_s8(c[0], vget_low_s8(lo), vget_low_s8(xlo[m]));
                c[1] = vmlal_high_s8(c[1], lo, xlo[m]);
              }
              c[0] = vmlal_s8(c[0], vget_low_s8(hi), vget_low_s8(xhi[m]));
              c[1] = vmlal_high_s8(c[1], hi, xhi[m]);
            }
        }
      }
      int32x4_t dot[MR][J][4];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        LOWBIT_UNROLL
        for (int j = 0; j < J; ++j)
          LOWBIT_UNROLL
          for (int q = 0; q < 4; ++q)
            dot[m][j][q] = vaddq_s32(vpaddq_s32(vpaddlq_s16(acc[m][j][q][0]), vpaddlq_s16(acc[m][j][q][1])),
                                     vdupq_n_s32(sym_fix(g, m0 + m, k0)));
      block_fold<MR, J, to_float>(g, m0, k0, k0 == grp * g->group, dot, I);
    }
    group_fold<MR, J>(g, G, m0, p, grp, I, f, g->asum != nullptr);
  }
  store_rows<MR, J>(g, m0, p, f);
}
#endif

#if defined(__ARM_FEATURE_MATMUL_INT8)
// W4A8, SMMLA: P row pairs x CQ quads (from quad q0) of panel p. ZIP1 / ZIP2 of a quad's low and
// high registers give columns (c, c+1) and (c+2, c+3) with 8 k each; the activation operand is 8 k
// of row m then of row m+1. Accumulators, I and f stay in that 2 x 2 layout, [m c, m c+1, m+1 c,
// m+1 c+1], with the scales laid out to match; ZIP1 / ZIP2 of 64-bit halves give rows at the store.
template <int P, int CQ>
void tile_mmla(const Q4Args* g, int64_t m0, int64_t p, int q0) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group, nblocks = g->Kp / kActBlock;
  const int8_t* a = (const int8_t*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps + 16 * q0;
  const uint8x16_t nib = vdupq_n_u8(0x0F);
  float32x4_t f[P][CQ][2], I[P][CQ][2];
  const bool stream = m0 == 0 && q0 == 0;  // the tile that reads the panel first (stream.h)
  for (int64_t grp = 0; grp < G; ++grp) {
    if (stream) group_ahead<1>(g, p, grp, G);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
      int32x4_t acc[P][CQ][2];
      LOWBIT_UNROLL
      for (int r = 0; r < P; ++r)
        LOWBIT_UNROLL
        for (int q = 0; q < CQ; ++q) {  // the 2 x 2 layout: row m twice, then row m + 1 twice
          const int32_t f0 = kBiasBits + sym_fix(g, m0 + 2 * r, k0), f1 = kBiasBits + sym_fix(g, m0 + 2 * r + 1, k0);
          acc[r][q][0] = acc[r][q][1] = int32x4_t{f0, f0, f1, f1};
        }
      LOWBIT_UNROLL
      for (int s2 = 0; s2 < kActBlock / 16; ++s2) {
        int8x16_t x[P][2];  // steps 2 * s2 and 2 * s2 + 1
        LOWBIT_UNROLL
        for (int r = 0; r < P; ++r) {
          const int8_t* row = a + 2 * r * g->lda + k0 + 16 * s2;
          const int64x2_t r0 = vreinterpretq_s64_s8(vld1q_s8(row));
          const int64x2_t r1 = vreinterpretq_s64_s8(vld1q_s8(row + g->lda));
          x[r][0] = vreinterpretq_s8_s64(vzip1q_s64(r0, r1));
          x[r][1] = vreinterpretq_s8_s64(vzip2q_s64(r0, r1));
        }
        LOWBIT_UNROLL
        for (int t = 0; t < 2; ++t) {
          if (stream) stream_ahead<1>(g, p, k0 / kQ4Step + 2 * s2 + t);
          LOWBIT_UNROLL
          for (int q = 0; q < CQ; ++q) {
            const uint8x16_t v = vld1q_u8(b + (k0 / kQ4Step + 2 * s2 + t) * 64 + 16 * q);
            const int32x4_t lo = vreinterpretq_s32_u8(vandq_u8(v, nib));
            const int32x4_t hi = vreinterpretq_s32_u8(vshrq_n_u8(v, 4));
            const int8x16_t w01 = vreinterpretq_s8_s32(vzip1q_s32(lo, hi));
            const int8x16_t w23 = vreinterpretq_s8_s32(vzip2q_s32(lo, hi));
            LOWBIT_UNROLL
            for (int r = 0; r < P; ++r) {
              acc[r][q][0] = vmmlaq_s32(acc[r][q][0], x[r][t], w01);
              acc[r][q][1] = vmmlaq_s32(acc[r][q][1], x[r][t], w23);
            }
          }
        }
      }
      const bool first = k0 == grp * g->group;
      LOWBIT_UNROLL
      for (int r = 0; r < P; ++r) {
        const float* sb = g->ablock + (m0 + 2 * r) * nblocks + k0 / kActBlock;
        const float32x4_t s = {sb[0], sb[0], sb[nblocks], sb[nblocks]};
        LOWBIT_UNROLL
        for (int q = 0; q < CQ; ++q)
          LOWBIT_UNROLL
          for (int h = 0; h < 2; ++h) {
            const float32x4_t t = unbias(acc[r][q][h]);
            I[r][q][h] = first ? vmulq_f32(t, s) : vfmaq_f32(I[r][q][h], t, s);
          }
      }
    }
    LOWBIT_UNROLL
    for (int q = 0; q < CQ; ++q) {
      const Scales s = group_scales(g, G, grp, p, q0 + q);
      const Scales pair[2] = {{vcombine_f32(vget_low_f32(s.d), vget_low_f32(s.d)),
                               vcombine_f32(vget_low_f32(s.m), vget_low_f32(s.m))},
                              {vcombine_f32(vget_high_f32(s.d), vget_high_f32(s.d)),
                               vcombine_f32(vget_high_f32(s.m), vget_high_f32(s.m))}};
      LOWBIT_UNROLL
      for (int r = 0; r < P; ++r) {
        const float* ag = g->agroup + (m0 + 2 * r) * G + grp;
        const float32x4_t A = {ag[0], ag[0], ag[G], ag[G]};
        LOWBIT_UNROLL
        for (int h = 0; h < 2; ++h) f[r][q][h] = fold(pair[h], I[r][q][h], A, f[r][q][h], grp == 0, g->asum != nullptr);
      }
    }
  }
  LOWBIT_UNROLL
  for (int r = 0; r < P; ++r)
    LOWBIT_UNROLL
    for (int q = 0; q < CQ; ++q) {
      const float64x2_t v0 = vreinterpretq_f64_f32(f[r][q][0]);
      const float64x2_t v1 = vreinterpretq_f64_f32(f[r][q][1]);
      const int64_t n = p * kPanel + 4 * (q0 + q);
      store4(g, m0 + 2 * r, n, vreinterpretq_f32_f64(vzip1q_f64(v0, v1)));
      store4(g, m0 + 2 * r + 1, n, vreinterpretq_f32_f64(vzip2q_f64(v0, v1)));
    }
}
#endif

// W4A32: per 8 k and quad, lane c of `pick(i)` holds column c's k0+i: byte i of its 32-bit lane in
// the low (i < 4) or high nibble register, isolated by AND (byte 0), TBL (bytes 1, 2) or USHR
// (byte 3), then UCVTF; one FMLA by element per k, in k order, for each of MR rows x J panels.
template <int MR, int J>
void tile_f32(const Q4Args* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kQ4Step, G = g->Kp / g->group;
  const float* x = (const float*)g->a + m0 * g->lda;
  const uint8_t* b = g->b + p * ps;
  static const uint8_t kByte[2][16] = {
      {1, 255, 255, 255, 5, 255, 255, 255, 9, 255, 255, 255, 13, 255, 255, 255},
      {2, 255, 255, 255, 6, 255, 255, 255, 10, 255, 255, 255, 14, 255, 255, 255}};
  const uint8x16_t byte1 = vld1q_u8(kByte[0]), byte2 = vld1q_u8(kByte[1]);
  const uint32x4_t byte0 = vdupq_n_u32(0xFF);
  float32x4_t f[MR][J][4], S[MR][J][4];
  for (int64_t grp = 0; grp < G; ++grp) {
    if (MR == 1 || m0 == 0) group_ahead<J>(g, p, grp, G);
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j)
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q) S[m][j][q] = vdupq_n_f32(0.f);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kQ4Step) {
      float32x4_t xv[MR][2];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        xv[m][0] = vld1q_f32(x + m * g->lda + k0);
        xv[m][1] = vld1q_f32(x + m * g->lda + k0 + 4);
      }
      if (MR == 1 || m0 == 0) stream_ahead<J>(g, p, k0 / kQ4Step);
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) {
        const uint8_t* at = b + j * ps + k0 / kQ4Step * 64;
        const Nibbles w = unpack(at);
        LOWBIT_UNROLL
        for (int q = 0; q < 4; ++q)
          LOWBIT_UNROLL
          for (int i = 0; i < kQ4Step; ++i) {
            const uint8x16_t v = i < 4 ? w.lo[q] : w.hi[q];
            const uint32x4_t u = i % 4 == 0   ? vandq_u32(vreinterpretq_u32_u8(v), byte0)
                                 : i % 4 == 1 ? vreinterpretq_u32_u8(vqtbl1q_u8(v, byte1))
                                 : i % 4 == 2 ? vreinterpretq_u32_u8(vqtbl1q_u8(v, byte2))
                                              : vshrq_n_u32(vreinterpretq_u32_u8(v), 24);
            const float32x4_t wf = vcvtq_f32_u32(u);
            LOWBIT_UNROLL
            for (int m = 0; m < MR; ++m) {
              const float32x4_t xm = xv[m][i / 4];
              float32x4_t& acc = S[m][j][q];
              switch (i % 4) {  // the lane must be a constant
                case 0: acc = vfmaq_laneq_f32(acc, wf, xm, 0); break;
                case 1: acc = vfmaq_laneq_f32(acc, wf, xm, 1); break;
                case 2: acc = vfmaq_laneq_f32(acc, wf, xm, 2); break;
                default: acc = vfmaq_laneq_f32(acc, wf, xm, 3); break;
              }
            }
          }
      }
    }
    group_fold<MR, J>(g, G, m0, p, grp, S, f, false);
  }
  store_rows<MR, J>(g, m0, p, f);
}

using TileFn = void (*)(const Q4Args*, int64_t, int64_t);

// M = 1 (decode GEMV): J panels at once, J independent weight streams and 4 * J accumulator chains.
template <bool A8>
void gemv(const Q4Args* g, int64_t p0, int64_t p1) {
#if defined(__ARM_FEATURE_DOTPROD)
  static const TileFn tiles[] = {A8 ? tile_a8<1, 1> : tile_f32<1, 1>,
                                 A8 ? tile_a8<1, 2> : tile_f32<1, 2>,
                                 A8 ? tile_a8<1, 3> : tile_f32<1, 3>,
                                 A8 ? tile_a8<1, 4> : tile_f32<1, 4>};
  constexpr int64_t kJ = 4;
#else  // the int16 accumulators of the SMULL tile take 8 registers per panel: W4A8 stops at 2
  static const TileFn tiles[] = {A8 ? tile_a8<1, 1> : tile_f32<1, 1>,
                                 A8 ? tile_a8<1, 2> : tile_f32<1, 2>,
                                 tile_f32<1, 3>, tile_f32<1, 4>};
  constexpr int64_t kJ = A8 ? 2 : 4;
#endif
  for (int64_t p = p0; p < p1; p += kJ) tiles[(p1 - p < kJ ? p1 - p : kJ) - 1](g, 0, p);
}

// Several rows: one panel at a time, rows in tiles that share each unpacked weight register.
void gemm_f32(const Q4Args* g, int64_t p0, int64_t p1) {
  static const TileFn rows[] = {tile_f32<1, 1>, tile_f32<2, 1>, tile_f32<3, 1>, tile_f32<4, 1>};
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M; m += 4) rows[(g->M - m < 4 ? g->M - m : 4) - 1](g, m, p);
}

void gemm_a8(const Q4Args* g, int64_t p0, int64_t p1) {
#if defined(__ARM_FEATURE_MATMUL_INT8)
  // Row pairs by SMMLA, 4 pairs x 8 columns or 2 x 16 (16 accumulators); a last odd row by SDOT.
  for (int64_t p = p0; p < p1; ++p) {
    const bool right_half = p * kPanel + 8 < g->N;  // columns 8..15 hold something to store
    int64_t m = 0;
    for (; g->M - m >= 8; m += 8) {
      tile_mmla<4, 2>(g, m, p, 0);
      if (right_half) tile_mmla<4, 2>(g, m, p, 2);
    }
    if (g->M - m >= 6) {
      tile_mmla<3, 2>(g, m, p, 0);
      if (right_half) tile_mmla<3, 2>(g, m, p, 2);
      m += 6;
    }
    if (g->M - m >= 4) tile_mmla<2, 4>(g, m, p, 0), m += 4;
    if (g->M - m >= 2) tile_mmla<1, 4>(g, m, p, 0), m += 2;
    if (m < g->M) tile_a8<1, 1>(g, m, p);
  }
#elif defined(__ARM_FEATURE_DOTPROD)
  static const TileFn rows[] = {tile_a8<1, 1>, tile_a8<2, 1>, tile_a8<3, 1>, tile_a8<4, 1>};
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M; m += 4) rows[(g->M - m < 4 ? g->M - m : 4) - 1](g, m, p);
#else
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t m = 0; m < g->M; m += 2) (g->M - m >= 2 ? tile_a8<2, 1> : tile_a8<1, 1>)(g, m, p);
#endif
}

}  // namespace

void gemm_q4a8(const Q4Args* g, int64_t p0, int64_t p1) {
  g->M == 1 ? gemv<true>(g, p0, p1) : gemm_a8(g, p0, p1);
}
void gemm_q4f32(const Q4Args* g, int64_t p0, int64_t p1) {
  g->M == 1 ? gemv<false>(g, p0, p1) : gemm_f32(g, p0, p1);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
