// AMX tile configuration, shared by the kernels compiled for the `amx` set (and its probe).
#pragma once
#ifdef __AMX_INT8__
#include <immintrin.h>
#include <cstdint>

namespace lowbit {
namespace LOWBIT_NS {

// LDTILECFG's 64-byte operand, palette 1.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures tiles 0-7 as rows[t] rows of colsb[t] bytes.
inline void tile_configure(const uint8_t (&rows)[8], const uint16_t (&colsb)[8]) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = rows[t];
    cfg.colsb[t] = colsb[t];
  }
  _tile_loadconfig(&cfg);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
#endif
