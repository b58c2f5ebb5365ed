// W8A32: the INT8 weight layout (kernels.h) times float32 activations, weight-only (each int8
// value exactly a float). One source for every ISA, compiled with each ISA's flags in its native
// vector width (vec.h): a lane is one output column, and every lane runs the same operations in
// the same order whatever the width, so results are bit-identical on every ISA:
//   S_g = sum over the group's k, in k order, of fma(w, x, S)   (from S = 0)
//   f = S_0 * ws_0;  f = fma(S_g, ws_g, f) for g >= 1;  y = f + bias[n]
// A 64-byte block holds 16 columns x 4 k (byte c*4 + i: column c's k0 + i); step i's values are
// byte i of every 32-bit lane, sign-extended by two shifts and converted.
#include <cstring>
#include "kernels/isa.h"
#include "kernels/vec.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#define LOWBIT_UNROLL _Pragma("GCC unroll 16")

constexpr int kB = (int)kPanel / kN;  // vectors per panel of 16 columns
// Tiles: MR rows x J panels. Several rows share each converted weight vector; one row reads
// J panels at once (independent FMA chains); as many accumulators as the ISA's registers hold.
#if defined(__AVX512F__)
constexpr int kRows = 4, kPanels = 2, kPanelsOneRow = 4;
#elif defined(__FMA__)
constexpr int kRows = 2, kPanels = 1, kPanelsOneRow = 2;
#else
constexpr int kRows = 2, kPanels = 1, kPanelsOneRow = 1;
#endif

// The weights of step i (k0 + i) of kN columns: byte i of each lane of v.
inline vf values(vi v, int i) {
  return __builtin_convertvector((vi)((vu)v << (24 - 8 * i)) >> 24, vf);
}

template <int MR, int J>
void tile(const GemmArgs* g, int64_t m0, int64_t p) {
  constexpr int V = J * kB;
  const int64_t ps = g->Kp * kPanel, G = g->Kp / g->group;
  const float* x = (const float*)(const void*)g->a + m0 * g->lda;
  const int8_t* b = g->b + p * ps;
  vf f[MR][V], S[MR][V];
  for (int64_t grp = 0; grp < G; ++grp) {
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      LOWBIT_UNROLL
      for (int u = 0; u < V; ++u) S[m][u] = splat(0.f);
    for (int64_t k0 = grp * g->group; k0 < (grp + 1) * g->group; k0 += kKStep) {
      vi v[V];
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j)
        std::memcpy(&v[j * kB], b + j * ps + k0 * kPanel, sizeof(vi) * kB);
      LOWBIT_UNROLL
      for (int i = 0; i < (int)kKStep; ++i) {
        vf w[V];
        LOWBIT_UNROLL
        for (int u = 0; u < V; ++u) w[u] = values(v[u], i);
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const vf xv = splat(x[m * g->lda + k0 + i]);
          LOWBIT_UNROLL
          for (int u = 0; u < V; ++u) S[m][u] = fmav(w[u], xv, S[m][u]);
        }
      }
    }
    LOWBIT_UNROLL
    for (int u = 0; u < V; ++u) {
      const vf ws = load(g->wscale + grp * g->Np + p * kPanel + u * kN);
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) f[m][u] = grp == 0 ? S[m][u] * ws : fmav(S[m][u], ws, f[m][u]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) {
      const int64_t n0 = (p + j) * kPanel, n = g->N - n0 < kPanel ? g->N - n0 : kPanel;
      if (n <= 0) break;
      float y[kPanel];
      for (int c = 0; c < kB; ++c) store(y + c * kN, f[m][j * kB + c]);
      if (g->bias)
        for (int64_t c = 0; c < n; ++c) y[c] += g->bias[n0 + c];
      std::memcpy((float*)g->c + (m0 + m) * g->ldc + n0, y, (size_t)n * sizeof(float));
    }
}

// tile<MR, J> for j <= J panels; rows_tile for mr <= MR rows.
template <int MR, int J>
void panels_tile(const GemmArgs* g, int64_t m0, int64_t p, int j) {
  if constexpr (J > 1)
    if (j < J) return panels_tile<MR, J - 1>(g, m0, p, j);
  tile<MR, J>(g, m0, p);
}
template <int MR>
void rows_tile(const GemmArgs* g, int64_t m0, int64_t p, int mr, int j) {
  if constexpr (MR > 1) {
    if (mr < MR) return rows_tile<MR - 1>(g, m0, p, mr, j);
    panels_tile<MR, kPanels>(g, m0, p, j);
  } else {
    panels_tile<1, kPanelsOneRow>(g, m0, p, j);
  }
}

}  // namespace

void gemm_s8f32(const GemmArgs* g, int64_t p0, int64_t p1) {
  const int max_j = g->M == 1 ? kPanelsOneRow : kPanels;
  for (int64_t p = p0; p < p1;) {
    const int j = (int)(p1 - p < max_j ? p1 - p : max_j);
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < kRows ? g->M - m : kRows);
      rows_tile<kRows>(g, m, p, mr, j);
      m += mr;
    }
    p += j;
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
