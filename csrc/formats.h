// The block weight formats: one descriptor per format (ggml's type_traits, for lowbit's layouts).
//
// Every GGUF type lowbit runs, except Q4_0 / Q4_1 (which map exactly onto lowbit's int4 layout),
// is one row of kBlockFormats. A weight in such a format is, per sub-block s of `sub` inputs,
//     w = D_s * (u - offset) + B_s           u: an unsigned integer of `bits` bits per weight
// with D_s and B_s rebuilt from the file's own fields, so that dequantization is exact:
//   scale  Half: D = float16 d per sub-block;  Code: D = d * code (d float16 per file block,
//          code a small signed integer per sub-block);  E8M0: D = 2^(e - 128) (MXFP4);
//   min    None: B = 0;  Half: B = float16 m;  Code: B = -(dmin * code) (dmin per file block);
//   lut    the 4-bit value indexes a 16-entry int8 grid (IQ4, MXFP4), stored as grid + 128 with
//          offset 128 so that the kernels' unsigned x signed dot products still apply.
// With int8 activations, formats whose codes are small (code_dot: Q2_K, Q3_K, where every
// code * (u - offset) lies within 255 consecutive integers, so that one byte holds it) keep the codes inside the exact integer dot of each
// 32-input activation block and fold d / dmin once per file block (gemm_blk/ref.cpp); the others
// fold D and B per sub-block.
// Its kernel layout (shared by every ISA, saved as is), P = ceil(N / 16) panels of 16 rows:
//   q8    uint8  [P*16][K]     8-bit values whole, as the int8 layout (kernels.h): 64-byte blocks
//                              of 16 rows x 4 k, byte r*4+i holding k0+i (Q8_0)
//   nib   uint8  [P*16][K/2]   the low 4 bits, as the int4 layout (kernels.h): 64-byte blocks of
//                              16 rows x 8 k, byte r*4+i holding k0+i (low) and k0+4+i (high)
//   bits  uint64 [P][K/4][planes]  the bits above (or, without nib, all of them), one plane per
//                              bit: bit r*4+i of a word is that bit of row r's k0+i
//   d     float16 (uint8 for E8M0) [P][K/block][16];   dm  float16 [P][K/block][16] (m or dmin)
//   sc    int8   [P][K/sub][16] scale codes (Q2_K: the file's byte, scale | min << 4)
//   mc    uint8  [P][K/sub][16] min codes
// Plain data only: ISA sources read these constants inside their own namespaces.
#pragma once
#include <cstdint>

