// INT8 GEMM, AVX2 (and AVX-VNNI when compiled with -mavxvnni): u8 activations x s8 packed weights.
// AVX-VNNI: one VPDPBUSD per 8 columns x 4 k. Plain AVX2: weights widened to int16 (VPMOVSXBW) and
// multiplied by the activations widened likewise with VPMADDWD into int32 pair sums, so nothing
// saturates (VPMADDUBSW would: 255*127*2 > 32767); pairs are folded to columns once per group.
#include <immintrin.h>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

enum Mode { kInt32, kFloat, kFloatGrouped };

#ifdef __AVXVNNI__
constexpr int kAcc = 2;  // per panel: columns 0-7, 8-15
constexpr int kMaxMR = 6, kMaxJ1 = 4;
#else
constexpr int kAcc = 4;  // per panel: columns 4q..4q+3 as (k0k1, k2k3) pair sums
constexpr int kMaxMR = 2, kMaxJ1 = 2;
#endif

inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m256i lanes_below(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? (left < 0 ? 0 : left) : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

// The exact int32 dots of an MR x (J panels) tile over `steps` k-steps, stored to out[MR*J][16]
// in column order. Kept apart from the epilogue with 1-D accumulators: the form GCC keeps in
// registers (see gemm_s8/avx512.cpp).
template <int MR, int J>
__attribute__((noinline)) void dots(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ps,
                                    int64_t steps, int32_t* out) {
  __m256i acc[MR * J * kAcc];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J * kAcc; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
#ifdef __AVXVNNI__
    __m256i bv[J * 2];
    LOWBIT_UNROLL
    for (int i = 0; i < J * 2; ++i)
      bv[i] = _mm256_loadu_si256((const __m256i*)(b + (i / 2) * ps + s * 64 + 32 * (i % 2)));
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m) {
      const __m256i av = _mm256_set1_epi32(load4(a + m * lda + s * kKStep));
      LOWBIT_UNROLL
      for (int i = 0; i < J * 2; ++i)
        acc[m * J * 2 + i] = _mm256_dpbusd_avx_epi32(acc[m * J * 2 + i], av, bv[i]);
    }
#else
    __m256i av[MR];
    LOWBIT_UNROLL
    for (int m = 0; m < MR; ++m)
      av[m] = _mm256_cvtepu8_epi16(_mm_set1_epi32(load4(a + m * lda + s * kKStep)));
    LOWBIT_UNROLL
    for (int i = 0; i < J * 4; ++i) {
      const __m256i bq = _mm256_cvtepi8_epi16(
          _mm_loadu_si128((const __m128i*)(b + (i / 4) * ps + s * 64 + 16 * (i % 4))));
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m)
        acc[m * J * 4 + i] = _mm256_add_epi32(acc[m * J * 4 + i], _mm256_madd_epi16(bq, av[m]));
    }
#endif
  }
  LOWBIT_UNROLL
  for (int t = 0; t < MR * J; ++t)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) {
#ifdef __AVXVNNI__
      const __m256i cols = acc[t * 2 + h];
#else
      // pair sums (k0k1, k2k3) of columns 4q..4q+3 -> columns 8h..8h+7
      const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
      const __m256i cols = _mm256_permutevar8x32_epi32(
          _mm256_hadd_epi32(acc[t * 4 + 2 * h], acc[t * 4 + 2 * h + 1]), order);
#endif
      _mm256_store_si256((__m256i*)(out + 16 * t + 8 * h), cols);
    }
}

