// Operations: the kernels of the current ISA, split into tasks on the thread pool. Plain C++ over
// raw pointers; bindings.cpp validates every argument before calling in.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

namespace lowbit {

// A thread's buffer kept between calls up to kKeepScratch bytes; trim frees a larger one (when
// the call that needed it is done).
constexpr size_t kKeepScratch = size_t(4) << 20;

template <class T>
void trim(std::vector<T>& buf) {
  if (buf.capacity() * sizeof(T) > kKeepScratch) std::vector<T>().swap(buf);
}

struct AttnArgs;  // kernels.h
struct BlkArgs;   // formats.h

constexpr int64_t kMaxK = 131071;  // largest K whose exact int8 dot always fits in int32

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Packed int8 weight sizes for (N, K, group); group 0 means per channel.
struct W8Shape {
  int64_t N, K, Np, Kp, group, G;
  W8Shape(int64_t n, int64_t k, int64_t grp);
};

// Symmetric int8 quantization of w (N rows, stride ldw) into the packed layout; the outputs must
// be zero-filled. Returns the first row holding a NaN/Inf, or -1.
int64_t quantize_w8(const float* w, int64_t ldw, const W8Shape& s, int8_t* packed, float* scales,
                    int32_t* comp);
// int8 values q (N, K) into zero-filled packed weights, with compensation [G][Np].
void pack_w8(const int8_t* q, const W8Shape& s, int8_t* packed, int32_t* comp);
// y (M, N) = dequant(quant8(x) . W^T) + bias, activations quantized per row on the fly.
// act_scale > 0: static activations, x ~ act_scale * (q - act_zero) (kernels.h quantize_a8); the
// zero point's term, -act_scale * act_zero * sum_k w, is left to the caller (folded into bias).
// colscale: null, or K factors the inputs are multiplied by first (in the quantization pass).
// gelu: y = GELU(...) (Kernels::gelu), applied to each task's block of y while it is in cache.
// perm: null, or act-order weights' input order (K values in [0, K)): input k of the packed
// weights is x[perm[k]], gathered in the quantization pass (before colscale, which is in that
// packed order).
void linear_w8a8(const float* x, int64_t ldx, int64_t M, const int8_t* packed, const float* scales,
                 const int32_t* comp, const float* bias, const W8Shape& s, float act_scale,
                 int32_t act_zero, const float* colscale, bool gelu, float* y,
                 const int64_t* perm = nullptr);

// y (M, N) = x . dequant(W)^T + bias for int8 weights, float32 activations (weight-only,
// Kernels::gemm_s8f32); colscale, gelu and perm as for linear_w8a8.
void linear_w8f32(const float* x, int64_t ldx, int64_t M, const int8_t* packed, const float* scales,
                  const float* bias, const W8Shape& s, const float* colscale, bool gelu, float* y,
                  const int64_t* perm = nullptr);

// Exact c (M, N) = a (M, K) . b (N, K)^T in int32.
void gemm_s8(const int8_t* a, int64_t M, const int8_t* b, int64_t N, int64_t K, int32_t* c);

// Benchmark probes over all pool threads: int8 multiply-adds per second of the ISA's dot
// instruction (about `seconds` long), and bytes per second reading [p, p + n) `repeats` times.
double dot_peak(double seconds);
double read_bandwidth(const uint8_t* p, int64_t n, int repeats);

// Packed int4 weight sizes for (N, K, group); group 0 means per channel (Kp = K rounded up to 32).
struct Q4Shape {
  int64_t N, K, Np, Kp, group, G;
  Q4Shape(int64_t n, int64_t k, int64_t grp);
};

// 4-bit quantization of w into the packed nibble layout with float16 scales (and minima when
// asymmetric; mins null for symmetric): Kernels::quantize_w4 over every row.
int64_t quantize_w4(const float* w, int64_t ldw, const Q4Shape& s, uint8_t* packed,
                    uint16_t* scales, uint16_t* mins, int* why);
// Values q (N, K) in 0..15 into zero-filled packed nibbles.
void pack_w4(const uint8_t* q, const Q4Shape& s, uint8_t* packed);
// GGUF Q4_0 / Q4_1 rows (row_bytes apart) into zero-filled packed nibbles, float16 scales and
// (Q4_1) minima in the per-panel layout (s.group must be 32).
void gguf_q4(const uint8_t* raw, int64_t row_bytes, bool has_min, const Q4Shape& s,
             uint8_t* packed, uint16_t* scales, uint16_t* mins);
// y (M, N) = x . dequant(W)^T + bias; activations int8 per 32-block (W4A8) or float32 (W4A32).
// mins, or else zeros (integer zero points), or neither (symmetric, z = 8): see kernels.h.
// colscale, gelu and perm as for linear_w8a8.
void linear_w4(const float* x, int64_t ldx, int64_t M, const uint8_t* packed,
               const uint16_t* scales, const uint16_t* mins, const uint8_t* zeros,
               const float* bias, const Q4Shape& s,
               bool int8_activations, float act_scale, const float* colscale, bool gelu,
               float* y, const int64_t* perm = nullptr);

// Runs fn(n0, n1) over ranges of whole 16-row panels of an N x K matrix, threaded when large.
void parallel_panels(int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& fn);

// y (M, N) = x . dequant(W)^T + bias for a block-format weight w (formats.h: its fmt, N, Np, K and
// parts set), int8 activations (per 32-block scales) or float32 ones; colscale and gelu as for
// linear_w8a8.
void linear_blk(const float* x, int64_t ldx, int64_t M, const BlkArgs& w, const float* bias,
                bool int8_activations, float act_scale, const float* colscale, bool gelu, float* y);

// lowbit.nn helpers over the thread pool when large (Kernels::gelu, layer_norm, softmax).
void gelu(const float* x, float* y, int64_t n, bool tanh);
// silu(g) * u over rows of n values (g's rows ldg apart, u's ldu, y dense).
void silu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t rows, int64_t n,
              float* y);
void layer_norm(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                float eps, bool rms, int64_t rows, int64_t n, float* y);
void softmax(float* x, int64_t rows, int64_t n);
// y = a + b, y = x * s elementwise (lowbit.nn.add, lowbit.nn.scale).
void add(const float* a, const float* b, int64_t n, float* y);
void scale(const float* x, float s, int64_t n, float* y);
// gelu(g) * u over rows of n values, like silu_mul (tanh: GELU's tanh form; lowbit.nn.geglu).
void gelu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t rows, int64_t n,
              bool tanh, float* y);
void attention(const AttnArgs& args);

// Rotary position embedding (lowbit.nn.rope): x (tokens, heads, d) rotated by cos / sin (tokens,
// d / 2), pair i by angle i, the pairs (x[2i], x[2i+1]) or, with neox, (x[i], x[i + d/2]):
// (a, b) -> (a c - b s, a s + b c), each product rounded, then the difference / sum. positions:
// null, or token t's row of the tables (lowbit.nn.RoPE: tables made once for every position).
// Token t's heads lie side by side from x + t * ldx (a slice of a fused QKV row); y is dense.
void rope(const float* x, int64_t ldx, int64_t tokens, int64_t heads, int64_t d, const float* cos,
          const float* sin, const int64_t* positions, bool neox, float* y);

int64_t pack_int4(const uint8_t* q, int64_t n_out, uint8_t* out);
void unpack_int4(const uint8_t* p, int64_t n_in, uint8_t* out);

}  // namespace lowbit