namespace lowbit {

enum class ScaleKind : uint8_t { Half, Code, E8M0 };
enum class MinKind : uint8_t { None, Half, Code };
enum class Lut : uint8_t { None, IQ4, MXFP4 };

// Decodes one file block into values u (LUT formats: the 4-bit index), per sub-block codes and the
// block's float16 d / dmin (bits); fields a format lacks are left alone.
using BlockDecoder = void (*)(const uint8_t* blk, uint8_t* u, int8_t* sc, uint8_t* mc,
                              uint16_t* d, uint16_t* dm);

struct BlockFormat {
  const char* name;     // as llama.cpp spells it
  int ggml_type;        // the GGUF type number
  int block, bytes;     // elements and bytes of one file block
  int sub;              // elements per scale: 16 or 32
  int bits;             // bits per value
  bool nib;             // the low 4 bits live in the nibble plane (8 bits: the q8 byte plane)
  int planes;           // 1-bit planes: bits - 4 with nib, else bits
  int offset;           // w = D (u - offset) + B
  Lut lut;
  ScaleKind scale;
  MinKind min;
  bool pair4;           // scale and min codes share a byte (Q2_K)
  bool code_dot;        // int8 activations: codes multiply inside the integer dot (see above)
  int8_t sc_lo, sc_hi;  // the scale codes (sc) the kernels take: what the file's fields can hold
  BlockDecoder decode;  // formats.cpp
};

void decode_q8_0(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q5_0(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q5_1(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q2_k(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q3_k(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q4_k(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q5_k(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_q6_k(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_iq4_nl(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_iq4_xs(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);
void decode_mxfp4(const uint8_t*, uint8_t*, int8_t*, uint8_t*, uint16_t*, uint16_t*);

using SK = ScaleKind;
using MK = MinKind;
// name, ggml type, block, bytes, sub, bits, nib, planes, offset, lut, scale, min, pair4, code_dot,
// scale code range, decoder
constexpr BlockFormat kBlockFormats[] = {
    {"Q8_0", 8, 32, 34, 32, 8, false, 0, 128, Lut::None, SK::Half, MK::None, false, false, -128, 127, decode_q8_0},
    {"Q5_0", 6, 32, 22, 32, 5, true, 1, 16, Lut::None, SK::Half, MK::None, false, false, -128, 127, decode_q5_0},
    {"Q5_1", 7, 32, 24, 32, 5, true, 1, 0, Lut::None, SK::Half, MK::Half, false, false, -128, 127, decode_q5_1},
    {"Q2_K", 10, 256, 84, 16, 2, false, 2, 0, Lut::None, SK::Code, MK::Code, true, true, -128, 127, decode_q2_k},
    {"Q3_K", 11, 256, 110, 16, 3, false, 3, 4, Lut::None, SK::Code, MK::None, false, true, -32, 31, decode_q3_k},
    {"Q4_K", 12, 256, 144, 32, 4, true, 0, 0, Lut::None, SK::Code, MK::Code, false, false, 0, 63, decode_q4_k},
    {"Q5_K", 13, 256, 176, 32, 5, true, 1, 0, Lut::None, SK::Code, MK::Code, false, false, 0, 63, decode_q5_k},
    {"Q6_K", 14, 256, 210, 16, 6, true, 2, 32, Lut::None, SK::Code, MK::None, false, false, -128, 127, decode_q6_k},
    {"IQ4_NL", 20, 32, 18, 32, 4, true, 0, 128, Lut::IQ4, SK::Half, MK::None, false, false, -128, 127, decode_iq4_nl},
    {"IQ4_XS", 23, 256, 136, 32, 4, true, 0, 128, Lut::IQ4, SK::Code, MK::None, false, false, -32, 31, decode_iq4_xs},
    {"MXFP4", 39, 32, 17, 32, 4, true, 0, 128, Lut::MXFP4, SK::E8M0, MK::None, false, false, -128, 127, decode_mxfp4},
};
constexpr int kNumBlockFormats = sizeof(kBlockFormats) / sizeof(kBlockFormats[0]);

// The non-linear grids, stored + 128 (u8): IQ4_NL / IQ4_XS (kvalues_iq4nl) and MXFP4 (e2m1 x 2).
constexpr uint8_t kLutIQ4[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
constexpr uint8_t kLutMXFP4[16] = {128, 129, 130, 131, 132, 134, 136, 140,
                                   128, 127, 126, 125, 124, 122, 120, 116};

// Kernel arguments for a block-format weight (N rows of K inputs; K a multiple of the block).
// A8: int8 activations [M][lda] (per 32-block scales ablock [M][K/32], integer sums per 16 inputs
// asum [M][K/16], which must be the true sums: kernels may fold the offset through them, or not);
// A32: float32 activations [M][lda] and, for formats with minima, the sums of each sub-block's
// inputs xsum [M][K/sub].
struct BlkArgs {
  int fmt;
  int64_t M, N, Np, K;
  const uint8_t* q8;
  const uint8_t* nib;
  const uint64_t* bits;
  const void* d;
  const uint16_t* dm;
  const int8_t* sc;
  const uint8_t* mc;
  const void* a;
  int64_t lda;
  const float* ablock;
  const int32_t* asum;
  const float* xsum;
  const float* bias;
  float* c;
  int64_t ldc;
};

// Element counts of a weight's parts (0: the format has no such part); see the layout above.
enum class BlkPart { Q8, Nib, Bits, D, Dm, Sc, Mc };
struct BlkShape {
  int fmt;
  int64_t N, K, Np, P;
  BlkShape(int fmt, int64_t n, int64_t k);
  int64_t part_size(BlkPart part) const;
};

// formats.cpp: the generic pieces, for any format through its descriptor.
// u of weight (n, k), the grid applied (so w = D (u - offset) + B), and sub-block s's D and B, in
// exactly the float operations of the gguf package's dequantizers.
int blk_u(const BlkArgs& w, int64_t n, int64_t k);
// Row n's codes of sub-block s (scale; min, 0 without) and its file block's d and dmin (E8M0: the
// scale itself; dm 0 without minima), as floats.
void blk_codes(const BlkArgs& w, int64_t n, int64_t s, int* code, int* mcode);
void blk_block_scales(const BlkArgs& w, int64_t n, int64_t blk, float* d, float* dm);
void blk_scale(const BlkArgs& w, int64_t n, int64_t s, float* D, float* B);
// File rows (row_bytes apart) into rows [n0, n1) (n0 a multiple of 16) of zero-filled parts of
// the kernel layout: raw's first row is weight row n0.
void blk_from_gguf(const uint8_t* raw, int64_t row_bytes, const BlkShape& s, int64_t n0, int64_t n1,
                   uint8_t* q8, uint8_t* nib, uint64_t* bits, void* d, uint16_t* dm, int8_t* sc,
                   uint8_t* mc);
// float32 rows [nrows][K] of the given row numbers: D * (u - offset) (+ B), bit for bit the
// gguf package's dequantization.
void blk_dequantize(const BlkArgs& w, const int64_t* rows, int64_t nrows, float* out);

}  // namespace lowbit
