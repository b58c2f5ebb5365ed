// INT8 GEMM, AArch64 (one source for the neon / dotprod / i8mm sets): u8 activations x s8 packed
// weights (kernels.h layout). A block of kMc rows x kKc k is first copied to the stack flipped back
// to s8 (XOR 0x80), so every set multiplies signed bytes and needs no compensation: each int32 dot
// is ref's exact (wrapping) sum. Blocks: kJ panels x kMc rows x kKc k, int32 sums kept across k.
//   dotprod: SDOT by lane, a 64-byte block = 4 registers of 4 columns x 4 k; tile 4 rows x 16.
//   i8mm:    SMMLA, 2 rows x 8 k by 2 columns x 8 k: rows copied pair-interleaved, column pairs
//            from two 4-k blocks zipped (ZIP1/ZIP2 .4s, into a stack copy when > 8 rows reuse it);
//            tile 8 rows x 8 columns. A lone row uses the SDOT tile.
//   neon:    SMULL, plus SMLAL of the next 4 k when no activation of the block is -128 (then no
//            int16 pair can reach 2^15), then SADALP into int32 column halves; tile 2 rows x 16.
#include <arm_neon.h>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

constexpr int64_t kKc = 256;             // k per block (a multiple of 16)
constexpr int64_t kMc = 48;              // rows per block (a multiple of 8)
constexpr int kJ = 4;                    // panels per block
constexpr int64_t kLd = kJ * kPanel;     // row stride of the int32 / float block buffers

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

// 16 activation bytes from k on (`left` valid ones; the rest read as 128, i.e. zero), as s8.
inline uint8x16_t load16(const uint8_t* src, int64_t left) {
  if (left >= 16) return vld1q_u8(src);
  uint8_t t[16];
  std::memset(t, 128, sizeof t);
  std::memcpy(t, src, (size_t)left);
  return vld1q_u8(t);
}

// Rows [0, rows) x k [0, len) as s8 rows kKc apart, zero-padded to a multiple of 16. Returns
// whether some activation is -128 (u8 0).
bool pack_rows(const uint8_t* a, int64_t lda, int64_t rows, int64_t len, int8_t* dst) {
  const uint8x16_t flip = vdupq_n_u8(0x80);
  uint8x16_t low = vdupq_n_u8(0xFF);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < len; k += 16) {
      const uint8x16_t v = load16(a + r * lda + k, len - k);
      low = vminq_u8(low, v);
      vst1q_s8(dst + r * kKc + k, vreinterpretq_s8_u8(veorq_u8(v, flip)));
    }
  return vminvq_u8(low) == 0;
}

#ifdef __ARM_FEATURE_DOTPROD
// SDOT tile: rows [0, MR) x J panels over `steps` 4-k steps; row m, panel j at out + m*kLd + 16j.
// Two k-steps per activation load (8 bytes, SDOT by lane 0 / 1): 16 sums, 8 weight registers and
// MR activations stay within the 32 registers (a 16-byte load for 4 steps makes GCC keep 16
// weight registers live and spill).
template <int L, int MR, int J>
inline void sdot_step(int32x4_t (&acc)[MR][J][4], const int8x8_t (&av)[MR], const int8_t* b,
                      int64_t ps) {
  LOWBIT_UNROLL
  for (int j = 0; j < J; ++j) {
    int8x16_t w[4];
    LOWBIT_UNROLL
    for (int q = 0; q < 4; ++q) w[q] = vld1q_s8(b + j * ps + L * 64 + 16 * q);
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) acc[m][j][q] = vdotq_lane_s32(acc[m][j][q], w[q], av[m], L);
    }
  }
}

template <int MR, int J>
__attribute__((noinline)) void sdot_tile(const int8_t* ap, const int8_t* b, int64_t ps,
                                         int64_t steps, int32_t* out, bool accum) {
  int32x4_t acc[MR][J][4];
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) {
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q)
        acc[m][j][q] = accum ? vld1q_s32(out + m * kLd + 16 * j + 4 * q) : vdupq_n_s32(0);
    }
  }
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    int8x8_t av[MR];
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) av[m] = vld1_s8(ap + m * kKc + 4 * s);
    sdot_step<0>(acc, av, b + s * 64, ps);
    sdot_step<1>(acc, av, b + s * 64, ps);
  }
  if (s < steps) {  // an odd last step (the activation rows are zero-padded to 16 bytes)
    int8x8_t av[MR];
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) av[m] = vld1_s8(ap + m * kKc + 4 * s);
    sdot_step<0>(acc, av, b + s * 64, ps);
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) {
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) vst1q_s32(out + m * kLd + 16 * j + 4 * q, acc[m][j][q]);
    }
  }
}

