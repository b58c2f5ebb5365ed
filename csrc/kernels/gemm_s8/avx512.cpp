// INT8 GEMM, AVX-512 VNNI: u8 activations x s8 packed weights (kernels.h layout).
// Tile: MR rows x J panels of 16 columns; per 4-k step, J 64-byte weight loads, MR 4-byte
// broadcasts, MR*J VPDPBUSD. The +128 activation offset is removed with the per-group column sums.
#include <immintrin.h>
#include <cstring>
#include <utility>
#include "kernels/isa.h"
#include "kernels/dot512.h"
#include "kernels/stream.h"
#include "kernels/amx.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

enum Mode { kInt32, kFloat, kFloatGrouped };

inline __mmask16 tail_mask(const GemmArgs* g, int64_t panel) {
  const int64_t left = g->N - panel * kPanel;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// The exact int32 dots of an MR x (J panels) tile over `steps` k-steps, stored to (or, ACCUM,
// added to) out[MR*J][16].
// Kept apart from the epilogue, with 1-D accumulators under explicit unroll pragmas: that is the
// form GCC keeps in registers (fused with the epilogue, it shuffles and spills them every k-step).
#define LOWBIT_UNROLL _Pragma("GCC unroll 32")

template <int MR, int J, bool STREAM, bool ACCUM = false>
__attribute__((noinline)) void dots(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ps,
                                    int64_t steps, int32_t* out) {
  __m512i acc[MR * J];
  LOWBIT_UNROLL
  for (int i = 0; i < MR * J; ++i)
    acc[i] = ACCUM ? _mm512_load_si512(out + 16 * i) : _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i bv[J];
    LOWBIT_UNROLL
    for (int j = 0; j < J; ++j) bv[j] = _mm512_loadu_si512(b + j * ps + s * 64);
    if (STREAM) {  // GEMV-like: ask for the weights well ahead of use, into L2 (stream.h)
      LOWBIT_UNROLL
      for (int j = 0; j < J; ++j) prefetch_line(b + j * ps + s * 64 + 2048);
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

// Few rows (GEMV-like: the weights stream through once) and grouped output: tile by tile, over the
// whole of K.
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

// Many rows, one group: K in blocks of kKc, a 4-panel weight block (kKc * 64 bytes) and kMc rows of
// activations (kKc * 48 bytes) that stay in L2 while every row tile reuses them; int32 partial sums
// wait in acc. Blocks of 256 k, which kept a block in L1, were slower: their row tiles' dot loops
// were short, and the partial sums went to memory and back every 256 k. With 4096 (Zen 4, 2
// threads, best of 11 interleaved calls) GEMMs with K of 2048 to 11008 ran 8-14% faster (128 x
// 4096 x 4096: 359-366 -> 398-412 GMAC/s), MiniLM's K = 384 / 1536 layers within 5%.
constexpr int64_t kKc = 4096, kMc = 48;
using DotsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*);

template <bool ACCUM, int MR, int... Js>
constexpr DotsFn pick_dots(int j, std::integer_sequence<int, Js...>) {
  DotsFn fns[] = {dots<MR, Js + 1, false, ACCUM>...};
  return fns[j - 1];
}

template <bool ACCUM>
DotsFn dots_for(int mr, int j) {
  switch (mr) {
    case 1: return pick_dots<ACCUM, 1>(j, std::make_integer_sequence<int, 4>{});
    case 2: return pick_dots<ACCUM, 2>(j, std::make_integer_sequence<int, 4>{});
    case 3: return pick_dots<ACCUM, 3>(j, std::make_integer_sequence<int, 4>{});
    case 4: return pick_dots<ACCUM, 4>(j, std::make_integer_sequence<int, 4>{});
    case 5: return pick_dots<ACCUM, 5>(j, std::make_integer_sequence<int, 4>{});
    default: return pick_dots<ACCUM, 6>(j, std::make_integer_sequence<int, 4>{});
  }
}

// Rows [m0, m0 + rows) x panels [p, p + J) from exact int32 sums (one group): row m's panel j at
// acc + m * ld + 16 * j.
template <int MODE>
void epilogue(const GemmArgs* g, int64_t m0, int64_t rows, int64_t p, int J, const int32_t* acc,
              int64_t ld) {
  for (int j = 0; j < J; ++j) {
    const int64_t col = (p + j) * kPanel;
    const __mmask16 mask = tail_mask(g, p + j);
    const __m512i cmp = _mm512_loadu_si512(g->comp + col);
    if (MODE == kInt32) {
      for (int64_t m = 0; m < rows; ++m)
        _mm512_mask_storeu_epi32((int32_t*)g->c + (m0 + m) * g->ldc + col, mask,
                                 _mm512_sub_epi32(_mm512_load_si512(acc + m * ld + 16 * j), cmp));
      continue;
    }
    const __m512 ws = _mm512_loadu_ps(g->wscale + col);
    const __m512 bias = g->bias ? _mm512_maskz_loadu_ps(mask, g->bias + col) : _mm512_setzero_ps();
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 f = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + m * ld + 16 * j), cmp)), ws);
      const __m512 sa = _mm512_set1_ps(g->ascale[m0 + m]);
      const __m512 y = g->bias ? _mm512_fmadd_ps(f, sa, bias) : _mm512_mul_ps(f, sa);
      _mm512_mask_storeu_ps((float*)g->c + (m0 + m) * g->ldc + col, mask, y);
    }
  }
}

