// The kernel table: what every ISA variant provides, in plain C types only.
//
// Each ISA's sources are compiled with their own flags into namespace lowbit::<isa> and export one
// `const Kernels table`; dispatch.cpp picks one at run time. Nothing in here is inline code, so no
// template or inline function can be instantiated with one ISA's flags and run on another CPU.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lowbit {

// Packed INT8 weight layout, shared by every ISA (so weights survive an ISA switch):
//   panels of 16 output columns; within a panel, K in steps of 4, each step one 64-byte block
//   holding 16 columns x 4 consecutive k-bytes:  byte ((p*Kp/4 + k/4)*16 + n%16)*4 + k%4.
//   Np = N rounded up to 16, Kp = K rounded up to 4 (padding weights are 0).
// Scales: float32 [G][Np] (G groups along K, one when per channel), padding columns 0.
// Compensation: int32 [G][Np] = 128 * sum of the group's weights (activations are stored +128).
constexpr int64_t kPanel = 16;
constexpr int64_t kKStep = 4;

// Activations for the INT8 GEMM are unsigned: q + 128, rows padded to Kp with 128 (a zero).
// Ungrouped calls of kAmxMinRows rows or more run on AMX tiles where the CPU has them (a weight
// tile then serves several rows; fewer stay on VPDPBUSD), which read the rows in blocks of 32:
// for those calls the buffer holds rows of 128 up to the next multiple of 32.
constexpr int64_t kAmxMinRows = 8;
// W4A8 calls of kQ4AmxMinRows rows or more run on AMX tiles too (below, half of each tile would be
// padding: 16 rows measured slower than VPDPBUSD). They read whole 32-row blocks of activations,
// so the Q4Args operand `a` must be readable up to M rounded up to 32 rows (what lies past M is
// never used in a result).
constexpr int64_t kQ4AmxMinRows = 32;
struct GemmArgs {
  const uint8_t* a;       // [M][lda] u8
  int64_t lda;
  int64_t M;
  const int8_t* b;        // packed weights
  const float* wscale;    // [G][Np]; unused for int32 output
  const int32_t* comp;    // [G][Np]
  int64_t Kp;             // padded K (multiple of 4)
  int64_t group;          // K per group (multiple of 4; == Kp when per channel)
  int64_t Np;
  int64_t N;              // valid columns
  const float* ascale;    // [M] per-row activation scales; unused for int32 output
  const float* bias;      // [N] or null
  void* c;                // float32 or int32 [M][ldc]
  int64_t ldc;
};

// Packed INT4 weight layout, shared by every ISA: panels of 16 output columns; within a panel, K in
// steps of 8, each step one 64-byte block: byte c*4 + i holds column c's k0+i in its low nibble and
// k0+4+i in its high nibble (so AND 0x0F / shift 4 give two 16-column x 4-k VPDPBUSD operands).
// Values q in 0..15 mean w = d*q + m (d, m float16 per group, stored per panel [Np/16][G][16] so
// that each panel's scales stream in order beside its nibbles). Instead of minima, weights may hold
// integer zero points z (uint8, same layout; GPTQ / AWQ), meaning m = d * -z, which is exact in
// float32; symmetric weights store neither and mean z = 8. Kp = K rounded up to 32 (padding
// weights multiply zero activations).
constexpr int64_t kQ4Step = 8;     // k per 64-byte block
constexpr int64_t kActBlock = 32;  // activation quantization block (W4A8)

// Softmax attention of lowbit.nn.attention, out = softmax(scale * q k^T) v per (batch, head):
// q (B, Sq, H, d), k and v (B, Sk, Hkv, d) at the given strides (in floats; the last axis
// contiguous), head h reading kv head h / (H / Hkv); out (B, Sq, H, d) dense. Batch b sees its
// first lengths[b] keys (all Sk when lengths is null); causal: query i also only keys
// j <= Sk - Sq + i; window W > 0 (sliding-window attention): also only keys j > Sk - Sq + i - W
// (query i sits at key position Sk - Sq + i). A query with no key to see gets zeros. One task:
// (b, h, kAttnQueries queries). k_transposed: k is given per (batch, kv head) in blocks of 32 keys
// of d rows each (a key cache laid out for the kernel: no transposition per call, and a cache's
// first keys contiguous): key j's dimension c at k + j / 32 * kbs + c * ks[1] + j % 32 (kbs = 32:
// d whole rows of keys), readable up to Sk rounded up to 32 (what lies past Sk is never used).
constexpr int64_t kAttnQueries = 64;
struct AttnArgs {
  const float *q, *k, *v;
  int64_t qs[3], ks[3], vs[3];  // strides of batch, token, head
  float* out;
  int64_t B, Sq, Sk, H, Hkv, d;
  const int64_t* lengths;
  bool causal;
  float scale;
  int64_t window;  // 0: none
  bool k_transposed;
  int64_t kbs;  // k_transposed: floats from one 32-key block to the next
  // int8 (lowbit.nn.attention's precision="int8"; not with k_transposed; d <= kAttnInt8MaxDim,
  // Sk <= kAttnInt8MaxKeys): each query and key row symmetric int8 (scale = amax / 127,
  // q = round-half-even(x * 127 / amax), 0 where that is not a number); scores in log2 units,
  // s = float(exact int dot) * ((scale_q * (scale * log2 e)) * scale_k); per row and 32-key
  // block (from key 0) kb = the largest round(s - max) of the keys the row sees (max: the row's
  // largest score), and the weights as bytes u = round-half-even(180 * 2^(s - max - kb)) (2^x a
  // polynomial, nn.cpp); the values int8 per 32-key block and dimension over the keys that hold
  // data (the first lengths[b]: a causal query's result depends on the later keys of its
  // blocks); each output the fma over its blocks in order of float(exact int dot of u and the
  // block's values) * 2^(kb - 7) times the block's scale, divided by the sum of 2^(kb - 7) * u
  // over the keys (16 partial sums, key j in sum j mod 16, combined pairwise). A NaN score the row sees, or a NaN / inf value in its blocks, gives NaN.
  // (float32: each output's fma chain takes only the keys its query sees.)
  bool int8;
};
constexpr int64_t kAttnInt8MaxDim = 65536;     // (q + 128) k sums stay within int32
constexpr int64_t kAttnInt8MaxKeys = 1 << 30;  // key indices within int32 lanes

