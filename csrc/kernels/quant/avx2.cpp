// Quantizers, AVX2: 8 floats per step, the arithmetic of quant/ref.cpp (see quant/avx512.cpp):
// integer max of |x| bit patterns, IEEE division, round-half-even, clamp to [-127, 127].
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

constexpr uint32_t kInfBits = 0x7F800000u;

inline __m256i lanes_below(int64_t left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 8 ? (left < 0 ? 0 : left) : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline uint32_t amax_bits(const float* x, int64_t k0, int64_t k1) {
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m = _mm256_setzero_si256();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(x + k)), absmask));
  if (k < k1)
    m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_maskload_epi32((const int*)(x + k),
                                                                    lanes_below(k1 - k)),
                                             absmask));
  alignas(32) uint32_t v[8];
  _mm256_store_si256((__m256i*)v, m);
  uint32_t r = 0;
  for (int i = 0; i < 8; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// clamp(round(x / scale) + zero, lo, 127), the quotient clamped to +-1024 first (quant/ref.cpp)
inline __m256i quant8(const float* x, int64_t left, __m256 scale, int32_t zero = 0, int32_t lo = -127) {
  const __m256 v = left >= 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, lanes_below(left));
  const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, scale), _mm256_set1_ps(-1024.f)),
                                 _mm256_set1_ps(1024.f));
  const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(t), _mm256_set1_epi32(zero));
  return _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(lo));
}

// The 8 int32 lanes (each in 0..255 after any offset) narrowed to bytes, in order.
inline void narrow8(__m256i q, uint8_t out[8]) {
  const __m256i w = _mm256_packs_epi32(q, q);     // int16: [0..3 0..3 | 4..7 4..7]
  const __m256i b = _mm256_packus_epi16(w, w);    // for 0..255 this is exact
  const int32_t lo = _mm256_cvtsi256_si32(b), hi = _mm256_cvtsi256_si32(_mm256_permute2x128_si256(b, b, 1));
  std::memcpy(out, &lo, 4);
  std::memcpy(out + 4, &hi, 4);
}

}  // namespace

int64_t quantize_w8(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, int8_t* packed, float* scales, int32_t* comp) {
  const int64_t Np = (N + kPanel - 1) / kPanel * kPanel;
  const int64_t G = Kp / group;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * ldw;
    if (amax_bits(row, 0, K) >= kInfBits) return n;
    int8_t* dst = packed + (n / kPanel * Kp * kPanel) + (n % kPanel) * kKStep;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
      const float scale = bits_to_float(amax_bits(row, k0, k1)) / 127.f;
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + group; k += 8) {
        __m256i q = _mm256_setzero_si256();
        if (scale != 0.f) q = quant8(row + k, K - k, _mm256_set1_ps(scale));
        q = _mm256_and_si256(q, lanes_below(k0 + group - k));
        sum = _mm256_add_epi32(sum, q);
        // bytes via an unsigned detour (+128), back to int8 by xor 0x80
        uint8_t bytes[8];
        narrow8(_mm256_add_epi32(q, _mm256_set1_epi32(128)), bytes);
        for (int s = 0; s < 2 && k + 4 * s < k0 + group; ++s)
          for (int i = 0; i < 4; ++i)
            dst[(k / kKStep + s) * kPanel * kKStep + i] = (int8_t)(bytes[4 * s + i] ^ 0x80);
      }
      alignas(32) int32_t v[8];
      _mm256_store_si256((__m256i*)v, sum);
      int32_t total = 0;
      for (int i = 0; i < 8; ++i) total += v[i];
      scales[g * Np + n] = scale;
      comp[g * Np + n] = 128 * total;
    }
  }
  return -1;
}

