// The native float vector of the kernels written once for every ISA (nn.cpp, gemm_w8f32.cpp),
// compiled with each ISA's flags: kN floats in one zmm, ymm or xmm register (plain loops on four
// lanes in the reference set); fmav(a, b, c) = a * b + c rounded once per lane (hardware FMA, or
// the correctly rounded std::fma), so that a computation in lanes gives every ISA the same bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace lowbit {
namespace LOWBIT_NS {
namespace {

#if defined(__AVX512F__)
constexpr int kN = 16;
typedef float vf __attribute__((vector_size(64)));
inline vf fmav(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline vf splat(float f) { return (vf)_mm512_set1_ps(f); }
#elif defined(__FMA__)
constexpr int kN = 8;
typedef float vf __attribute__((vector_size(32)));
inline vf fmav(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
inline vf splat(float f) { return (vf)_mm256_set1_ps(f); }
#elif defined(__ARM_NEON)
constexpr int kN = 4;
typedef float vf __attribute__((vector_size(16)));
inline vf fmav(vf a, vf b, vf c) { return (vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b); }
inline vf splat(float f) { return (vf)vdupq_n_f32(f); }
#else
constexpr int kN = 4;
typedef float vf __attribute__((vector_size(16)));
inline vf fmav(vf a, vf b, vf c) {
  for (int l = 0; l < kN; ++l) c[l] = std::fma(a[l], b[l], c[l]);
  return c;
}
inline vf splat(float f) { return vf{f, f, f, f}; }
#endif
typedef int32_t vi __attribute__((vector_size(sizeof(vf))));
typedef uint32_t vu __attribute__((vector_size(sizeof(vf))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Integer dot products of int8 attention (nn.cpp): kN int32 lanes, each lane 4 bytes.
inline vi loadi(const void* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vi splat4(const void* p) {  // the 4 bytes at p in every lane
  int32_t w;
  std::memcpy(&w, p, 4);
  return vi{} + w;
}

// acc + the dot product of each lane's 4 unsigned bytes of a with the 4 signed bytes of b: exact
// (|sum| <= 4 * 255 * 128 per call) on every ISA, whatever instruction does it.
inline vi dot4(vi acc, vi a, vi b) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#elif defined(__AVXVNNI__)
  return (vi)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)a, (__m256i)b);
#elif defined(__AVX2__)
  // VPMADDUBSW saturates pairs past 32767: a's low 7 bits (at most 2 * 127 * 128) and its top bit
  // (times 128 in VPMADDWD) in two products
  const __m256i u = (__m256i)a, s = (__m256i)b;
  const __m256i low = _mm256_and_si256(u, _mm256_set1_epi8(0x7F));
  const __m256i top = _mm256_and_si256(_mm256_srli_epi16(u, 7), _mm256_set1_epi8(1));
  const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(low, s), _mm256_set1_epi16(1));
  const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(top, s), _mm256_set1_epi16(128));
  return (vi)_mm256_add_epi32((__m256i)acc, _mm256_add_epi32(lo, hi));
#elif defined(__ARM_FEATURE_MATMUL_INT8)
  return (vi)vusdotq_s32((int32x4_t)acc, (uint8x16_t)a, (int8x16_t)b);
#elif defined(__ARM_FEATURE_DOTPROD)
  // a = (a - 128) + 128: a signed dot product and 128 times the sum of b's bytes
  const int8x16_t as = vreinterpretq_s8_u8(veorq_u8((uint8x16_t)a, vdupq_n_u8(0x80)));
  const int32x4_t sum_b = vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(1), (int8x16_t)b);
  return (vi)vaddq_s32(vdotq_s32((int32x4_t)acc, as, (int8x16_t)b), vshlq_n_s32(sum_b, 7));
#else
  uint8_t ab[sizeof(vi)];
  int8_t bb[sizeof(vi)];
  std::memcpy(ab, &a, sizeof ab);
  std::memcpy(bb, &b, sizeof bb);
  for (int l = 0; l < kN; ++l)
    for (int i = 0; i < 4; ++i) acc[l] += (int32_t)ab[4 * l + i] * bb[4 * l + i];
  return acc;
#endif
}

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
