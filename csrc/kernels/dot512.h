// The AVX-512 VNNI dot step that the int8-activation GEMMs of the 4-bit and block formats share:
// 8 inputs of MR activation rows against J panels of unpacked weights (16 columns x 4 inputs per
// vector: lo holds inputs k..k+3 of each column, hi k+4..k+7).
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

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
