// Reference quantizers: plain loops, written to be read. Every SIMD variant must match them bit
// for bit (same division, same round-half-even, same clamping).
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

static bool finite(float v) { return std::isfinite(v); }

// float16 conversions, round half to even (the F16C instructions' rounding).
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7FFFFFFF;
  if (x >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (x > 0x7F800000 ? 0x200 : 0));
  if (x >= 0x477FF000) return (uint16_t)(sign | 0x7C00);  // rounds beyond 65504: infinity
  if (x < 0x38800000) {  // below the smallest normal half: a multiple of 2^-24, rounded
    float v;
    std::memcpy(&v, &x, 4);
    return (uint16_t)(sign | (uint32_t)std::nearbyint(v * 16777216.f));
  }
  return (uint16_t)(sign | ((x + 0xFFF + ((x >> 13) & 1) - 0x38000000) >> 13));
}

float half_to_float(uint16_t h) {
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  float f;
  if (exp == 0) {
    f = (float)man / 16777216.f;  // zero or subnormal: exact
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    const uint32_t bits = ((exp + 112) << 23) | (man << 13);
    std::memcpy(&f, &bits, 4);
  }
  return (h & 0x8000) ? -f : f;
}

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

int64_t quantize_w4(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales, uint16_t* mins,
                    int* why) {
  const int64_t Np = (N + kPanel - 1) / kPanel * kPanel, G = Kp / group;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * ldw;
    for (int64_t k = 0; k < K; ++k)
      if (!finite(row[k])) {
        *why = 0;
        return n;
      }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
      float lo = row[k0], hi = row[k0];
      for (int64_t k = k0; k < k1; ++k) {
        lo = std::fmin(lo, row[k]);
        hi = std::fmax(hi, row[k]);
      }
      lo += 0.f;  // -0 -> +0: the minimum's float16 bits must not depend on the order of search
      hi += 0.f;
      const uint16_t d16 = float_to_half(mins ? (hi - lo) / 15.f : (-lo > hi ? lo : hi) / -8.f);
      const uint16_t m16 = mins ? float_to_half(lo) : 0;
      if ((d16 & 0x7C00) == 0x7C00 || (m16 & 0x7C00) == 0x7C00) {
        *why = 1;
        return n;
      }
      const float d = half_to_float(d16), m = half_to_float(m16);
      const int32_t offset = mins ? 0 : 8;  // symmetric values sit around 8
      for (int64_t k = k0; k < k0 + group; ++k) {
        int32_t q = offset;
        if (k < K && d != 0.f) q = (int32_t)std::nearbyint((row[k] - m) / d) + offset;
        q = q < 0 ? 0 : (q > 15 ? 15 : q);
        uint8_t& byte = packed[(n / kPanel * Kp / kQ4Step + k / kQ4Step) * 64 + n % kPanel * 4 + k % 4];
        byte = k % kQ4Step < 4 ? (uint8_t)((byte & 0xF0) | q) : (uint8_t)((byte & 0x0F) | (q << 4));
      }
      const int64_t at = (n / kPanel * G + g) * kPanel + n % kPanel;  // [Np/16][G][16]
      scales[at] = d16;
      if (mins) mins[at] = m16;
    }
  }
  return -1;
}

// q = clamp(round-half-even(v / scale) + zero, lo, 127); the quotient is clamped first so that a
// static scale far below |v| cannot overflow the conversion.
static int32_t quant1(float v, float scale, int32_t zero, int32_t lo) {
  const float t = std::fmin(std::fmax(v / scale, -1024.f), 1024.f);
  const int32_t q = (int32_t)std::nearbyint(t) + zero;
  return q < lo ? lo : (q > 127 ? 127 : q);
}

void quantize_a8(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                 uint8_t* out, int64_t ldo, float* scales, float fixed, int32_t zero) {
  const int32_t lo = fixed > 0.f ? -128 : -127;
  if (!(fixed > 0.f)) zero = 0;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    uint8_t* q = out + m * ldo;
    float amax = 0.f;
    bool ok = true;
    for (int64_t k = 0; k < K; ++k) {
      ok = ok && finite(row[k]);
      amax = std::fmax(amax, std::fabs(row[k]));
    }
    const float scale = !ok ? NAN : fixed > 0.f ? fixed : amax / 127.f;
    for (int64_t k = 0; k < Kp; ++k) {
      int32_t v = 0;
      if (ok && scale != 0.f) v = quant1(k < K ? row[k] : 0.f, scale, zero, lo);  // pad: zero
      q[k] = (uint8_t)(v + 128);
    }
    scales[m] = scale;
  }
}

void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup, int32_t* bsum, float fixed) {
  const int64_t nblocks = Kp / kActBlock, G = Kp / group;
  const int32_t lo = fixed > 0.f ? -128 : -127;
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
      const float scale = !ok ? NAN : fixed > 0.f ? fixed : amax / 127.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + kActBlock; ++k) {
        int32_t v = 0;
        if (k < K && ok && scale != 0.f) v = quant1(row[k], scale, 0, lo);
        q[m * ldq + k] = (int8_t)v;
        sum += v;
      }
      ablock[m * nblocks + b] = scale;
      if (bsum) bsum[m * nblocks + b] = sum;
      // A_g: the group's sum of scale_b * sum(q_b), a product first, then fma, in block order
      const bool first = k0 % group == 0;
      A = first ? scale * (float)sum : std::fma(scale, (float)sum, A);
      if ((k0 + kActBlock) % group == 0) agroup[m * G + k0 / group] = A;
    }
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
