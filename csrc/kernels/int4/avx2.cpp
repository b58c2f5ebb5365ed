// INT4 nibble pack / unpack, AVX2: 32 output bytes per step (see int4/avx512.cpp for the trick).
#include <immintrin.h>
#include "kernels/isa.h"

namespace lowbit {
namespace ref {  // the tails (and the search for a bad value) go to the reference
int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out);
void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in);
}  // namespace ref

namespace LOWBIT_NS {

int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out) {
  const __m256i lo_byte = _mm256_set1_epi16(0x00FF);
  int64_t i = 0;
  for (; i + 32 <= n_bytes_out; i += 32) {
    const __m256i v0 = _mm256_loadu_si256((const __m256i*)(q + 2 * i));
    const __m256i v1 = _mm256_loadu_si256((const __m256i*)(q + 2 * i + 32));
    // any byte > 15 has a bit in 0xF0
    if (!_mm256_testz_si256(_mm256_or_si256(v0, v1), _mm256_set1_epi8((char)0xF0))) break;  // ref reports it
    const __m256i w0 = _mm256_and_si256(_mm256_or_si256(v0, _mm256_srli_epi16(v0, 4)), lo_byte);
    const __m256i w1 = _mm256_and_si256(_mm256_or_si256(v1, _mm256_srli_epi16(v1, 4)), lo_byte);
    // packus works within 128-bit lanes; restore the order of the 64-bit quarters
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(w0, w1), 0xD8);
    _mm256_storeu_si256((__m256i*)(out + i), packed);
  }
  const int64_t bad = ref::pack_int4(q + 2 * i, out + i, n_bytes_out - i);
  return bad < 0 ? -1 : 2 * i + bad;
}

void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 32 <= n_bytes_in; i += 32) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(p + i));
    const __m256i lo = _mm256_and_si256(v, nib);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
    // unpack interleaves within 128-bit lanes: lanes (0,1) of the two results hold bytes
    // 0-7 | 16-23 and 8-15 | 24-31, so swap the middle halves when storing.
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
    _mm256_storeu_si256((__m256i*)(out + 2 * i), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256((__m256i*)(out + 2 * i + 32), _mm256_permute2x128_si256(a, b, 0x31));
  }
  ref::unpack_int4(p + i, out + 2 * i, n_bytes_in - i);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