// MR rows x J panels in SDOT tiles: one row streams 4 panels at once, two rows 2, more rows 1.
template <int MR>
void sdot_rows(const int8_t* ap, const int8_t* b, int64_t ps, int J, int64_t steps, int32_t* out,
               bool accum) {
  constexpr int JT = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  int j = 0;
  for (; j + JT <= J; j += JT) sdot_tile<MR, JT>(ap, b + j * ps, ps, steps, out + 16 * j, accum);
  for (; j < J; ++j) sdot_tile<MR, 1>(ap, b + j * ps, ps, steps, out + 16 * j, accum);
}

void sdot_block(const int8_t* ap, int64_t rows, const int8_t* b, int64_t ps, int J, int64_t steps,
                int32_t* acc, bool accum) {
  for (int64_t m = 0; m < rows; m += 4) {
    const int8_t* am = ap + m * kKc;
    int32_t* o = acc + m * kLd;
    switch (rows - m < 4 ? rows - m : 4) {
      case 1: sdot_rows<1>(am, b, ps, J, steps, o, accum); break;
      case 2: sdot_rows<2>(am, b, ps, J, steps, o, accum); break;
      case 3: sdot_rows<3>(am, b, ps, J, steps, o, accum); break;
      default: sdot_rows<4>(am, b, ps, J, steps, o, accum); break;
    }
  }
}
#endif  // __ARM_FEATURE_DOTPROD

#ifdef __ARM_FEATURE_MATMUL_INT8
// Rows as pairs: pair p's 8-k step t at dst + 2*kKc*p + 16t holds row 2p's 8 bytes, then row
// 2p+1's (zeros past the last row); k zero-padded to a multiple of 16.
void pack_pairs(const uint8_t* a, int64_t lda, int64_t rows, int64_t len, int8_t* dst) {
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const uint8_t* r0 = a + 2 * p * lda;
    const bool two = 2 * p + 1 < rows;
    int8_t* d = dst + 2 * kKc * p;
    for (int64_t k = 0; k < len; k += 16) {
      const int64x2_t x0 = vreinterpretq_s64_u8(veorq_u8(load16(r0 + k, len - k), flip));
      const int64x2_t x1 = two ? vreinterpretq_s64_u8(veorq_u8(load16(r0 + lda + k, len - k), flip))
                               : vdupq_n_s64(0);
      vst1q_s8(d + 2 * k, vreinterpretq_s8_s64(vzip1q_s64(x0, x1)));
      vst1q_s8(d + 2 * k + 16, vreinterpretq_s8_s64(vzip2q_s64(x0, x1)));
    }
  }
}

// The SMMLA column pairs of one 8-k step t of a panel (b: its first 64-byte block) for columns
// [8h, 8h + 8): pair c = columns 8h + 2c, 8h + 2c + 1, 8 k each (the second 4 k zero when
// `second` is false: a step past the end of the range).
inline void zip_pairs(const int8_t* b, int64_t t, int h, bool second, int8x16_t (&w)[4]) {
  const int8_t* b0 = b + 2 * t * 64 + 32 * h;
  LOWBIT_UNROLL
  for (int i = 0; i < 2; ++i) {
    const int32x4_t x = vreinterpretq_s32_s8(vld1q_s8(b0 + 16 * i));
    const int32x4_t y = second ? vreinterpretq_s32_s8(vld1q_s8(b0 + 64 + 16 * i)) : vdupq_n_s32(0);
    w[2 * i] = vreinterpretq_s8_s32(vzip1q_s32(x, y));
    w[2 * i + 1] = vreinterpretq_s8_s32(vzip2q_s32(x, y));
  }
}

