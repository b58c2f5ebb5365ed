// Pieces the AVX-512 VNNI GEMMs share: the dot step of the int8-activation GEMMs of the 4-bit and
// block formats (8 inputs of MR activation rows against J panels of unpacked weights, 16 columns x
// 4 inputs per vector: lo holds inputs k..k+3 of each column, hi k+4..k+7), and the write
// prefetch of a tile's output.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace lowbit {
namespace LOWBIT_NS {
namespace {

// 4 activation bytes at p in every 32-bit lane.
inline __m512i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[m * J + j] += dot of row m's inputs k..k+7 (at a + m * lda + k, signed) with lo[j], hi[j]
// (unsigned): two VPDPBUSD per row and panel, each row's activations broadcast once.
template <int MR, int J>
__attribute__((always_inline)) inline void dot8(__m512i* acc, const __m512i* lo, const __m512i* hi,
                                                const int8_t* a, int64_t lda, int64_t k) {
  _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) {
    const __m512i alo = bcast4(a + m * lda + k), ahi = bcast4(a + m * lda + k + 4);
    _Pragma("GCC unroll 32") for (int j = 0; j < J; ++j) {
      acc[m * J + j] = _mm512_dpbusd_epi32(acc[m * J + j], lo[j], alo);
      acc[m * J + j] = _mm512_dpbusd_epi32(acc[m * J + j], hi[j], ahi);
    }
  }
}

// Asks for the lines of a tile's float32 output, rows x panels of 16 columns from c (rows ld
// floats apart), for writing (PREFETCHW; the AVX-512 sets are built with -mprfchw), long before
// the tile stores them. Outputs of thousands of rows lie beyond the caches, and each store would
// miss and wait for its line: MiniLM's 4096-row layers ran 5-14% (int8) and 16-25% (W4A8) faster
// with it (Zen 4, 2 threads). A tile's lines at a time: a 48-row block's at once, more than the
// miss queue holds, gained only 2-3%. Forced inline: GCC deletes calls to a function whose only
// effect is a prefetch (see stream.h).
__attribute__((always_inline)) inline void prefetch_for_write(const float* c, int64_t ld, int rows, int panels) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < panels; ++j) __builtin_prefetch(c + r * ld + j * 16, 1, 3);
}

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
