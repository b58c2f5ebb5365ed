// Reference INT4 matmuls over the packed nibble layout (kernels.h), W4A8 and W4A32, in exactly
// the order of operations every SIMD variant uses. Written to be read, not fast.
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
float half_to_float(uint16_t h);  // quant/ref.cpp

namespace {

int q4(const Q4Args* g, int64_t n, int64_t k) {
  const uint8_t byte = g->b[(n / kPanel * g->Kp / kQ4Step + k / kQ4Step) * 64 + n % kPanel * 4 + k % 4];
  return k % kQ4Step < 4 ? byte & 0x0F : byte >> 4;
}

// The group fold shared by both modes: f += fma(d, I, m * A).
float fold(const Q4Args* g, int64_t grp, int64_t n, float I, float A, float f) {
  const int64_t at = (n / kPanel * (g->Kp / g->group) + grp) * kPanel + n % kPanel;
  const float d = half_to_float(g->scales[at]);
  // -z converted as an integer (z = 0 gives +0, as the SIMD sets' integer negation does)
  const float m = g->mins ? half_to_float(g->mins[at]) : d * (float)-(g->zeros ? g->zeros[at] : 8);
  const float term = std::fma(d, I, m * A);
  return grp == 0 ? term : f + term;
}

}  // namespace

void gemm_q4a8(const Q4Args* g, int64_t p0, int64_t p1) {
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  const int64_t G = g->Kp / g->group, nblocks = g->Kp / kActBlock;
  const int8_t* a = (const int8_t*)g->a;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      float f = 0.f;
      for (int64_t grp = 0; grp < G; ++grp) {
        float I = 0.f;
        for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kActBlock) {
          int32_t dot = 0;
          for (int64_t k = k0; k < k0 + kActBlock; ++k) dot += q4(g, n, k) * a[m * g->lda + k];
          if (g->asum) dot -= 8 * g->asum[m * nblocks + k0 / kActBlock];  // symmetric: q - 8
          const float s = g->ablock[m * nblocks + k0 / kActBlock];
          I = k0 == grp * g->group ? (float)dot * s : std::fma((float)dot, s, I);
        }
        if (g->asum) {
          const int64_t at = (n / kPanel * G + grp) * kPanel + n % kPanel;
          f = std::fma(half_to_float(g->scales[at]), I, f);
        } else {
          f = fold(g, grp, n, I, g->agroup[m * G + grp], f);
        }
      }
      g->c[m * g->ldc + n] = g->bias ? f + g->bias[n] : f;
    }
}

void gemm_q4f32(const Q4Args* g, int64_t p0, int64_t p1) {
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  const int64_t G = g->Kp / g->group;
  const float* x = (const float*)g->a;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      float f = 0.f;
      for (int64_t grp = 0; grp < G; ++grp) {
        float S = 0.f;
        for (int64_t k = grp * g->group; k < (grp + 1) * g->group; ++k)
          S = std::fma((float)q4(g, n, k), x[m * g->lda + k], S);
        f = fold(g, grp, n, S, g->agroup[m * G + grp], f);
      }
      g->c[m * g->ldc + n] = g->bias ? f + g->bias[n] : f;
    }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
