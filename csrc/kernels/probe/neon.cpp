// Probes, AArch64: the int8 dot peak of the set's GEMM instruction over 16 independent
// accumulators (enough for 4 pipes x 4 cycles of latency): SMMLA (32 multiply-adds) with i8mm,
// SDOT (16) with dotprod, else the widening SMLAL (8, int16 lanes) of the neon GEMM; and a
// 128-bit read stream in four chains.
#include <arm_neon.h>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

__attribute__((noinline)) int64_t dot_peak(int64_t iters) {
  constexpr int kChains = 16;
#if defined(__ARM_FEATURE_MATMUL_INT8) || defined(__ARM_FEATURE_DOTPROD)
  int32x4_t acc[kChains];
  _Pragma("GCC unroll 16") for (int i = 0; i < kChains; ++i) acc[i] = vdupq_n_s32(i);
#else
  int16x8_t acc[kChains];
  _Pragma("GCC unroll 16") for (int i = 0; i < kChains; ++i) acc[i] = vdupq_n_s16((int16_t)i);
#endif
  int8x16_t a = vdupq_n_s8(1), b = vdupq_n_s8(2);
  asm volatile("" : "+w"(a), "+w"(b));  // opaque operands: no constant folding of the loop
  for (int64_t it = 0; it < iters; ++it) {
    _Pragma("GCC unroll 16") for (int i = 0; i < kChains; ++i) {
#if defined(__ARM_FEATURE_MATMUL_INT8)
      acc[i] = vmmlaq_s32(acc[i], a, b);
#elif defined(__ARM_FEATURE_DOTPROD)
      acc[i] = vdotq_s32(acc[i], a, b);
#else
      acc[i] = vmlal_s8(acc[i], vget_low_s8(a), vget_low_s8(b));
#endif
    }
  }
  // stored out, not reduced in registers: a use after the loop could make GCC spill inside it
  int32_t x = 0;
  _Pragma("GCC unroll 16") for (int i = 0; i < kChains; ++i) {
    int32_t lanes[4];
#if defined(__ARM_FEATURE_MATMUL_INT8) || defined(__ARM_FEATURE_DOTPROD)
    vst1q_s32(lanes, acc[i]);
#else
    vst1q_s32(lanes, vreinterpretq_s32_s16(acc[i]));
#endif
    x ^= lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];  // every accumulator is used
  }
  volatile int32_t sink = x;
  (void)sink;
#if defined(__ARM_FEATURE_MATMUL_INT8)
  return iters * kChains * 32;  // 2x8 by 8x2 per SMMLA
#elif defined(__ARM_FEATURE_DOTPROD)
  return iters * kChains * 16;  // 4 lanes x 4 per SDOT
#else
  return iters * kChains * 8;   // 8 int16 lanes per SMLAL
#endif
}

uint64_t stream_read(const uint8_t* p, int64_t n) {
  // four independent chains and software prefetch, as the streaming kernels read
  uint8x16_t s0 = vdupq_n_u8(0), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i + 64 <= n; i += 64) {
    __builtin_prefetch(p + i + 2048);
    s0 = veorq_u8(s0, vld1q_u8(p + i));
    s1 = veorq_u8(s1, vld1q_u8(p + i + 16));
    s2 = veorq_u8(s2, vld1q_u8(p + i + 32));
    s3 = veorq_u8(s3, vld1q_u8(p + i + 48));
  }
  const uint64x2_t s = vreinterpretq_u64_u8(veorq_u8(veorq_u8(s0, s1), veorq_u8(s2, s3)));
  return vgetq_lane_u64(s, 0) ^ vgetq_lane_u64(s, 1);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
