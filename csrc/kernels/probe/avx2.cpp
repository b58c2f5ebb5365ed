// Probes, AVX2 / AVX-VNNI: the int8 dot peak (VPDPBUSD with AVX-VNNI, else VPMADDWD on widened
// bytes, as gemm_s8/avx2.cpp uses) over 12 independent accumulators, and a 256-bit read stream.
#include <immintrin.h>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

__attribute__((noinline)) int64_t dot_peak(int64_t iters) {
  __m256i acc[12];
  _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i a = _mm256_set1_epi32(0x01010101), b = _mm256_set1_epi32(0x02020202);
  asm volatile("" : "+x"(a), "+x"(b));  // opaque operands: no constant folding of the loop
  for (int64_t it = 0; it < iters; ++it) {
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) {
#ifdef __AVXVNNI__
      acc[i] = _mm256_dpbusd_avx_epi32(acc[i], a, b);
#else
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a, b));
#endif
    }
  }
  // stored out, not reduced in registers: a use after the loop makes GCC spill inside it
  alignas(32) int32_t out[12 * 8];
  _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) _mm256_store_si256((__m256i*)(out + 8 * i), acc[i]);
  int32_t x = 0;
  for (int i = 0; i < 12 * 8; ++i) x ^= out[i];  // every accumulator is used
  volatile int32_t sink = x;
  (void)sink;
#ifdef __AVXVNNI__
  return iters * 12 * 32;  // 32 int8 MACs per VPDPBUSD ymm
#else
  return iters * 12 * 16;  // 16 (widened) MACs per VPMADDWD ymm
#endif
}

uint64_t stream_read(const uint8_t* p, int64_t n) {
  // four independent chains of plain loads: the hardware prefetchers alone read fastest (Zen 4:
  // a software prefetch into L1 holds a miss buffer until the line arrives, and capped a 1 GB
  // read at 25-29 GB/s of 32-53)
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    s0 = _mm256_xor_si256(s0, _mm256_loadu_si256((const __m256i*)(p + i)));
    s1 = _mm256_xor_si256(s1, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
    s2 = _mm256_xor_si256(s2, _mm256_loadu_si256((const __m256i*)(p + i + 64)));
    s3 = _mm256_xor_si256(s3, _mm256_loadu_si256((const __m256i*)(p + i + 96)));
  }
  s0 = _mm256_xor_si256(_mm256_xor_si256(s0, s1), _mm256_xor_si256(s2, s3));
  return (uint64_t)_mm256_extract_epi64(s0, 0) ^ (uint64_t)_mm256_extract_epi64(s0, 3);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
