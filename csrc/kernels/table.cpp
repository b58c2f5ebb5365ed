// Compiled once per ISA (see CMakeLists.txt): collects that ISA's kernels into its table.
#include "kernels/isa.h"

#define LOWBIT_STR2(x) #x
#define LOWBIT_STR(x) LOWBIT_STR2(x)

namespace lowbit {
namespace LOWBIT_NS {
extern const Kernels table;
const Kernels table = {
    LOWBIT_STR(LOWBIT_NS), quantize_w8, quantize_w4, quantize_a8, gemm_u8s8_f32, gemm_u8s8_i32,
    gemm_s8f32, gemm_q4a8, gemm_q4f32, quantize_a8_blocks, gemm_blk_a8, gemm_blk_f32, pack_int4, unpack_int4, gelu, silu_mul, mul, layer_norm, softmax,
    attention, dot_peak, stream_read,
};
}  // namespace LOWBIT_NS
}  // namespace lowbit
