// Reference INT4 nibble packing: element 2i in the low nibble of byte i, element 2i+1 in the high.
#include "kernels/isa.h"

namespace lowbit {
namespace LOWBIT_NS {

int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out) {
  for (int64_t i = 0; i < n_bytes_out; ++i) {
    const uint8_t lo = q[2 * i], hi = q[2 * i + 1];
    if (lo > 15) return 2 * i;
    if (hi > 15) return 2 * i + 1;
    out[i] = (uint8_t)(lo | (hi << 4));
  }
  return -1;
}

void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in) {
  for (int64_t i = 0; i < n_bytes_in; ++i) {
    out[2 * i] = p[i] & 0x0F;
    out[2 * i + 1] = p[i] >> 4;
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
