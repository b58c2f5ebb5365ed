// INT4 nibble pack / unpack, AVX-512BW: 64 output bytes per step.
// pack: even bytes | odd bytes << 4 (the odd byte shifted within its 16-bit lane, then narrowed);
// unpack: AND 0x0F and shift-4 give the two nibble streams, interleaved back with unpacklo/hi.
#include <immintrin.h>
#include "kernels/isa.h"

namespace lowbit {
namespace ref {  // the tails (and the search for a bad value) go to the reference
int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out);
void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in);
}  // namespace ref

namespace LOWBIT_NS {

int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out) {
  const __m512i hi_limit = _mm512_set1_epi8(15);
  int64_t i = 0;
  for (; i + 32 <= n_bytes_out; i += 32) {
    const __m512i v = _mm512_loadu_si512(q + 2 * i);
    if (_mm512_cmpgt_epu8_mask(v, hi_limit)) break;  // the reference finds and reports it
    // each 16-bit lane holds (lo, hi): lo | hi << 4 lands in the lane's low byte
    const __m512i w = _mm512_or_si512(v, _mm512_srli_epi16(v, 4));
    _mm256_storeu_si256((__m256i*)(out + i), _mm512_cvtepi16_epi8(w));
  }
  const int64_t bad = ref::pack_int4(q + 2 * i, out + i, n_bytes_out - i);
  return bad < 0 ? -1 : 2 * i + bad;
}

void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in) {
  int64_t i = 0;
  for (; i + 32 <= n_bytes_in; i += 32) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + i)));
    // low byte of each 16-bit lane: low nibble; high byte: high nibble
    const __m512i w = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi16(0x0F)),
                                      _mm512_slli_epi16(_mm512_srli_epi16(v, 4), 8));
    _mm512_storeu_si512(out + 2 * i, w);
  }
  ref::unpack_int4(p + i, out + 2 * i, n_bytes_in - i);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
