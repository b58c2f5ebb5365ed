// Probes, AVX-512 VNNI: VPDPBUSD zmm peak over 24 independent accumulators (TDPBUSD tiles when
// compiled for AMX), and a 512-bit read stream.
#include <immintrin.h>
#include "kernels/isa.h"
#include "kernels/amx.h"

namespace lowbit {
namespace LOWBIT_NS {

#ifdef __AMX_INT8__
// AMX: four independent TDPBUSD accumulator tiles over operand tiles loaded once.
__attribute__((noinline)) int64_t dot_peak(int64_t iters) {
  alignas(64) static uint8_t operand[16 * 64];
  alignas(64) int32_t out[4][16 * 16];
  tile_configure({16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, out[0], 64);
  _tile_stored(1, out[1], 64);
  _tile_stored(2, out[2], 64);
  _tile_stored(3, out[3], 64);
  _tile_release();
  volatile int32_t sink = out[0][0] ^ out[1][1] ^ out[2][2] ^ out[3][3];
  (void)sink;
  return iters * 4 * 16 * 16 * 64;  // 16x16 outputs x 64 int8 products per TDPBUSD
}
#else
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
#endif

uint64_t stream_read(const uint8_t* p, int64_t n) {
  // four independent chains of plain loads: the hardware prefetchers alone read fastest (Zen 4:
  // a software prefetch into L1 holds a miss buffer until the line arrives, and capped a 1 GB
  // read at 25-29 GB/s of 32-53)
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
    s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p + i + 64));
    s2 = _mm512_xor_si512(s2, _mm512_loadu_si512(p + i + 128));
    s3 = _mm512_xor_si512(s3, _mm512_loadu_si512(p + i + 192));
  }
  s0 = _mm512_xor_si512(_mm512_xor_si512(s0, s1), _mm512_xor_si512(s2, s3));
  return (uint64_t)_mm512_reduce_add_epi64(s0);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
