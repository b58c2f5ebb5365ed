// INT8 GEMM, AVX-512 VNNI: u8 activations x s8 packed weights (kernels.h layout).
// Tile: MR rows x J panels of 16 columns; per 4-k step, J 64-byte weight loads, MR 4-byte
// broadcasts, MR*J VPDPBUSD. The +128 activation offset is removed with the per-group column sums.
#include <immintrin.h>
#include <cstring>
#include <utility>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

enum Mode { kInt32, kFloat, kFloatGrouped };

inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __mmask16 tail_mask(const GemmArgs* g, int64_t panel) {
  const int64_t left = g->N - panel * kPanel;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// The exact int32 dots of an MR x (J panels) tile over `steps` k-steps, stored to out[MR*J][16].
// Kept apart from the epilogue, with 1-D accumulators under explicit unroll pragmas: that is the
// form GCC keeps in registers (fused with the epilogue, it shuffles and spills them every k-step).
#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

template <int MR, int J, bool STREAM>
__attribute__((noinline)) void dots(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ps,
                                    int64_t steps, int32_t* out) {
  __m512i acc[MR * J];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i bv[J];
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) bv[j] = _mm512_loadu_si512(b + j * ps + s * 64);
    if (STREAM) {  // GEMV-like: ask for the weights well ahead of use
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) _mm_prefetch((const char*)(b + j * ps + s * 64 + 2048), _MM_HINT_T0);
    }
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m512i av = bcast4(a + m * lda + s * kKStep);
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) acc[m * J + j] = _mm512_dpbusd_epi32(acc[m * J + j], av, bv[j]);
    }
  }
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J; ++i) _mm512_store_si512(out + 16 * i, acc[i]);
}

template <int MR, int J, int MODE>
void tile(const GemmArgs* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kPanel;  // bytes per panel
  const int64_t group = g->group, Np = g->Np;
  const int64_t G = MODE == kFloatGrouped ? g->Kp / group : 1;
  alignas(64) int32_t acc[MR * J * 16];
  __m512 f[MR * J];
  for (int64_t grp = 0; grp < G; ++grp) {
    dots<MR, J, (MR <= 2)>(g->a + m0 * g->lda + grp * group, g->lda,
                           g->b + p * ps + grp * group * kPanel, ps, group / kKStep, acc);
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) {
      const __m512i cmp = _mm512_loadu_si512(g->comp + grp * Np + (p + j) * kPanel);
      if (MODE == kInt32) {
        const __mmask16 mask = tail_mask(g, p + j);
        int32_t* c = (int32_t*)g->c + m0 * g->ldc + (p + j) * kPanel;
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m)
          _mm512_mask_storeu_epi32(c + m * g->ldc, mask,
                                   _mm512_sub_epi32(_mm512_load_si512(acc + 16 * (m * J + j)), cmp));
      } else {
        const __m512 ws = _mm512_loadu_ps(g->wscale + grp * Np + (p + j) * kPanel);
        LOWBIT_UNROLL
        for (int m = 0; m < MR; ++m) {
          const __m512 v = _mm512_cvtepi32_ps(
              _mm512_sub_epi32(_mm512_load_si512(acc + 16 * (m * J + j)), cmp));
          f[m * J + j] = grp == 0 ? _mm512_mul_ps(v, ws) : _mm512_fmadd_ps(v, ws, f[m * J + j]);
        }
      }
    }
  }
  if (MODE == kInt32) return;
  LOWBIT_UNROLL
  for (int j = 0; j < J; ++j) {
    const __mmask16 mask = tail_mask(g, p + j);
    float* c = (float*)g->c + m0 * g->ldc + (p + j) * kPanel;
    const __m512 bias = g->bias ? _mm512_maskz_loadu_ps(mask, g->bias + (p + j) * kPanel)
                                : _mm512_setzero_ps();
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m512 sa = _mm512_set1_ps(g->ascale[m0 + m]);
      const __m512 y = g->bias ? _mm512_fmadd_ps(f[m * J + j], sa, bias) : _mm512_mul_ps(f[m * J + j], sa);
      _mm512_mask_storeu_ps(c + m * g->ldc, mask, y);
    }
  }
}

// Tile shapes: up to 6 rows x 4 panels (24 accumulators); a single row (GEMV) streams 8 panels at
// once for memory-level parallelism; grouped output keeps f[] live across groups, so 4 x 2.
constexpr int kMaxMR = 6, kMaxJ = 8;
using TileFn = void (*)(const GemmArgs*, int64_t, int64_t);

template <int MODE, int MR, int... Js>
constexpr TileFn pick(int j, std::integer_sequence<int, Js...>) {
  TileFn fns[] = {tile<MR, Js + 1, MODE>...};
  return fns[j - 1];
}

template <int MODE>
void run(const GemmArgs* g, int64_t p0, int64_t p1, int max_mr, int max_j) {
  if (g->M == 1) max_j = kMaxJ;
  for (int64_t p = p0; p < p1;) {
    const int j = (int)(p1 - p < max_j ? p1 - p : max_j);
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < max_mr ? g->M - m : max_mr);
      TileFn fn;
      switch (mr) {
        case 1: fn = pick<MODE, 1>(j, std::make_integer_sequence<int, kMaxJ>{}); break;
        case 2: fn = pick<MODE, 2>(j, std::make_integer_sequence<int, 4>{}); break;
        case 3: fn = pick<MODE, 3>(j, std::make_integer_sequence<int, 4>{}); break;
        case 4: fn = pick<MODE, 4>(j, std::make_integer_sequence<int, 4>{}); break;
        case 5: fn = pick<MODE, 5>(j, std::make_integer_sequence<int, 4>{}); break;
        default: fn = pick<MODE, 6>(j, std::make_integer_sequence<int, 4>{}); break;
      }
      fn(g, m, p);
      m += mr;
    }
    p += j;
  }
}

}  // namespace

void gemm_u8s8_f32(const GemmArgs* g, int64_t p0, int64_t p1) {
  if (g->group == g->Kp)
    run<kFloat>(g, p0, p1, kMaxMR, 4);
  else
    run<kFloatGrouped>(g, p0, p1, 4, 2);
}

void gemm_u8s8_i32(const GemmArgs* g, int64_t p0, int64_t p1) { run<kInt32>(g, p0, p1, kMaxMR, 4); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
