// Machine probes for the benchmarks: the int8 dot-product peak of this ISA (independent
// accumulator chains, no memory traffic) and a streaming read of a buffer. Reference: scalar.
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

int64_t dot_peak(int64_t iters) {
  // The reference GEMM's inner loop: int8 dots over an L1-resident pair of rows.
  static int8_t a[256], b[256];
  volatile int8_t seed = 1;
  for (int i = 0; i < 256; ++i) a[i] = b[i] = (int8_t)(seed + i);
  int32_t acc = 0;
  for (int64_t it = 0; it < iters; ++it) {
    for (int i = 0; i < 256; ++i) acc += a[i] * b[i];
    a[it & 255] = (int8_t)acc;  // keeps each round dependent on the last
  }
  volatile int32_t sink = acc;
  (void)sink;
  return iters * 256;
}

uint64_t stream_read(const uint8_t* p, int64_t n) {
  uint64_t s = 0;
  for (int64_t i = 0; i + 8 <= n; i += 64) {
    uint64_t v;
    __builtin_memcpy(&v, p + i, 8);
    s ^= v;
  }
  return s;
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
