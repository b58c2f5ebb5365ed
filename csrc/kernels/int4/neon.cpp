// INT4 nibble pack / unpack, AArch64 NEON: 16 packed bytes per step. LD2 splits the values into
// even (low nibble) and odd (high nibble) elements, ST2 interleaves them back; the tails, and the
// search for a value above 15, go to the reference.
#include <arm_neon.h>
#include "kernels/isa.h"

namespace lowbit {
namespace ref {
int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out);
void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in);
}  // namespace ref

namespace LOWBIT_NS {

int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out) {
  int64_t i = 0;
  for (; i + 16 <= n_bytes_out; i += 16) {
    const uint8x16x2_t v = vld2q_u8(q + 2 * i);
    if (vmaxvq_u8(vorrq_u8(v.val[0], v.val[1])) > 15) break;  // ref reports it
    vst1q_u8(out + i, vorrq_u8(v.val[0], vshlq_n_u8(v.val[1], 4)));
  }
  const int64_t bad = ref::pack_int4(q + 2 * i, out + i, n_bytes_out - i);
  return bad < 0 ? -1 : 2 * i + bad;
}

void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in) {
  int64_t i = 0;
  for (; i + 16 <= n_bytes_in; i += 16) {
    const uint8x16_t v = vld1q_u8(p + i);
    uint8x16x2_t r;
    r.val[0] = vandq_u8(v, vdupq_n_u8(0x0F));
    r.val[1] = vshrq_n_u8(v, 4);
    vst2q_u8(out + 2 * i, r);
  }
  ref::unpack_int4(p + i, out + 2 * i, n_bytes_in - i);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