template <int MODE>
void run_kblocked(const GemmArgs* g, int64_t p0, int64_t p1) {
  const int64_t ps = g->Kp * kPanel;
  alignas(64) int32_t acc[kMc * 4 * 16];
  for (int64_t p = p0; p < p1;) {
    // the fewest tiles of at most 4 panels, of equal width (9 panels: 3 + 3 + 3, not 4 + 4 + 1)
    const int64_t left = p1 - p, tiles = (left + 3) / 4;
    const int j = (int)((left + tiles - 1) / tiles);
    for (int64_t mc = 0; mc < g->M; mc += kMc) {
      const int64_t rows = g->M - mc < kMc ? g->M - mc : kMc;
      for (int64_t kc = 0; kc < g->Kp; kc += kKc) {
        const int64_t steps = (g->Kp - kc < kKc ? g->Kp - kc : kKc) / kKStep;
        for (int64_t m = 0; m < rows; m += kMaxMR) {
          const int mr = (int)(rows - m < kMaxMR ? rows - m : kMaxMR);
          if (kc == 0)  // (int32 or float32 outputs: 4 bytes either way)
            prefetch_for_write((const float*)g->c + (mc + m) * g->ldc + p * kPanel, g->ldc, mr, j);
          (kc ? dots_for<true>(mr, j) : dots_for<false>(mr, j))(
              g->a + (mc + m) * g->lda + kc, g->lda, g->b + p * ps + kc * kPanel, ps, steps,
              acc + m * j * 16);
        }
      }
      epilogue<MODE>(g, mc, rows, p, j, acc, j * 16);
    }
    p += j;
  }
}

#ifdef __AMX_INT8__
// AMX: TDPBUSD on 16x64-byte tiles. A tile = 16 rows x 64 k (u8, stride lda); B tile = 16 k-steps
// of one panel, i.e. 16 consecutive 64-byte blocks of the packed layout (16 columns x 4 k each):
// the packed panels are AMX B tiles as they stand. Blocks of 32 rows x 2 panels use all 8 tiles
// (C 0-3, A 4-5, B 6-7); the K tail beyond the last full 64 goes through dots<> into the same
// int32 sums, so results are exact and equal to every other ISA's.
//
// What bounds it is the tile loads, one per TDPBUSD: on a Sapphire Rapids class Xeon (device
// machine, bench/RESULTS.md) a TDPBUSD takes 5.5 ns, a 1 KB tile load 7.3 ns from L1 and about
// 21 ns from L2. Passes of kAmxPassRows rows take each panel pair across all their 32-row blocks
// (the pair's weights then come from L2, not memory, after the first block), and every step
// prefetches the activation lines of the next one.
constexpr int64_t kAmxPassRows = 128;