// J panels' column pairs for `steps` 4-k steps: panel j's 8-k step t at dst + 128 * (j*kKc/8 + t),
// pairs of columns (0,1), (2,3), ... (14,15) in order.
void pack_cols(const int8_t* b, int64_t ps, int J, int64_t steps, int8_t* dst) {
  for (int j = 0; j < J; ++j)
    for (int64_t t = 0; 2 * t < steps; ++t) {
      int8_t* d = dst + 128 * (j * (kKc / 8) + t);
      for (int h = 0; h < 2; ++h) {
        int8x16_t w[4];
        zip_pairs(b + j * ps, t, h, 2 * t + 1 < steps, w);
        for (int c = 0; c < 4; ++c) vst1q_s8(d + 64 * h + 16 * c, w[c]);
      }
    }
}

// SMMLA tile: rows [0, 2P) x columns [8h, 8h + 8) of one panel over `steps` 4-k steps. ap: packed
// pairs; b: the panel's blocks (RAW, zipped here) or its pack_cols copy. out: row 0, column 0.
template <int P, bool RAW>
__attribute__((noinline)) void mmla_tile(const int8_t* ap, const int8_t* b, int64_t steps, int h,
                                         int32_t* out, bool accum) {
  int32x4_t acc[P][4];  // [r0c0 r0c1 r1c0 r1c1] of rows 2p, 2p+1 and columns 8h + 2c, +1
  int32_t* o = out + 8 * h;
  LOWBIT_UNROLL
  for (int p = 0; p < P; ++p) {
    LOWBIT_UNROLL
    for (int c = 0; c < 4; ++c)
      acc[p][c] = accum ? vcombine_s32(vld1_s32(o + 2 * p * kLd + 2 * c),
                                       vld1_s32(o + (2 * p + 1) * kLd + 2 * c))
                        : vdupq_n_s32(0);
  }
  const int64_t full = steps / 2, T = (steps + 1) / 2;
  for (int64_t t = 0; t < T; ++t) {
    int8x16_t w[4];
    if (RAW) {
      zip_pairs(b, t, h, t < full, w);
    } else {
      LOWBIT_UNROLL
      for (int c = 0; c < 4; ++c) w[c] = vld1q_s8(b + 128 * t + 64 * h + 16 * c);
    }
    LOWBIT_UNROLL
    for (int p = 0; p < P; ++p) {
      const int8x16_t av = vld1q_s8(ap + 2 * kKc * p + 16 * t);
      LOWBIT_UNROLL
      for (int c = 0; c < 4; ++c) acc[p][c] = vmmlaq_s32(acc[p][c], av, w[c]);
    }
  }
  LOWBIT_UNROLL
  for (int p = 0; p < P; ++p) {
    LOWBIT_UNROLL
    for (int c = 0; c < 4; ++c) {
      vst1_s32(o + 2 * p * kLd + 2 * c, vget_low_s32(acc[p][c]));
      vst1_s32(o + (2 * p + 1) * kLd + 2 * c, vget_high_s32(acc[p][c]));
    }
  }
}

template <bool RAW>
void mmla_block(const int8_t* ap, int64_t rows, const int8_t* b, int64_t ps, int J, int64_t steps,
                int32_t* acc, bool accum) {
  for (int64_t m = 0; m < rows; m += 8) {
    const int8_t* am = ap + m * kKc;  // pair m/2
    const int P = (int)((rows - m + 1) / 2 < 4 ? (rows - m + 1) / 2 : 4);
    for (int j = 0; j < J; ++j) {
      const int8_t* bj = RAW ? b + j * ps : b + 128 * j * (kKc / 8);
      int32_t* o = acc + m * kLd + 16 * j;
      for (int h = 0; h < 2; ++h) switch (P) {
          case 1: mmla_tile<1, RAW>(am, bj, steps, h, o, accum); break;
          case 2: mmla_tile<2, RAW>(am, bj, steps, h, o, accum); break;
          case 3: mmla_tile<3, RAW>(am, bj, steps, h, o, accum); break;
          default: mmla_tile<4, RAW>(am, bj, steps, h, o, accum); break;
        }
    }
  }
}
#endif  // __ARM_FEATURE_MATMUL_INT8

