// Float building blocks of transformer models (lowbit.nn): GELU, LayerNorm / RMSNorm, softmax.
// One source for every ISA, written as plain loops the compiler vectorizes with each ISA's flags.
// Elementwise maths is the same operations on every lane; reductions keep 16 partial sums in a
// fixed order (combined pairwise), so results are bit-identical on every ISA.
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

constexpr int kLanes = 16;

// 16 floats in a GCC vector type: one zmm, two ymm or four xmm depending on the ISA's flags, the
// same operations on every lane either way.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v16 splat(float f) { return v16{} + f; }

// e^x in float32 (relative error ~2e-7): 2^k * e^r with k = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by its degree-7 Taylor polynomial. Below -87.3 (where e^x leaves the normal range): 0.
inline v16 exp16(v16 x) {
  v16 xc = x > 88.f ? splat(88.f) : x;
  xc = xc < -87.f ? splat(-87.f) : xc;
  const v16 k = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest integer
  const v16 r = (xc - k * 0.693145752f) - k * 1.42860677e-6f;  // ln 2 in two parts
  v16 p = splat(1.f / 5040);
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i16v bits = (__builtin_convertvector(k, i16v) + 127) << 23;
  return x < -87.3f ? splat(0.f) : p * (v16)bits;
}

// y[i] = f(x[i]) 16 at a time (the tail through a zero-padded vector); y may be x. Four vectors
// per step: f is a long chain of dependent operations (polynomials, a division), and four
// independent chains keep the FP units busy where one would leave them waiting on latency.
template <class F>
inline void map16(const float* x, float* y, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    const v16 v0 = f(load16(x + i)), v1 = f(load16(x + i + kLanes));
    const v16 v2 = f(load16(x + i + 2 * kLanes)), v3 = f(load16(x + i + 3 * kLanes));
    std::memcpy(y + i, &v0, sizeof v0);
    std::memcpy(y + i + kLanes, &v1, sizeof v1);
    std::memcpy(y + i + 2 * kLanes, &v2, sizeof v2);
    std::memcpy(y + i + 3 * kLanes, &v3, sizeof v3);
  }
  for (; i + kLanes <= n; i += kLanes) {
    const v16 v = f(load16(x + i));
    std::memcpy(y + i, &v, sizeof v);
  }
  if (i < n) {
    v16 v = {};
    std::memcpy(&v, x + i, (size_t)(n - i) * sizeof(float));
    v = f(v);
    std::memcpy(y + i, &v, (size_t)(n - i) * sizeof(float));
  }
}

// Sum of n floats as 16 interleaved partial sums combined pairwise.
inline float sum16(const float* v, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += v[i];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

inline float sq_sum16(const float* v, float mean, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += (v[i + l] - mean) * (v[i + l] - mean);
  for (int l = 0; i < n; ++i, ++l) acc[l] += (v[i] - mean) * (v[i] - mean);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

inline float max_of(const float* v, int64_t n) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = v[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = v[i + l] > m[l] ? v[i + l] : m[l];
  for (int l = 0; i < n; ++i, ++l) m[l] = v[i] > m[l] ? v[i] : m[l];
  float r = m[0];
  for (int l = 1; l < kLanes; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

}  // namespace

void gelu(const float* x, float* y, int64_t n) {
  // x * Phi(x) = max(x, 0) - |x| * erfc(|x| / sqrt 2) / 2, erfc by Abramowitz & Stegun 7.1.26
  // (|error| <= 1.5e-7): erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-a^2), t = 1/(1+pa)
  map16(x, y, n, [](v16 v) {
    const v16 av = v < 0.f ? -v : v;
    const v16 a = av * 0.707106781f;
    const v16 t = 1.f / (a * 0.3275911f + 1.f);
    v16 p = splat(1.061405429f);
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    const v16 half_erfc = (p * t) * 0.5f * exp16(-(a * a));
    return (v > 0.f ? v : splat(0.f)) - av * half_erfc;
  });
}

void layer_norm(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                float eps, bool rms, int64_t rows, int64_t n, float* y) {
  for (int64_t m = 0; m < rows; ++m) {
    float* out = y + m * n;
    const float* in = x + m * ld;
    if (r) {
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] + r[m * n + i];
      in = out;
    }
    const float mean = rms ? 0.f : sum16(in, n) / (float)n;
    const float inv = 1.f / __builtin_sqrtf(sq_sum16(in, mean, n) / (float)n + eps);
    if (rms)
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] * inv * w[i];
    else
      for (int64_t i = 0; i < n; ++i) out[i] = (in[i] - mean) * inv * w[i] + b[i];
  }
}

void softmax(float* x, int64_t rows, int64_t n) {
  for (int64_t m = 0; m < rows; ++m) {
    float* v = x + m * n;
    const float mx = max_of(v, n);
    map16(v, v, n, [mx](v16 e) { return exp16(e - mx); });
    const float inv = 1.f / sum16(v, n);
    for (int64_t i = 0; i < n; ++i) v[i] *= inv;
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
