// AMX tiles emulated in C, so that the `amx` kernel set's logic can be checked on CPUs without
// AMX (tests/native/run.sh builds kernel_check a second time with this header forced into every
// source and LOWBIT_EMULATE_AMX defined, which makes dispatch.cpp report the set usable). It
// models what the kernels use of palette 1: eight tiles of up to 16 rows x 64 bytes shaped by
// LDTILECFG (which zeroes them), row-strided loads and stores of colsb bytes, and the four byte
// dot products (C[m][n] += sum over k-quads and i < 4 of A[m][4 kq + i] * B[kq][4 n + i], int32
// wrapping, with each operand's signedness). What the hardware rejects with #UD (a bad
// configuration, an unconfigured tile, dot product shapes that do not fit, any use after
// TILERELEASE) aborts with a message, so that it shows here rather than on the first AMX CPU.
// Speed is of no concern; timings need the real thing.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud

struct LowbitEmulatedTiles {
  bool configured;
  uint8_t rows[8];
  uint16_t colsb[8];
  alignas(64) uint8_t data[8][16 * 64];
};
// (inline: one state per thread for the whole program, whichever source file touches it)
inline thread_local LowbitEmulatedTiles lowbit_tiles;

inline void lowbit_tile_fault(const char* what, int t) {
  std::fprintf(stderr, "amx_emu: %s (tile %d): the hardware would raise #UD\n", what, t);
  std::abort();
}
inline void lowbit_tile_check(int t) {
  if (t < 0 || t > 7) lowbit_tile_fault("no such tile", t);
  if (!lowbit_tiles.configured) lowbit_tile_fault("tiles not configured, or released", t);
  if (!lowbit_tiles.rows[t] || !lowbit_tiles.colsb[t]) lowbit_tile_fault("tile not configured", t);
}
inline void lowbit_tile_config(const void* cfg) {
  const uint8_t* c = (const uint8_t*)cfg;  // palette, start row, 14 reserved, colsb[16], rows[16]
  if (c[0] != 1) lowbit_tile_fault("palette other than 1", -1);
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&lowbit_tiles.colsb[t], c + 16 + 2 * t, 2);
    lowbit_tiles.rows[t] = c[48 + t];
    if (lowbit_tiles.rows[t] > 16 || lowbit_tiles.colsb[t] > 64 || lowbit_tiles.colsb[t] % 4)
      lowbit_tile_fault("shape beyond 16 rows x 64 bytes", t);
  }
  lowbit_tiles.configured = true;
  std::memset(lowbit_tiles.data, 0, sizeof lowbit_tiles.data);
}
inline void lowbit_tile_release() { lowbit_tiles.configured = false; }
inline void lowbit_tile_load(int t, const void* base, long stride) {
  lowbit_tile_check(t);
  std::memset(lowbit_tiles.data[t], 0, sizeof lowbit_tiles.data[t]);
  for (int r = 0; r < lowbit_tiles.rows[t]; ++r)
    std::memcpy(lowbit_tiles.data[t] + 64 * r, (const char*)base + r * stride, lowbit_tiles.colsb[t]);
}
inline void lowbit_tile_store(int t, void* base, long stride) {
  lowbit_tile_check(t);
  for (int r = 0; r < lowbit_tiles.rows[t]; ++r)
    std::memcpy((char*)base + r * stride, lowbit_tiles.data[t] + 64 * r, lowbit_tiles.colsb[t]);
}
inline void lowbit_tile_zero(int t) {
  lowbit_tile_check(t);
  std::memset(lowbit_tiles.data[t], 0, sizeof lowbit_tiles.data[t]);
}
template <class A, class B>
inline void lowbit_tile_dot(int c, int a, int b) {
  lowbit_tile_check(c), lowbit_tile_check(a), lowbit_tile_check(b);
  if (c == a || c == b || a == b) lowbit_tile_fault("a tile used twice in one dot product", c);
  const LowbitEmulatedTiles& T = lowbit_tiles;
  if (T.rows[c] != T.rows[a] || T.colsb[c] != T.colsb[b] || T.colsb[a] != 4 * T.rows[b])
    lowbit_tile_fault("dot product shapes do not fit", c);
  for (int m = 0; m < T.rows[a]; ++m)
    for (int n = 0; n < T.colsb[c] / 4; ++n) {
      uint32_t s;  // (unsigned: the hardware's sums wrap)
      std::memcpy(&s, T.data[c] + 64 * m + 4 * n, 4);
      for (int kq = 0; kq < T.colsb[a] / 4; ++kq)
        for (int i = 0; i < 4; ++i)
          s += (uint32_t)((int32_t)(A)T.data[a][64 * m + 4 * kq + i] * (int32_t)(B)T.data[b][64 * kq + 4 * n + i]);
      std::memcpy(lowbit_tiles.data[c] + 64 * m + 4 * n, &s, 4);
    }
}

#define _tile_loadconfig(cfg) lowbit_tile_config(cfg)
#define _tile_release() lowbit_tile_release()
#define _tile_loadd(T, base, stride) lowbit_tile_load(T, base, stride)
#define _tile_stream_loadd(T, base, stride) lowbit_tile_load(T, base, stride)
#define _tile_stored(T, base, stride) lowbit_tile_store(T, base, stride)
#define _tile_zero(T) lowbit_tile_zero(T)
#define _tile_dpbssd(C, A, B) lowbit_tile_dot<int8_t, int8_t>(C, A, B)
#define _tile_dpbsud(C, A, B) lowbit_tile_dot<int8_t, uint8_t>(C, A, B)
#define _tile_dpbusd(C, A, B) lowbit_tile_dot<uint8_t, int8_t>(C, A, B)
#define _tile_dpbuud(C, A, B) lowbit_tile_dot<uint8_t, uint8_t>(C, A, B)
