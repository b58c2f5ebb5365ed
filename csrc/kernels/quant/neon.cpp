// Quantizers, AArch64 NEON (the same code in every aarch64 set): the activation quantizers, which
// run on every call, do quant/ref.cpp's arithmetic 4 floats per instruction: max of the |x| bit
// patterns (>= Inf's means a NaN/Inf), IEEE division (FDIV), clamp to +-1024, round-half-even
// (FCVTNS), clamp. The weight quantizers run once per load: they are the reference itself
// (lowbit::ref, compiled once), not another copy of it.
#include <arm_neon.h>
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace ref {
int64_t quantize_w8(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, int8_t* packed, float* scales, int32_t* comp);
int64_t quantize_w4(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales, uint16_t* mins,
                    int* why);
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);
}  // namespace ref

namespace LOWBIT_NS {

// quant/ref.cpp defines these in every namespace it is compiled into and the other kernels of a
// set may call them (gemm_q4/ref.cpp does): the set's quantizer source keeps providing them.
uint16_t float_to_half(float f) { return ref::float_to_half(f); }
float half_to_float(uint16_t h) { return ref::half_to_float(h); }

int64_t quantize_w8(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, int8_t* packed, float* scales, int32_t* comp) {
  return ref::quantize_w8(w, ldw, N, K, Kp, group, n0, n1, packed, scales, comp);
}

int64_t quantize_w4(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales, uint16_t* mins,
                    int* why) {
  return ref::quantize_w4(w, ldw, N, K, Kp, group, n0, n1, packed, scales, mins, why);
}

namespace {

constexpr uint32_t kInfBits = 0x7F800000u;

// The largest |x| bit pattern over [k0, k1): finite floats order as their bits do.
uint32_t amax_bits(const float* x, int64_t k0, int64_t k1) {
  const uint32x4_t abs = vdupq_n_u32(0x7FFFFFFFu);
  uint32x4_t m0 = vdupq_n_u32(0), m1 = m0;
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    m0 = vmaxq_u32(m0, vandq_u32(vreinterpretq_u32_f32(vld1q_f32(x + k)), abs));
    m1 = vmaxq_u32(m1, vandq_u32(vreinterpretq_u32_f32(vld1q_f32(x + k + 4)), abs));
  }
  uint32_t r = vmaxvq_u32(vmaxq_u32(m0, m1));
  for (; k < k1; ++k) {
    uint32_t b;
    std::memcpy(&b, x + k, 4);
    b &= 0x7FFFFFFFu;
    r = b > r ? b : r;
  }
  return r;
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// clamp(round-half-even(clamp(x / scale, -1024, 1024)) + zero, lo, 127) of 16 floats from x
// (`left` valid ones; the rest read as 0.f, as ref pads), as int32 in q[4].
inline void quant16(const float* x, int64_t left, float32x4_t scale, int32x4_t zero, int32x4_t lo,
                    int32x4_t (&q)[4]) {
  float t[16];
  if (left < 16) {
    std::memset(t, 0, sizeof t);
    if (left > 0) std::memcpy(t, x, (size_t)left * 4);
    x = t;
  }
  const float32x4_t lim_lo = vdupq_n_f32(-1024.f), lim_hi = vdupq_n_f32(1024.f);
  for (int i = 0; i < 4; ++i) {
    const float32x4_t t4 = vdivq_f32(vld1q_f32(x + 4 * i), scale);
    const float32x4_t v = vminq_f32(vmaxq_f32(t4, lim_lo), lim_hi);
    q[i] = vmaxq_s32(vminq_s32(vaddq_s32(vcvtnq_s32_f32(v), zero), vdupq_n_s32(127)), lo);
  }
}

// 16 int32 lanes in [-128, 127] to bytes, in order.
inline int8x16_t narrow16(const int32x4_t (&q)[4]) {
  const int16x8_t a = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
  const int16x8_t b = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
  return vcombine_s8(vmovn_s16(a), vmovn_s16(b));
}

}  // namespace

void quantize_a8(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                 uint8_t* out, int64_t ldo, float* scales, float fixed, int32_t zero) {
  const int32x4_t lo = vdupq_n_s32(fixed > 0.f ? -128 : -127);
  const int32x4_t zv = vdupq_n_s32(fixed > 0.f ? zero : 0);
  const uint8x16_t flip = vdupq_n_u8(0x80);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    uint8_t* q = out + m * ldo;
    const uint32_t bits = amax_bits(row, 0, K);
    const float scale = bits >= kInfBits ? NAN : fixed > 0.f ? fixed : bits_to_float(bits) / 127.f;
    scales[m] = scale;
    if (!(bits < kInfBits && scale != 0.f)) {
      std::memset(q, 128, (size_t)Kp);
      continue;
    }
    const float32x4_t s = vdupq_n_f32(scale);
    for (int64_t k = 0; k < Kp; k += 16) {
      int32x4_t v[4];
      quant16(row + k, K - k, s, zv, lo, v);
      const uint8x16_t b = veorq_u8(vreinterpretq_u8_s8(narrow16(v)), flip);  // q + 128
      if (k + 16 <= Kp) {
        vst1q_u8(q + k, b);
      } else {
        uint8_t t[16];
        vst1q_u8(t, b);
        std::memcpy(q + k, t, (size_t)(Kp - k));
      }
    }
  }
}

void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup, int32_t* bsum, float fixed) {
  const int64_t nblocks = Kp / kActBlock, G = Kp / group;
  const int32x4_t lo = vdupq_n_s32(fixed > 0.f ? -128 : -127), zero = vdupq_n_s32(0);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    float A = 0.f;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t k0 = b * kActBlock;
      const int64_t k1 = k0 + kActBlock < K ? k0 + kActBlock : K;
      const uint32_t bits = k0 < K ? amax_bits(row, k0, k1) : 0;
      const float scale = bits >= kInfBits ? NAN
                          : fixed > 0.f    ? fixed
                                           : bits_to_float(bits) / 127.f;
      int8_t* dst = q + m * ldq + k0;
      int32_t sum = 0;
      if (bits < kInfBits && scale != 0.f) {
        const float32x4_t s = vdupq_n_f32(scale);
        int32x4_t total = vdupq_n_s32(0);
        for (int64_t i = 0; i < kActBlock; i += 16) {
          int32x4_t v[4];
          quant16(row + k0 + i, K - k0 - i, s, zero, lo, v);
          total = vaddq_s32(total, vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
          vst1q_s8(dst + i, narrow16(v));
        }
        sum = vaddvq_s32(total);
      } else {
        std::memset(dst, 0, kActBlock);
      }
      ablock[m * nblocks + b] = scale;
      if (bsum) bsum[m * nblocks + b] = sum;
      // A_g: the group's sum of scale_b * sum(q_b), a product first, then fma, in block order
      A = k0 % group == 0 ? scale * (float)sum : std::fma(scale, (float)sum, A);
      if ((k0 + kActBlock) % group == 0) agroup[m * G + k0 / group] = A;
    }
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
