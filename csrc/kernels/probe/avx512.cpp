// Probes, AVX-512 VNNI: VPDPBUSD zmm peak over 24 independent accumulators, and a 512-bit read
// stream.
#include <immintrin.h>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

__attribute__((noinline)) int64_t dot_peak(int64_t iters) {
  __m512i acc[24];
  _Pragma("GCC unroll 24") for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x02020202);
  asm volatile("" : "+v"(a), "+v"(b));  // opaque operands: no constant folding of the loop
  for (int64_t it = 0; it < iters; ++it) {
    _Pragma("GCC unroll 24") for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  }
  // stored out, not reduced in registers: a use after the loop makes GCC spill inside it
  alignas(64) int32_t out[24 * 16];
  _Pragma("GCC unroll 24") for (int i = 0; i < 24; ++i) _mm512_store_si512(out + 16 * i, acc[i]);
  int32_t x = 0;
  for (int i = 0; i < 24 * 16; ++i) x ^= out[i];  // every accumulator is used
  volatile int32_t sink = x;
  (void)sink;
  return iters * 24 * 64;  // 64 int8 MACs per VPDPBUSD zmm
}

uint64_t stream_read(const uint8_t* p, int64_t n) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
    s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p + i + 64));
  }
  s0 = _mm512_xor_si512(s0, s1);
  return (uint64_t)_mm512_reduce_add_epi64(s0);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