#ifndef __ARM_FEATURE_DOTPROD
// Widening tile: rows [0, MR) x one panel. Per 4 columns two int32 accumulators hold each column's
// sum as two lanes ([c0 c0 c1 c1], [c2 c2 c3 c3]); ADDP joins them at the end.
template <int MR, bool PAIR>
__attribute__((noinline)) void mull_tile(const int8_t* ap, const int8_t* b,
                                                              int64_t steps, int32_t* out,
                                                              bool accum) {
  int32x4_t acc[MR][8];
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    LOWBIT_UNROLL
    for (int i = 0; i < 8; ++i) acc[m][i] = vdupq_n_s32(0);
  }
  int64_t s = 0;
  if (PAIR)
    for (; s + 2 <= steps; s += 2) {  // two products per int16 lane (k and k + 4)
      int8x16_t x0[MR], x1[MR];
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const int32x2_t a8 = vreinterpret_s32_s8(vld1_s8(ap + m * kKc + 4 * s));
        x0[m] = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 0));
        x1[m] = vreinterpretq_s8_s32(vdupq_lane_s32(a8, 1));
      }
      LOWBIT_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int8x16_t w0 = vld1q_s8(b + s * 64 + 16 * q), w1 = vld1q_s8(b + s * 64 + 64 + 16 * q);
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const int16x8_t lo = vmlal_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0[m])),
                                        vget_low_s8(w1), vget_low_s8(x1[m]));
          const int16x8_t hi = vmlal_high_s8(vmull_high_s8(w0, x0[m]), w1, x1[m]);
          acc[m][2 * q] = vpadalq_s16(acc[m][2 * q], lo);
          acc[m][2 * q + 1] = vpadalq_s16(acc[m][2 * q + 1], hi);
        }
      }
    }
  for (; s < steps; ++s) {  // one product per int16 lane: exact for any bytes
    int8x16_t x[MR];
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      int32_t v;
      std::memcpy(&v, ap + m * kKc + 4 * s, 4);
      x[m] = vreinterpretq_s8_s32(vdupq_n_s32(v));
    }
    LOWBIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int8x16_t w = vld1q_s8(b + s * 64 + 16 * q);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        acc[m][2 * q] = vpadalq_s16(acc[m][2 * q], vmull_s8(vget_low_s8(w), vget_low_s8(x[m])));
        acc[m][2 * q + 1] = vpadalq_s16(acc[m][2 * q + 1], vmull_high_s8(w, x[m]));
      }
    }
  }
  LOWBIT_UNROLL
  for (int m = 0; m < MR; ++m) {
    LOWBIT_UNROLL
    for (int q = 0; q < 4; ++q) {
      int32x4_t v = vpaddq_s32(acc[m][2 * q], acc[m][2 * q + 1]);
      if (accum) v = vaddq_s32(v, vld1q_s32(out + m * kLd + 4 * q));
      vst1q_s32(out + m * kLd + 4 * q, v);
    }
  }
}

template <bool PAIR>
void mull_block(const int8_t* ap, int64_t rows, const int8_t* b, int64_t ps, int J, int64_t steps,
                int32_t* acc, bool accum) {
  for (int64_t m = 0; m < rows; m += 2)
    for (int j = 0; j < J; ++j) {
      if (rows - m == 1)
        mull_tile<1, PAIR>(ap + m * kKc, b + j * ps, steps, acc + m * kLd + 16 * j, accum);
      else
        mull_tile<2, PAIR>(ap + m * kKc, b + j * ps, steps, acc + m * kLd + 16 * j, accum);
    }
}
#endif  // !__ARM_FEATURE_DOTPROD

// Int32 sums of rows [0, rows) x J panels over k [0, len) (a: row 0 at k 0; b: panel 0 at k 0)
// into acc (row m, panel j at acc + m*kLd + 16j), added to what is there when `accum`.
void block_dots(const uint8_t* a, int64_t lda, int64_t rows, const int8_t* b, int64_t ps, int J,
                int64_t len, int32_t* acc, bool accum, int8_t* abuf, int8_t* wbuf) {
  const int64_t steps = len / kKStep;
#if defined(__ARM_FEATURE_MATMUL_INT8)
  if (rows > 1) {
    pack_pairs(a, lda, rows, len, abuf);
    if (rows <= 8) return mmla_block<true>(abuf, rows, b, ps, J, steps, acc, accum);
    pack_cols(b, ps, J, steps, wbuf);  // zipped once, reused by every 8-row tile
    return mmla_block<false>(abuf, rows, wbuf, ps, J, steps, acc, accum);
  }
  (void)wbuf;
  pack_rows(a, lda, rows, len, abuf);
  sdot_block(abuf, rows, b, ps, J, steps, acc, accum);
#elif defined(__ARM_FEATURE_DOTPROD)
  (void)wbuf;
  pack_rows(a, lda, rows, len, abuf);
  sdot_block(abuf, rows, b, ps, J, steps, acc, accum);
#else
  (void)wbuf;
  if (pack_rows(a, lda, rows, len, abuf))
    mull_block<false>(abuf, rows, b, ps, J, steps, acc, accum);
  else
    mull_block<true>(abuf, rows, b, ps, J, steps, acc, accum);
#endif
}

