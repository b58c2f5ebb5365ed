// Reference matmuls for the block formats (formats.h), int8 and float activations, in exactly the
// order of operations every SIMD variant uses. Per sub-block s of the row, in k order:
//   A8:  i_s = sum_k u_k a_k - offset * asum_s  (exact int32), sb its 32-block's activation scale
//        f = fma(B_s, sb * asum_s, f)  (formats with minima);   f = fma(D_s, sb * i_s, f)
//   A8, sub-blocks of 16 (Q6_K), instead per 32-input activation block of sub-blocks s0, s1:
//        t = D_s0 * i_s0,  t = fma(D_s1, i_s1, t),  f = fma(sb, t, f)
//   A8, code_dot formats, instead per 32-input activation block b of a file block:
//        i_b = sum_k code_s(k) (u_k - offset) a_k,  m_b = sum_s mcode_s asum_s  (exact int32)
//        g = fma(sb_b, i_b, g),  h = fma(sb_b, m_b, h)  (from 0 in each file block), and then
//        f = fma(-dmin, h, f)  (formats with minima);  f = fma(d, g, f)
//   A32: S_s = fma chain over k of (u_k - offset) * x_k
//        f = fma(B_s, xsum_s, f)  (formats with minima);         f = fma(D_s, S_s, f)
// from f = 0, then y = f + bias. Written to be read, not fast.
#include <cmath>
#include "formats.h"
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

namespace {

// The code_dot fold of row m, weight row n (see above).
float code_dot_row(const BlkArgs* g, int64_t m, int64_t n) {
  const BlockFormat& F = kBlockFormats[g->fmt];
  const int8_t* a = (const int8_t*)g->a + m * g->lda;
  float f = 0.f;
  for (int64_t t = 0; t < g->K / F.block; ++t) {
    float gs = 0.f, hs = 0.f;
    for (int64_t k0 = t * F.block; k0 < (t + 1) * F.block; k0 += kActBlock) {
      int32_t i = 0, mi = 0;
      for (int64_t s = k0 / F.sub; s < (k0 + kActBlock) / F.sub; ++s) {
        int code, mcode, asum = 0;
        blk_codes(*g, n, s, &code, &mcode);
        for (int64_t k = s * F.sub; k < (s + 1) * F.sub; ++k) i += code * (blk_u(*g, n, k) - F.offset) * a[k];
        for (int64_t h = s * F.sub / 16; h < (s + 1) * F.sub / 16; ++h) asum += g->asum[m * (g->K / 16) + h];
        mi += mcode * asum;
      }
      const float sb = g->ablock[m * (g->K / kActBlock) + k0 / kActBlock];
      gs = std::fma(sb, (float)i, gs);
      hs = std::fma(sb, (float)mi, hs);
    }
    float d, dm;
    blk_block_scales(*g, n, t, &d, &dm);
    if (F.min != MinKind::None) f = std::fma(-dm, hs, f);
    f = std::fma(d, gs, f);
  }
  return f;
}

}  // namespace

void gemm_blk_a8(const BlkArgs* g, int64_t p0, int64_t p1) {
  const BlockFormat& F = kBlockFormats[g->fmt];
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  const int8_t* a = (const int8_t*)g->a;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      float f = 0.f;
      if (F.code_dot) {
        f = code_dot_row(g, m, n);
      } else {
        const int64_t H = kActBlock / F.sub;  // sub-blocks per activation block
        float t = 0.f;
        for (int64_t s = 0; s < g->K / F.sub; ++s) {
          const int64_t k0 = s * F.sub, h = s % H;
          int32_t dot = 0, asum = 0;
          for (int64_t k = k0; k < k0 + F.sub; ++k) dot += blk_u(*g, n, k) * a[m * g->lda + k];
          for (int64_t h16 = k0 / 16; h16 < (k0 + F.sub) / 16; ++h16) asum += g->asum[m * (g->K / 16) + h16];
          const float sb = g->ablock[m * (g->K / kActBlock) + k0 / kActBlock];
          const float i = (float)(dot - F.offset * asum);
          float D, B;
          blk_scale(*g, n, s, &D, &B);
          if (H == 1) {
            if (F.min != MinKind::None) f = std::fma(B, sb * (float)asum, f);
            f = std::fma(D, sb * i, f);
          } else {  // (no minima at sub-blocks of 16 outside code_dot)
            t = h ? std::fma(D, i, t) : D * i;
            if (h == H - 1) f = std::fma(sb, t, f);
          }
        }
      }
      g->c[m * g->ldc + n] = g->bias ? f + g->bias[n] : f;
    }
}

void gemm_blk_f32(const BlkArgs* g, int64_t p0, int64_t p1) {
  const BlockFormat& F = kBlockFormats[g->fmt];
  const int64_t n_end = p1 * kPanel < g->N ? p1 * kPanel : g->N;
  const float* x = (const float*)g->a;
  for (int64_t m = 0; m < g->M; ++m)
    for (int64_t n = p0 * kPanel; n < n_end; ++n) {
      float f = 0.f;
      for (int64_t s = 0; s < g->K / F.sub; ++s) {
        float S = 0.f;
        for (int64_t k = s * F.sub; k < (s + 1) * F.sub; ++k)
          S = std::fma((float)(blk_u(*g, n, k) - F.offset), x[m * g->lda + k], S);
        float D, B;
        blk_scale(*g, n, s, &D, &B);
        if (F.min != MinKind::None) f = std::fma(B, g->xsum[m * (g->K / F.sub) + s], f);
        f = std::fma(D, S, f);
      }
      g->c[m * g->ldc + n] = g->bias ? f + g->bias[n] : f;
    }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
