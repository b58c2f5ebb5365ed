// Reference INT8 GEMM over the packed panel layout (kernels.h): exact int32 dots per group, then
// the float epilogue in exactly the order every SIMD variant uses. Written to be read, not fast.
#include <cmath>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

static int32_t weight(const GemmArgs* g, int64_t n, int64_t k) {
  return g->b[((n / kPanel * g->Kp / kKStep + k / kKStep) * kPanel + n % kPanel) * kKStep +
              k % kKStep];
}

static int32_t group_dot(const GemmArgs* g, int64_t m, int64_t n, int64_t k0) {
  // Wrapping int32 arithmetic, as the hardware does: exact whenever the true sum fits in int32.
  uint32_t acc = 0;
  for (int64_t k = k0; k < k0 + g->group; ++k)
    acc += (uint32_t)(((int32_t)g->a[m * g->lda + k] - 128) * weight(g, n, k));
  return (int32_t)acc;
}

void gemm_u8s8_f32(const GemmArgs* g, int64_t p0, int64_t p1) {
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  const int64_t G = g->Kp / g->group;
  float* c = (float*)g->c;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      float f = (float)group_dot(g, m, n, 0) * g->wscale[n];
      for (int64_t grp = 1; grp < G; ++grp)
        f = std::fma((float)group_dot(g, m, n, grp * g->group), g->wscale[grp * g->Np + n], f);
      c[m * g->ldc + n] = g->bias ? std::fma(f, g->ascale[m], g->bias[n]) : f * g->ascale[m];
    }
}

void gemm_u8s8_i32(const GemmArgs* g, int64_t p0, int64_t p1) {
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  int32_t* c = (int32_t*)g->c;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) c[m * g->ldc + n] = group_dot(g, m, n, 0);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