int64_t quantize_w4(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales, uint16_t* mins,
                    int* why) {
  const int64_t Np = (N + kPanel - 1) / kPanel * kPanel, G = Kp / group;
  const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * ldw;
    if (amax_bits(row, 0, K) >= kInfBits) {
      *why = 0;
      return n;
    }
    uint8_t* base = packed + n / kPanel * Kp * kQ4Step + n % kPanel * 4;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
      __m256 vlo = _mm256_set1_ps(row[k0]), vhi = vlo;
      for (int64_t k = k0; k < k1; k += 8) {
        // lanes past the end repeat row[k0], which is already in the running min and max
        const __m256i mask = lanes_below(k1 - k);
        const __m256 v = _mm256_blendv_ps(_mm256_set1_ps(row[k0]), _mm256_maskload_ps(row + k, mask),
                                          _mm256_castsi256_ps(mask));
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
      }
      alignas(32) float l8[8], h8[8];
      _mm256_store_ps(l8, vlo);
      _mm256_store_ps(h8, vhi);
      float lo = l8[0], hi = h8[0];
      for (int i = 1; i < 8; ++i) {
        lo = l8[i] < lo ? l8[i] : lo;
        hi = h8[i] > hi ? h8[i] : hi;
      }
      lo += 0.f;
      hi += 0.f;
      const uint16_t d16 = _cvtss_sh(mins ? (hi - lo) / 15.f : (-lo > hi ? lo : hi) / -8.f, rnd);
      const uint16_t m16 = mins ? _cvtss_sh(lo, rnd) : 0;
      if ((d16 & 0x7C00) == 0x7C00 || (m16 & 0x7C00) == 0x7C00) {
        *why = 1;
        return n;
      }
      const float d = _cvtsh_ss(d16);
      const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(_cvtsh_ss(m16));
      const __m256i offset = _mm256_set1_epi32(mins ? 0 : 8);  // symmetric values sit around 8
      for (int64_t k = k0; k < k0 + group; k += 8) {
        const __m256i valid = d != 0.f ? lanes_below(K - k) : _mm256_setzero_si256();
        const __m256 v = _mm256_maskload_ps(row + k, valid);
        __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_sub_ps(v, vm), vd)), offset);
        q = _mm256_blendv_epi8(offset, q, valid);
        q = _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(15)), _mm256_setzero_si256());
        uint8_t bytes[8];
        narrow8(q, bytes);
        uint32_t lo4, hi4;
        std::memcpy(&lo4, bytes, 4);
        std::memcpy(&hi4, bytes + 4, 4);
        const uint32_t word = lo4 | (hi4 << 4);  // bytes 0-3 low nibbles, 4-7 high nibbles
        std::memcpy(base + k / kQ4Step * 64, &word, 4);
      }
      const int64_t at = (n / kPanel * G + g) * kPanel + n % kPanel;  // [Np/16][G][16]
      scales[at] = d16;
      if (mins) mins[at] = m16;
    }
  }
  return -1;
}

void quantize_a8(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                 uint8_t* out, int64_t ldo, float* scales, float fixed, int32_t zero) {
  const int32_t lo = fixed > 0.f ? -128 : -127;
  if (!(fixed > 0.f)) zero = 0;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    uint8_t* q = out + m * ldo;
    const uint32_t bits = amax_bits(row, 0, K);
    const float scale = bits >= kInfBits ? NAN : fixed > 0.f ? fixed : bits_to_float(bits) / 127.f;
    scales[m] = scale;
    if (!(scale != 0.f && bits < kInfBits)) {
      std::memset(q, 128, Kp);
      continue;
    }
    const __m256 s = _mm256_set1_ps(scale);
    int64_t k = 0;
    for (; k + 8 <= Kp; k += 8)
      narrow8(_mm256_add_epi32(quant8(row + k, K - k, s, zero, lo), _mm256_set1_epi32(128)), q + k);
    if (k < Kp) {  // Kp - k == 4
      uint8_t tail[8];
      narrow8(_mm256_add_epi32(quant8(row + k, K - k, s, zero, lo), _mm256_set1_epi32(128)), tail);
      std::memcpy(q + k, tail, (size_t)(Kp - k));
    }
  }
}

void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup, int32_t* bsum, float fixed) {
  const int64_t nblocks = Kp / kActBlock, G = Kp / group;
  const int32_t lo = fixed > 0.f ? -128 : -127;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    float A = 0.f;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t k0 = b * kActBlock;
      const uint32_t bits = amax_bits(row, k0 < K ? k0 : K, k0 + kActBlock < K ? k0 + kActBlock : K);
      const float scale = bits >= kInfBits ? NAN : fixed > 0.f ? fixed : bits_to_float(bits) / 127.f;
      __m256i sum = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        __m256i v = _mm256_setzero_si256();
        if (scale != 0.f && bits < kInfBits) v = quant8(row + k0 + 8 * i, K - k0 - 8 * i, _mm256_set1_ps(scale), 0, lo);
        sum = _mm256_add_epi32(sum, v);
        uint8_t bytes[8];
        narrow8(_mm256_add_epi32(v, _mm256_set1_epi32(128)), bytes);  // via unsigned, as quantize_w8
        for (int t = 0; t < 8; ++t) q[m * ldq + k0 + 8 * i + t] = (int8_t)(bytes[t] ^ 0x80);
      }
      alignas(32) int32_t lanes[8];
      _mm256_store_si256((__m256i*)lanes, sum);
      int32_t total = 0;
      for (int t = 0; t < 8; ++t) total += lanes[t];
      ablock[m * nblocks + b] = scale;
      if (bsum) bsum[m * nblocks + b] = total;
      A = k0 % group == 0 ? scale * (float)total : std::fma(scale, (float)total, A);  // as quant/ref.cpp
      if ((k0 + kActBlock) % group == 0) agroup[m * G + k0 / group] = A;
    }
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
