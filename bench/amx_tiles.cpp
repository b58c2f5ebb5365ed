// What AMX tiles cost on this CPU, one core: TDPBUSD alone, 1 KB tile loads from L1 and L2 in
// the 2 x 2 blocking of the INT8 GEMM (csrc/kernels/gemm_s8/avx512.cpp: 4 accumulator tiles, 2
// activation and 2 weight tiles a step), and a W4A8-like step (4 TDPBSSD of 32 k, tile stores, the
// float fold of the stored dots), so that a kernel's time can be set against its parts.
// Numbers of a device machine: bench/RESULTS.md. Needs an AMX CPU (exits otherwise):
//
//   g++ -O2 -std=c++17 -Icsrc -DLOWBIT_NS=probe -mavx512f -mavx512bw -mavx512vl -mavx512dq \
//       -mavx512vnni -mamx-tile -mamx-int8 bench/amx_tiles.cpp -o amx_tiles && ./amx_tiles
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/amx.h"

// Tiles 0-3: 16 x 64 B accumulators; 4-5: 16 rows x acols bytes; 6-7: brows x 64 B.
static void config(int acols, int brows) {
  const uint8_t r = (uint8_t)brows;
  const uint16_t a = (uint16_t)acols;
  lowbit::probe::tile_configure({16, 16, 16, 16, 16, 16, r, r}, {64, 64, 64, 64, a, a, 64, 64});
}
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// A: 32 rows (row r of tile t at a + (16t + r) * lda + k) or packed; B: two panels at b, b + ps, tile at b + k*16
template <int ORDER, bool PACKED, bool PREF>
__attribute__((noinline)) void gemm_loop(const uint8_t* a, int64_t lda, const int8_t* b, int64_t ps, int64_t K, int reps) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int r = 0; r < reps; ++r)
    for (int64_t k = 0; k < K; k += 64) {
      const uint8_t* a0 = PACKED ? a + k * 32 : a + k;
      const uint8_t* a1 = PACKED ? a + k * 32 + 1024 : a + 16 * lda + k;
      const int64_t st = PACKED ? 64 : lda;
      if (PREF) {
        for (int l = 0; l < 16; ++l) {
          _mm_prefetch((const char*)(PACKED ? a0 + 2048 + 64 * l : a0 + 64 + l * lda), _MM_HINT_T0);
          _mm_prefetch((const char*)(PACKED ? a1 + 2048 + 64 * l : a1 + 64 + l * lda), _MM_HINT_T0);
        }
      }
      if (ORDER == 0) {
        _tile_loadd(4, a0, st); _tile_loadd(5, a1, st); _tile_loadd(6, b + k * 16, 64); _tile_loadd(7, b + ps + k * 16, 64);
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
      } else if (ORDER == 1) {
        _tile_loadd(6, b + k * 16, 64); _tile_loadd(4, a0, st); _tile_loadd(7, b + ps + k * 16, 64);
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7);
        _tile_loadd(5, a1, st);
        _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
      } else if (ORDER == 2) {  // loads only
        _tile_loadd(4, a0, st); _tile_loadd(5, a1, st); _tile_loadd(6, b + k * 16, 64); _tile_loadd(7, b + ps + k * 16, 64);
      } else if (ORDER == 3) {  // B only reloaded (A fixed)
        _tile_loadd(6, b + k * 16, 64); _tile_loadd(7, b + ps + k * 16, 64);
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
      } else if (ORDER == 4) {  // TDP only
        _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
      }
    }
  alignas(64) static int32_t out[256];
  _tile_stored(0, out, 64); _tile_stored(1, out, 64); _tile_stored(2, out, 64); _tile_stored(3, out, 64);
}

template <int ORDER, bool PACKED, bool PREF>
void run(const char* name, int64_t K, int64_t lda, int reps) {
  std::vector<uint8_t> a((size_t)(32 * (lda > K ? lda : K) + 4096), 1);
  std::vector<int8_t> b((size_t)(32 * K + 4096), 1);
  config(64, 16);
  gemm_loop<ORDER, PACKED, PREF>(a.data(), lda, b.data(), 16 * K, K, 2);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    const double t0 = now();
    gemm_loop<ORDER, PACKED, PREF>(a.data(), lda, b.data(), 16 * K, K, reps);
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  const double tdps = 4.0 * (K / 64) * reps;
  printf("%-34s K=%6lld  %6.2f ns/TDP  %7.0f GMAC/s\n", name, (long long)K, best / tdps * 1e9, tdps * 16384 / best / 1e9);
  _tile_release();
}

