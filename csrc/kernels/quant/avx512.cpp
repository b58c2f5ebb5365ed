// Quantizers, AVX-512: 16 floats per step. Same arithmetic as quant/ref.cpp: amax by integer max
// of the |x| bit patterns (NaN/Inf sort above every finite value, so one compare finds them),
// IEEE division by the scale, round-half-even conversion, clamp to [-127, 127].
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

constexpr uint32_t kInfBits = 0x7F800000u;

inline __mmask16 mask_upto(int64_t left) {
  if (left <= 0) return 0;
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// Bit pattern of max |x| over [k0, k1); >= kInfBits when a NaN/Inf is present.
inline uint32_t amax_bits(const float* x, int64_t k0, int64_t k1) {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k += 16) {
    const __m512i v = _mm512_maskz_loadu_epi32(mask_upto(k1 - k), x + k);
    m = _mm512_max_epu32(m, _mm512_and_si512(v, absmask));
  }
  return (uint32_t)_mm512_reduce_max_epu32(m);
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// round-half-even(x / scale) clamped to [-127, 127]; x beyond `left` reads as 0.
// clamp(round(x / scale) + zero, lo, 127), the quotient clamped to +-1024 first (quant/ref.cpp)
inline __m512i quant16(const float* x, int64_t left, __m512 scale, int32_t zero = 0, int32_t lo = -127) {
  const __m512 v = _mm512_maskz_loadu_ps(mask_upto(left), x);
  const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, scale), _mm512_set1_ps(-1024.f)),
                                 _mm512_set1_ps(1024.f));
  const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(zero));
  return _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(lo));
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
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + group; k += 16) {
        __m512i q = _mm512_setzero_si512();
        if (scale != 0.f) q = quant16(row + k, K - k, _mm512_set1_ps(scale));
        const __mmask16 in_group = mask_upto(k0 + group - k);
        q = _mm512_maskz_mov_epi32(in_group, q);
        sum = _mm512_add_epi32(sum, q);
        // 16 int8 = four 4-byte k-steps, each landing in its own 64-byte block of the panel.
        alignas(16) int32_t words[4];
        _mm_store_si128((__m128i*)words, _mm512_cvtepi32_epi8(q));
        for (int s = 0; s < 4 && k + 4 * s < k0 + group; ++s)
          std::memcpy(dst + (k / kKStep + s) * kPanel * kKStep, &words[s], 4);
      }
      scales[g * Np + n] = scale;
      comp[g * Np + n] = 128 * _mm512_reduce_add_epi32(sum);
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
      __m512 vlo = _mm512_set1_ps(row[k0]), vhi = vlo;
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 mask = mask_upto(k1 - k);
        const __m512 v = _mm512_maskz_loadu_ps(mask, row + k);
        vlo = _mm512_mask_min_ps(vlo, mask, vlo, v);
        vhi = _mm512_mask_max_ps(vhi, mask, vhi, v);
      }
      const float lo = _mm512_reduce_min_ps(vlo) + 0.f, hi = _mm512_reduce_max_ps(vhi) + 0.f;
      const uint16_t d16 = _cvtss_sh(mins ? (hi - lo) / 15.f : (-lo > hi ? lo : hi) / -8.f, rnd);
      const uint16_t m16 = mins ? _cvtss_sh(lo, rnd) : 0;
      if ((d16 & 0x7C00) == 0x7C00 || (m16 & 0x7C00) == 0x7C00) {
        *why = 1;
        return n;
      }
      const float d = _cvtsh_ss(d16);
      const __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(_cvtsh_ss(m16));
      const __m512i offset = _mm512_set1_epi32(mins ? 0 : 8);  // symmetric values sit around 8
      for (int64_t k = k0; k < k0 + group; k += 16) {
        const __mmask16 valid = d != 0.f ? mask_upto(K - k) : 0;
        const __m512 v = _mm512_maskz_loadu_ps(valid, row + k);
        __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_sub_ps(v, vm), vd)), offset);
        q = _mm512_mask_blend_epi32(valid, offset, q);
        q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(15)), _mm512_setzero_si512());
        alignas(16) uint8_t bytes[16];
        _mm_store_si128((__m128i*)bytes, _mm512_cvtepi32_epi8(q));
        // each 8 values: bytes 0-3 in the low nibbles, 4-7 in the high nibbles of one 32-bit word
        for (int s = 0; s < 2 && k + 8 * s < k0 + group; ++s) {
          uint32_t lo4, hi4;
          std::memcpy(&lo4, bytes + 8 * s, 4);
          std::memcpy(&hi4, bytes + 8 * s + 4, 4);
          const uint32_t word = lo4 | (hi4 << 4);
          std::memcpy(base + (k / kQ4Step + s) * 64, &word, 4);
        }
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
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t k = 0; k < Kp; k += 16) {
      const __m512i v = _mm512_add_epi32(quant16(row + k, K - k, s, zero, lo), _mm512_set1_epi32(128));
      _mm_mask_storeu_epi8(q + k, mask_upto(Kp - k), _mm512_cvtepi32_epi8(v));
    }
  }
}