// out[32][32] = exact dots of rows [0, 32) of `a` with panels p, p+1 (at b, b + ps) over [0, Kp).
// STREAM: the weights come from memory, so each step also fetches the next step's weight lines.
template <bool STREAM>
void amx_block(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ps, int64_t Kp, int32_t* out) {
  const int64_t k64 = Kp / 64 * 64;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < k64; k += 64) {
    if (STREAM)
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch((const char*)(b + (k + 64) * kPanel + 64 * l), _MM_HINT_T0);
        _mm_prefetch((const char*)(b + ps + (k + 64) * kPanel + 64 * l), _MM_HINT_T0);
      }
    for (int r = 0; r < 32; ++r) _mm_prefetch((const char*)(a + r * lda + k + 64), _MM_HINT_T0);
    _tile_loadd(4, a + k, lda);
    _tile_loadd(5, a + 16 * lda + k, lda);
    _tile_loadd(6, b + k * kPanel, 64);
    _tile_loadd(7, b + ps + k * kPanel, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 16, 128);
  _tile_stored(2, out + 16 * 32, 128);
  _tile_stored(3, out + 16 * 32 + 16, 128);
  if (k64 < Kp)
    for (int m = 0; m < 32; m += 4)
      dots<4, 2, false, true>(a + m * lda + k64, lda, b + k64 * kPanel, ps, (Kp - k64) / kKStep,
                              out + m * 32);
}

// Reads whole 32-row blocks of `a` (ops.cpp's activation_buffer pads calls of kAmxMinRows rows or
// more to a multiple of 32 rows).
template <int MODE>
void amx_run(const GemmArgs* g, int64_t p0, int64_t p1) {
  const int64_t ps = g->Kp * kPanel;
  alignas(64) int32_t acc[32 * 32];
  tile_configure({16, 16, 16, 16, 16, 16, 16, 16}, {64, 64, 64, 64, 64, 64, 64, 64});
  for (int64_t mc = 0; mc < g->M; mc += kAmxPassRows) {
    const int64_t pass = g->M - mc < kAmxPassRows ? g->M - mc : kAmxPassRows;
    for (int64_t p = p0; p < p1; p += 2) {
      const int np = p + 1 < p1 ? 2 : 1;  // a lone last panel: its partner's columns are not stored
      const int8_t* b = g->b + p * ps;
      const int64_t ps2 = np == 2 ? ps : 0;  // with one panel left, read panel p twice
      for (int64_t r = 0; r < pass; r += 32) {
        const uint8_t* a = g->a + (mc + r) * g->lda;
        r == 0 ? amx_block<true>(a, g->lda, b, ps2, g->Kp, acc) : amx_block<false>(a, g->lda, b, ps2, g->Kp, acc);
        epilogue<MODE>(g, mc + r, pass - r < 32 ? pass - r : 32, p, np, acc, 32);
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

void gemm_u8s8_f32(const GemmArgs* g, int64_t p0, int64_t p1) {
#ifdef __AMX_INT8__
  if (g->group == g->Kp && g->M >= kAmxMinRows) return amx_run<kFloat>(g, p0, p1);
#endif
  if (g->group != g->Kp)
    run<kFloatGrouped>(g, p0, p1, 4, 2);
  else if (g->M <= 4)
    run<kFloat>(g, p0, p1, kMaxMR, 4);
  else
    run_kblocked<kFloat>(g, p0, p1);
}

void gemm_u8s8_i32(const GemmArgs* g, int64_t p0, int64_t p1) {
#ifdef __AMX_INT8__
  if (g->M >= kAmxMinRows) return amx_run<kInt32>(g, p0, p1);
#endif
  if (g->M <= 4)
    run<kInt32>(g, p0, p1, kMaxMR, 4);
  else
    run_kblocked<kInt32>(g, p0, p1);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