struct BlkArgs;  // formats.h: the block formats (GGUF K-quants, IQ4, Q5, MXFP4)

struct Q4Args {
  int64_t M, N, Np, Kp;
  int64_t group;            // K per weight group (multiple of 32; == Kp when per channel)
  const uint8_t* b;         // packed nibbles, panel p at p * Kp * 8
  const uint16_t* scales;   // float16 [Np/16][G][16]
  const uint16_t* mins;     // float16 [Np/16][G][16], or null: m = d * -z
  const uint8_t* zeros;     // uint8 [Np/16][G][16] zero points z when mins is null, or null: z = 8
  // W4A8: int8 activations [M][lda] padded with 0 to Kp (readable up to M rounded up to 32 rows:
  // kQ4AmxMinRows), a scale per 32-block [M][Kp/32], and per row and group
  // A_g = sum over its blocks of scale_b * sum(q_b)  (the term minima multiply).
  // W4A32: float32 activations [M][lda] padded with 0 to Kp; A_g = sum of the group's x.
  const void* a;
  int64_t lda;
  const float* ablock;      // W4A8 only: [M][Kp/32]
  const float* agroup;      // [M][G]
  const int32_t* asum;      // W4A8, symmetric weights: [M][Kp/32] sum(q_b) per block, else null
  const float* bias;        // [N] or null
  float* c;                 // [M][ldc]
  int64_t ldc;
};

struct Kernels {
  const char* name;

  // Quantize weight rows [n0, n1) (n0, n1 multiples of 16, or n1 == N) of w (row stride ldw) to
  // symmetric int8 per group: scale = amax / 127, q = round-half-even(w / scale), in [-127, 127].
  // Writes packed panels, scales and compensation. Returns the first row holding a NaN/Inf, or -1.
  int64_t (*quantize_w8)(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp,
                         int64_t group, int64_t n0, int64_t n1, int8_t* packed, float* scales,
                         int32_t* comp);

  // 4-bit quantization of weight rows [n0, n1) (n0 a multiple of 16) into the packed nibble layout,
  // float16 scales and, when `mins` is given, minima. Symmetric: d = (the signed value of largest
  // magnitude) / -8, q = clamp(round-half-even(w / d) + 8, 0, 15). Asymmetric: d = (max - min) / 15,
  // m = min, q = clamp(round-half-even((w - m) / d), 0, 15). d and m are rounded to float16 first
  // and q comes from the rounded values. Returns -1, or the first bad row with *why = 0 (NaN/Inf)
  // or 1 (d or m beyond float16).
  int64_t (*quantize_w4)(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t Kp,
                         int64_t group, int64_t n0, int64_t n1, uint8_t* packed, uint16_t* scales,
                         uint16_t* mins, int* why);

  // Activation quantization to u8 = q + 128, rows [m0, m1), padded to Kp with the code of 0 (128,
  // or with static activations clamp(zero) + 128: padding weights are 0, so either is exact).
  // Dynamic (fixed == 0): per-row symmetric, scale = amax / 127, q = round-half-even(x / scale) in
  // [-127, 127]; an all-zero row gets scale 0. Static (fixed > 0): scale = fixed,
  // q = clamp(round-half-even(x / scale) + zero, -128, 127) (x ~ scale * (q - zero)).
  // A row holding NaN/Inf gets a NaN scale (its output row becomes NaN).
  void (*quantize_a8)(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t m0, int64_t m1,
                      uint8_t* out, int64_t ldo, float* scales, float fixed, int32_t zero);