// Group `grp` of rows [mc, mc + rows) x panels [p, p + J) from its exact sums: int32 out, or
// f = acc * ws (first group) / fma(acc, ws, f), then y = fma(f, ascale, bias) or f * ascale after
// the last, in ref's order.
void epilogue(const GemmArgs* g, bool int32_out, int64_t G, int64_t grp, int64_t mc, int64_t rows,
              int64_t p, int J, const int32_t* acc, float* f) {
  const int64_t n0 = p * kPanel, n1 = (p + J) * kPanel < g->N ? (p + J) * kPanel : g->N;
  const int64_t n = n1 - n0;
  if (n <= 0) return;
  if (int32_out) {
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy((int32_t*)g->c + (mc + r) * g->ldc + n0, acc + r * kLd, (size_t)n * 4);
    return;
  }
  const bool last = grp == G - 1;
  alignas(16) float bias[kLd] = {};
  if (last && g->bias) std::memcpy(bias, g->bias + n0, (size_t)n * 4);
  const float* ws = g->wscale + grp * g->Np + n0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* ar = acc + r * kLd;
    float* fr = f + r * kLd;
    float* cr = (float*)g->c + (mc + r) * g->ldc + n0;
    const float32x4_t sa = vdupq_n_f32(last ? g->ascale[mc + r] : 0.f);
    for (int64_t i = 0; i < n; i += 4) {
      const float32x4_t v = vcvtq_f32_s32(vld1q_s32(ar + i)), w = vld1q_f32(ws + i);
      const float32x4_t x = grp == 0 ? vmulq_f32(v, w) : vfmaq_f32(vld1q_f32(fr + i), v, w);
      if (!last) {
        vst1q_f32(fr + i, x);
        continue;
      }
      const float32x4_t y = g->bias ? vfmaq_f32(vld1q_f32(bias + i), x, sa) : vmulq_f32(x, sa);
      if (i + 4 <= n) {
        vst1q_f32(cr + i, y);
      } else {
        float t[4];
        vst1q_f32(t, y);
        std::memcpy(cr + i, t, (size_t)(n - i) * 4);
      }
    }
  }
}

void gemm(const GemmArgs* g, int64_t p0, int64_t p1, bool int32_out) {
  const int64_t ps = g->Kp * kPanel;
  // int32 output is one group (ref sums the first `group` k); float output folds every group
  const int64_t group = g->group, G = int32_out ? 1 : g->Kp / group;
  alignas(16) int8_t abuf[kMc * kKc];
#ifdef __ARM_FEATURE_MATMUL_INT8
  alignas(16) int8_t wbuf[kJ * kKc * kPanel];
#else
  int8_t* wbuf = nullptr;
#endif
  alignas(16) int32_t acc[kMc * kLd];
  alignas(16) float f[kMc * kLd];
  for (int64_t p = p0; p < p1; p += kJ) {
    const int J = (int)(p1 - p < kJ ? p1 - p : kJ);
    for (int64_t mc = 0; mc < g->M; mc += kMc) {
      const int64_t rows = g->M - mc < kMc ? g->M - mc : kMc;
      for (int64_t grp = 0; grp < G; ++grp) {
        const int64_t k_end = (grp + 1) * group;
        for (int64_t k0 = grp * group; k0 < k_end; k0 += kKc)
          block_dots(g->a + mc * g->lda + k0, g->lda, rows, g->b + p * ps + k0 * kPanel, ps, J,
                     k_end - k0 < kKc ? k_end - k0 : kKc, acc, k0 != grp * group, abuf, wbuf);
        epilogue(g, int32_out, G, grp, mc, rows, p, J, acc, f);
      }
    }
  }
}

}  // namespace

void gemm_u8s8_f32(const GemmArgs* g, int64_t p0, int64_t p1) { gemm(g, p0, p1, false); }
void gemm_u8s8_i32(const GemmArgs* g, int64_t p0, int64_t p1) { gemm(g, p0, p1, true); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
