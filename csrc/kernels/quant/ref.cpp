// Reference quantizers: plain loops, written to be read. Every SIMD variant must match them bit
// for bit (same division, same round-half-even, same clamping).
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

static bool finite(float v) { return std::isfinite(v); }

int64_t quantize_w8(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, int8_t* packed, float* scales, int32_t* comp) {
  const int64_t Np = (N + kPanel - 1) / kPanel * kPanel;
  const int64_t G = Kp / group;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * ldw;
    for (int64_t k = 0; k < K; ++k)
      if (!finite(row[k])) return n;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::fmax(amax, std::fabs(row[k]));
      const float scale = amax / 127.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + group; ++k) {
        int32_t q = 0;
        if (k < K && scale != 0.f) q = (int32_t)std::nearbyint(row[k] / scale);
        q = q < -127 ? -127 : (q > 127 ? 127 : q);
        packed[((n / kPanel * Kp / kKStep + k / kKStep) * kPanel + n % kPanel) * kKStep +
               k % kKStep] = (int8_t)q;
        sum += q;
      }
      scales[g * Np + n] = scale;
      comp[g * Np + n] = 128 * sum;
    }
  }
  return -1;
}

void quantize_a8(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                 uint8_t* out, int64_t ldo, float* scales) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    uint8_t* q = out + m * ldo;
    float amax = 0.f;
    bool ok = true;
    for (int64_t k = 0; k < K; ++k) {
      ok = ok && finite(row[k]);
      amax = std::fmax(amax, std::fabs(row[k]));
    }
    const float scale = ok ? amax / 127.f : NAN;
    for (int64_t k = 0; k < Kp; ++k) {
      int32_t v = 0;
      if (k < K && ok && scale != 0.f) v = (int32_t)std::nearbyint(row[k] / scale);
      v = v < -127 ? -127 : (v > 127 ? 127 : v);
      q[k] = (uint8_t)(v + 128);
    }
    scales[m] = scale;
  }
}

void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup) {
  const int64_t nblocks = Kp / kActBlock, G = Kp / group;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    float A = 0.f;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t k0 = b * kActBlock;
      float amax = 0.f;
      bool ok = true;
      for (int64_t k = k0; k < k0 + kActBlock && k < K; ++k) {
        ok = ok && finite(row[k]);
        amax = std::fmax(amax, std::fabs(row[k]));
      }
      const float scale = ok ? amax / 127.f : NAN;
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + kActBlock; ++k) {
        int32_t v = 0;
        if (k < K && ok && scale != 0.f) v = (int32_t)std::nearbyint(row[k] / scale);
        v = v < -127 ? -127 : (v > 127 ? 127 : v);
        q[m * ldq + k] = (int8_t)v;
        sum += v;
      }
      ablock[m * nblocks + b] = scale;
      // A_g: the group's sum of scale_b * sum(q_b), a product first, then fma, in block order
      const bool first = k0 % group == 0;
      A = first ? scale * (float)sum : std::fma(scale, (float)sum, A);
      if ((k0 + kActBlock) % group == 0) agroup[m * G + k0 / group] = A;
    }
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