  // C[m, n] for all M rows and panels [p0, p1):
  //   f = acc_0 * ws_0;  f = fma(acc_g, ws_g, f) for g >= 1;  y = fma(f, ascale[m], bias[n])
  //   (y = f * ascale[m] without bias), acc_g the exact int32 dot of group g.
  void (*gemm_u8s8_f32)(const GemmArgs* args, int64_t p0, int64_t p1);
  // Exact int32 C[m, n] = sum_k (a - 128) * b for panels [p0, p1) (single group).
  void (*gemm_u8s8_i32)(const GemmArgs* args, int64_t p0, int64_t p1);
  // W8A32 (weight-only): args.a holds float32 activations [M][lda] padded with 0 to Kp (ascale
  // and comp unused); per group S_g = sum_k w * x, one fma per k in k order, then
  // f = S_0 * ws_0;  f = fma(S_g, ws_g, f) for g >= 1;  y = f + bias[n]  (gemm_w8f32.cpp).
  void (*gemm_s8f32)(const GemmArgs* args, int64_t p0, int64_t p1);

  // W4A8 for panels [p0, p1): per 32-block b the exact int32 dot I_b = sum q_w * q_a, per group
  //   I_g = sum_b I_b * s_b   (first term a product, then fma, in block order)
  //   f  += fma(d_g, I_g, m_g * A_g)   (f = first group's term, then adds)  ; y = f + bias.
  // Symmetric weights (no minima, no zero points; asum given) instead take I_b = sum (q_w - 8) q_a,
  // exact through asum, and fold f = fma(d_g, I_g, f) from f = 0: no offset term to cancel, one
  // multiply fewer.
  void (*gemm_q4a8)(const Q4Args* args, int64_t p0, int64_t p1);
  // W4A32: per group S_g = sum_k q_w * x, one fma per k in k order, then f += fma(d, S, m A) as
  // W4A8's first form.
  void (*gemm_q4f32)(const Q4Args* args, int64_t p0, int64_t p1);
  // Activation quantization for W4A8, rows [m0, m1): per 32-block scale = amax / 127,
  // q = round-half-even(x / scale) in [-127, 127], or (fixed > 0, static) scale = fixed and
  // q = clamp(round-half-even(x / scale), -128, 127); padded with 0 to Kp; per group A_g as above;
  // when bsum is given, each block's sum(q) [M][Kp/32] (Q4Args.asum). A block holding NaN/Inf gets
  // a NaN scale (its row's output becomes NaN).
  void (*quantize_a8_blocks)(const float* x, int64_t ldx, int64_t K, int64_t Kp, int64_t group,
                             int64_t m0, int64_t m1, int8_t* q, int64_t ldq, float* ablock,
                             float* agroup, int32_t* bsum, float fixed);

  // Block formats (formats.h) for panels [p0, p1), int8 activations (per 32-block scales and
  // per-16 integer sums) or float32 ones; the order of operations is gemm_blk/ref.cpp's.
  void (*gemm_blk_a8)(const BlkArgs* args, int64_t p0, int64_t p1);
  void (*gemm_blk_f32)(const BlkArgs* args, int64_t p0, int64_t p1);

  // INT4 nibbles: element 2i in the low nibble, 2i+1 in the high. pack returns the index of the
  // first value above 15, or -1 (the output is then unspecified).
  int64_t (*pack_int4)(const uint8_t* q, uint8_t* out, int64_t n_bytes_out);
  void (*unpack_int4)(const uint8_t* p, uint8_t* out, int64_t n_bytes_in);

  // Float helpers of lowbit.nn (kernels/nn.cpp), bit-identical on every ISA. GELU of n values (erf
  // form, or tanh's approximation when tanh); rows of (x [+ r]) normalised: LayerNorm (x - mean) / sqrt(var + eps) * w + b, or RMSNorm
  // (rms) x / sqrt(mean(x^2) + eps) * w; x rows ld apart, r and y dense; softmax of rows in place.
  void (*gelu)(const float* x, float* y, int64_t n, bool tanh);
  // SwiGLU's activation: y = silu(g) u = g / (1 + e^(-g)) * u (0 where -g > 88), n values.
  void (*silu_mul)(const float* g, const float* u, float* y, int64_t n);
  // y = x * c elementwise, n values (a layer's input_scale on its inputs, as they are quantized).
  void (*mul)(const float* x, const float* c, float* y, int64_t n);
  void (*layer_norm)(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                     float eps, bool rms, int64_t rows, int64_t n, float* y);
  void (*softmax)(float* x, int64_t rows, int64_t n);
  // Attention tasks [t0, t1) of AttnArgs: each score a chain of fma over d (in order) times
  // scale, softmax as above, each output an fma chain over the keys (in order) divided by the
  // sum of the weights.
  void (*attention)(const AttnArgs* args, int64_t t0, int64_t t1);

  // Benchmark probes: `iters` rounds of independent int8 dot instructions (returns the int8
  // multiply-adds done), and a read of n bytes (returns a checksum so it is not optimised away).
  int64_t (*dot_peak)(int64_t iters);
  uint64_t (*stream_read)(const uint8_t* p, int64_t n);
};

}  // namespace lowbit