// Four 16-lane vectors to their four lane reductions (max or add, both exact on integers), by one
// transposing reduction in place of four.
template <bool Max>
inline __m128i reduce4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  auto op = [](__m512i a, __m512i b) { return Max ? _mm512_max_epu32(a, b) : _mm512_add_epi32(a, b); };
  const __m512i a = op(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i b = op(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i c = op(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));  // per 128 bits
  const __m512i d = op(c, _mm512_shuffle_i32x4(c, c, 0x4E));
  return _mm512_castsi512_si128(op(d, _mm512_shuffle_i32x4(d, d, 0xB1)));
}

void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup, int32_t* bsum, float fixed) {
  const int64_t nblocks = Kp / kActBlock, G = Kp / group;
  const int32_t lo = fixed > 0.f ? -128 : -127;
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * ldx;
    float A = 0.f;
    // the group fold, as quant/ref.cpp: a product first, then fma, in block order (blocks come in
    // order: a count, not a division, finds the groups' ends)
    int64_t in_group = 0, grp = 0;
    auto fold = [&](int64_t b, float scale, int32_t sum) {
      ablock[m * nblocks + b] = scale;
      if (bsum) bsum[m * nblocks + b] = sum;
      A = in_group == 0 ? scale * (float)sum : std::fma(scale, (float)sum, A);
      if (++in_group * kActBlock == group) agroup[m * G + grp++] = A, in_group = 0;
    };
    int64_t b = 0;
    for (; (b + 4) * kActBlock <= K; b += 4) {  // four whole blocks
      const float* at = row + b * kActBlock;
      __m512i mx[4];
      for (int i = 0; i < 4; ++i)
        mx[i] = _mm512_max_epu32(_mm512_and_si512(_mm512_loadu_si512(at + 32 * i), absmask),
                                 _mm512_and_si512(_mm512_loadu_si512(at + 32 * i + 16), absmask));
      const __m128i bits = reduce4<true>(mx[0], mx[1], mx[2], mx[3]);
      const __mmask8 bad = _mm_cmpge_epu32_mask(bits, _mm_set1_epi32((int)kInfBits));
      __m128 sc = fixed > 0.f ? _mm_set1_ps(fixed) : _mm_div_ps(_mm_castsi128_ps(bits), _mm_set1_ps(127.f));
      sc = _mm_mask_mov_ps(sc, bad, _mm_set1_ps(NAN));
      alignas(16) float scale[4];
      _mm_store_ps(scale, sc);
      __m512i sums[4];
      for (int i = 0; i < 4; ++i) {
        __m512i q0 = _mm512_setzero_si512(), q1 = q0;
        if (scale[i] != 0.f && !(bad >> i & 1)) {
          const __m512 s = _mm512_set1_ps(scale[i]);
          q0 = quant16(at + 32 * i, 16, s, 0, lo);
          q1 = quant16(at + 32 * i + 16, 16, s, 0, lo);
        }
        int8_t* dst = q + m * ldq + (b + i) * kActBlock;
        _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(dst + 16), _mm512_cvtepi32_epi8(q1));
        sums[i] = _mm512_add_epi32(q0, q1);
      }
      alignas(16) int32_t sum[4];
      _mm_store_si128((__m128i*)sum, reduce4<false>(sums[0], sums[1], sums[2], sums[3]));
      for (int i = 0; i < 4; ++i) fold(b + i, scale[i], sum[i]);
    }
    for (; b < nblocks; ++b) {
      const int64_t k0 = b * kActBlock;
      const uint32_t bits = amax_bits(row, k0 < K ? k0 : K, k0 + kActBlock < K ? k0 + kActBlock : K);
      const float scale = bits >= kInfBits ? NAN : fixed > 0.f ? fixed : bits_to_float(bits) / 127.f;
      __m512i q0 = _mm512_setzero_si512(), q1 = q0;
      if (scale != 0.f && bits < kInfBits) {
        const __m512 s = _mm512_set1_ps(scale);
        q0 = quant16(row + k0, K - k0, s, 0, lo);
        q1 = quant16(row + k0 + 16, K - k0 - 16, s, 0, lo);
      }
      _mm_storeu_si128((__m128i*)(q + m * ldq + k0), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128((__m128i*)(q + m * ldq + k0 + 16), _mm512_cvtepi32_epi8(q1));
      fold(b, scale, _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
