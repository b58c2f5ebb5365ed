// Included by every ISA source: opens namespace lowbit::<isa> (LOWBIT_NS is set per ISA by CMake)
// and declares the functions that table.cpp collects. Helpers in ISA files stay `static` so that
// no copy compiled with one ISA's flags can be picked by the linker for another.
#pragma once
#include <cstdint>
#include "kernels.h"

#ifndef LOWBIT_NS
#error "LOWBIT_NS must name the ISA namespace"
#endif

namespace lowbit {
namespace LOWBIT_NS {
int64_t quantize_w8(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, int8_t* packed, float* scales, int32_t* comp);
int64_t quantize_w4(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp, int64_t group,
                    int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales, uint16_t* mins,
                    int* why);
void quantize_a8(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                 uint8_t* out, int64_t ldo, float* scales, float fixed, int32_t zero);
void gemm_u8s8_f32(const GemmArgs* args, int64_t p0, int64_t p1);
void gemm_u8s8_i32(const GemmArgs* args, int64_t p0, int64_t p1);
void gemm_s8f32(const GemmArgs* args, int64_t p0, int64_t p1);
void gemm_q4a8(const Q4Args* args, int64_t p0, int64_t p1);
void gemm_q4f32(const Q4Args* args, int64_t p0, int64_t p1);
void quantize_a8_blocks(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                        int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                        float* agroup, int32_t* bsum, float fixed);
void gemm_blk_a8(const BlkArgs* args, int64_t p0, int64_t p1);
void gemm_blk_f32(const BlkArgs* args, int64_t p0, int64_t p1);
int64_t pack_int4(const uint8_t* q, uint8_t* out, int64_t n_bytes_out);
void unpack_int4(const uint8_t* p, uint8_t* out, int64_t n_bytes_in);
void gelu(const float* x, float* y, int64_t n, bool tanh);
void silu_mul(const float* g, const float* u, float* y, int64_t n);
void mul(const float* x, const float* c, float* y, int64_t n);
void layer_norm(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                float eps, bool rms, int64_t rows, int64_t n, float* y);
void softmax(float* x, int64_t rows, int64_t n);
void attention(const AttnArgs* args, int64_t t0, int64_t t1);
int64_t dot_peak(int64_t iters);
uint64_t stream_read(const uint8_t* p, int64_t n);
}  // namespace LOWBIT_NS
}  // namespace lowbit
