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

}  // namespace
}  // namespace LOWBIT_NS
}  // namespace lowbit