template <int MR, int J, int MODE>
void tile(const GemmArgs* g, int64_t m0, int64_t p) {
  const int64_t ps = g->Kp * kPanel;
  const int64_t group = g->group, Np = g->Np;
  const int64_t G = MODE == kFloatGrouped ? g->Kp / group : 1;
  alignas(32) int32_t acc[MR * J * 16];
  __m256 f[MR * J * 2];
  for (int64_t grp = 0; grp < G; ++grp) {
    dots<MR, J>(g->a + m0 * g->lda + grp * group, g->lda, g->b + p * ps + grp * group * kPanel,
                ps, group / kKStep, acc);
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j)
      LOWBIT_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int64_t col = (p + j) * kPanel + 8 * h;
        const __m256i cmp = _mm256_loadu_si256((const __m256i*)(g->comp + grp * Np + col));
        if (MODE == kInt32) {
          const __m256i mask = lanes_below(g->N - col);
          int32_t* c = (int32_t*)g->c + m0 * g->ldc + col;
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m) {
            const __m256i v = _mm256_load_si256((const __m256i*)(acc + 16 * (m * J + j) + 8 * h));
            _mm256_maskstore_epi32(c + m * g->ldc, mask, _mm256_sub_epi32(v, cmp));
          }
        } else {
          const __m256 ws = _mm256_loadu_ps(g->wscale + grp * Np + col);
          LOWBIT_UNROLL
          for (int m = 0; m < MR; ++m) {
            const __m256i iv = _mm256_load_si256((const __m256i*)(acc + 16 * (m * J + j) + 8 * h));
            const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(iv, cmp));
            __m256& fv = f[(m * J + j) * 2 + h];
            fv = grp == 0 ? _mm256_mul_ps(v, ws) : _mm256_fmadd_ps(v, ws, fv);
          }
        }
      }
  }
  if (MODE == kInt32) return;
  LOWBIT_UNROLL
  for (int j = 0; j < J; ++j)
    LOWBIT_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t col = (p + j) * kPanel + 8 * h;
      const __m256i mask = lanes_below(g->N - col);
      float* c = (float*)g->c + m0 * g->ldc + col;
      const __m256 bias = g->bias ? _mm256_maskload_ps(g->bias + col, mask) : _mm256_setzero_ps();
      LOWBIT_UNROLL
      for (int m = 0; m < MR; ++m) {
        const __m256 sa = _mm256_set1_ps(g->ascale[m0 + m]);
        const __m256 fv = f[(m * J + j) * 2 + h];
        const __m256 y = g->bias ? _mm256_fmadd_ps(fv, sa, bias) : _mm256_mul_ps(fv, sa);
        _mm256_maskstore_ps(c + m * g->ldc, mask, y);
      }
    }
}

using TileFn = void (*)(const GemmArgs*, int64_t, int64_t);

template <int MODE>
TileFn pick(int mr, int j) {
  if (mr == 1) {
    static const TileFn one_row[] = {tile<1, 1, MODE>, tile<1, 2, MODE>, tile<1, 3, MODE>,
                                     tile<1, 4, MODE>};
    return one_row[j - 1];
  }
#ifdef __AVXVNNI__
  static const TileFn rows[] = {tile<2, 1, MODE>, tile<3, 1, MODE>, tile<4, 1, MODE>,
                                tile<5, 1, MODE>, tile<6, 1, MODE>};
#else
  static const TileFn rows[] = {tile<2, 1, MODE>};
#endif
  return rows[mr - 2];
}

// A single row streams several panels at once (more independent accumulator chains); several
// rows use one panel at a time and reuse each weight load MR times.
template <int MODE>
void run(const GemmArgs* g, int64_t p0, int64_t p1, int max_mr) {
  const int max_j = g->M == 1 ? kMaxJ1 : 1;
  for (int64_t p = p0; p < p1;) {
    const int j = (int)(p1 - p < max_j ? p1 - p : max_j);
    for (int64_t m = 0; m < g->M;) {
      const int mr = (int)(g->M - m < max_mr ? g->M - m : max_mr);
      pick<MODE>(mr, j)(g, m, p);
      m += mr;
    }
    p += j;
  }
}

}  // namespace

void gemm_u8s8_f32(const GemmArgs* g, int64_t p0, int64_t p1) {
  if (g->group == g->Kp)
    run<kFloat>(g, p0, p1, kMaxMR);
  else
    run<kFloatGrouped>(g, p0, p1, kMaxMR > 4 ? 4 : 2);
}

void gemm_u8s8_i32(const GemmArgs* g, int64_t p0, int64_t p1) { run<kInt32>(g, p0, p1, kMaxMR); }

}  // namespace LOWBIT_NS
}  // namespace lowbit