// W4A8-like: K=32 TDPs (A 16x32, B 8x64) then tile stores and a float fold of 64 rows, pipelined by one item
template <int MODE>  // 0: tiles only (no stores), 1: tiles + stores, 2: tiles + stores + fold, 3: fold only, 4: tiles+stores+fold, no pipelining
__attribute__((noinline)) void w4_loop(const int8_t* a, int64_t lda, const int8_t* b, int items, float* F) {
  alignas(64) static int32_t dots[2][4][256];
  int buf = 0;
  const __m512 s = _mm512_set1_ps(0.5f), d = _mm512_set1_ps(0.25f);
  auto fold = [&](int bb) {
    for (int t = 0; t < 4; ++t)
      for (int r = 0; r < 16; ++r) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(dots[bb][t] + 16 * r));
        float* f = F + (t * 16 + r) * 16;
        _mm512_store_ps(f, _mm512_fmadd_ps(d, _mm512_mul_ps(v, s), _mm512_load_ps(f)));
      }
  };
  for (int i = 0; i < items; ++i) {
    const int64_t k = (i % 64) * 32;
    if (MODE != 3) {
      _tile_loadd(4, a + k, lda); _tile_loadd(5, a + 16 * lda + k, lda);
      _tile_loadd(6, b + (i % 64) * 512, 64); _tile_loadd(7, b + 65536 + (i % 64) * 512, 64);
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
      if (MODE >= 1) { _tile_stored(0, dots[buf][0], 64); _tile_stored(1, dots[buf][1], 64); _tile_stored(2, dots[buf][2], 64); _tile_stored(3, dots[buf][3], 64); }
    }
    if (MODE == 2 || MODE == 3) fold(buf ^ 1);
    if (MODE == 4) fold(buf);
    buf ^= 1;
  }
}
template <int MODE>
void run_w4(const char* name) {
  const int64_t lda = 2048 + 64;
  std::vector<int8_t> a((size_t)(32 * lda + 4096), 1), b(200000, 1);
  std::vector<float> F(64 * 16 + 64, 0.f);
  float* Fa = (float*)(((uintptr_t)F.data() + 63) & ~(uintptr_t)63);
  config(32, 8);
  const int items = 20000;
  w4_loop<MODE>(a.data(), lda, b.data(), 100, Fa);
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    const double t0 = now();
    w4_loop<MODE>(a.data(), lda, b.data(), items, Fa);
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  printf("%-44s %7.1f ns/item (4 TDP K=32, 65536 MAC)  %6.0f GMAC/s\n", name, best / items * 1e9, items * 65536.0 / best / 1e9);
  _tile_release();
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) {  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    printf("no AMX tiles here (or the OS refuses them)\n");
    return 1;
  }
  for (int64_t K : {256, 8192}) {
    const int64_t lda = K + 64;
    run<4, false, false>("TDP only", K, lda, 2000000 / K);
    run<0, false, false>("order0 (4 loads, 4 TDP) strided A", K, lda, 2000000 / K);
    run<1, false, false>("order1 (interleaved) strided A", K, lda, 2000000 / K);
    run<0, true, false>("order0 packed A", K, lda, 2000000 / K);
    run<1, true, false>("order1 packed A", K, lda, 2000000 / K);
    run<0, false, true>("order0 strided A + prefetch", K, lda, 2000000 / K);
    run<1, true, true>("order1 packed A + prefetch", K, lda, 2000000 / K);
    run<2, false, false>("loads only, strided A", K, lda, 2000000 / K);
    run<2, true, false>("loads only, packed A", K, lda, 2000000 / K);
    run<3, false, false>("B loads + 4 TDP", K, lda, 2000000 / K);
  }
  run_w4<0>("w4: tiles only");
  run_w4<1>("w4: tiles + stores");
  run_w4<2>("w4: tiles + stores + fold (pipelined)");
  run_w4<4>("w4: tiles + stores + fold (same item)");
  run_w4<3>("w4: fold only");
  return 0;
}
