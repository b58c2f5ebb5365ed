// Block formats (formats.h): each file layout's decoder, and the generic pieces every format
// shares through its descriptor: repacking file rows into the kernel layout, reading one value or
// one sub-block's scale back, exact dequantization. Portable code, compiled once.
#include "formats.h"

#include <cstring>

#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace lowbit {
namespace ref {
float half_to_float(uint16_t h);  // kernels/quant/ref.cpp
}

namespace {

uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 32 values from 16 bytes: element j is byte j's low nibble, element j + 16 its high nibble.
void nibbles32(const uint8_t* qs, uint8_t* u) {
  for (int j = 0; j < 16; ++j) {
    u[j] = qs[j] & 0x0F;
    u[j + 16] = qs[j] >> 4;
  }
}

// 256 values from 128 bytes in 4 chunks of 32 bytes: chunk c gives elements 64c + l (low
// nibbles) and 64c + 32 + l (high nibbles) (Q4_K, Q5_K).
void nibbles256(const uint8_t* qs, uint8_t* u) {
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) {
      u[64 * c + l] = qs[32 * c + l] & 0x0F;
      u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
    }
}

// The 6-bit scales and minima of Q4_K / Q5_K, 8 each in 12 bytes.
void scale_min_k4(const uint8_t* s, int8_t* sc, uint8_t* mc) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = (int8_t)(s[j] & 63);
    mc[j] = s[j + 4] & 63;
    sc[j + 4] = (int8_t)((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
    mc[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
  }
}

float e8m0_half(uint8_t e) {  // ggml_e8m0_to_fp32_half: 2^(e - 128), subnormal below e = 2
  const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

// Q8_0: d, 32 int8 values q, stored as u = q + 128 (offset 128).
void decode_q8_0(const uint8_t* b, uint8_t* u, int8_t*, uint8_t*, uint16_t* d, uint16_t*) {
  *d = u16(b);
  for (int j = 0; j < 32; ++j) u[j] = b[2 + j] ^ 0x80;
}

// Q5_0: d, u32 qh (bit j: element j's fifth bit), 16 nibble bytes.
void decode_q5_0(const uint8_t* b, uint8_t* u, int8_t*, uint8_t*, uint16_t* d, uint16_t*) {
  *d = u16(b);
  const uint32_t qh = u32(b + 2);
  nibbles32(b + 6, u);
  for (int j = 0; j < 32; ++j) u[j] |= (uint8_t)(((qh >> j) & 1) << 4);
}

// Q5_1: d, m, u32 qh, 16 nibble bytes.
void decode_q5_1(const uint8_t* b, uint8_t* u, int8_t*, uint8_t*, uint16_t* d, uint16_t* dm) {
  *d = u16(b);
  *dm = u16(b + 2);
  const uint32_t qh = u32(b + 4);
  nibbles32(b + 8, u);
  for (int j = 0; j < 32; ++j) u[j] |= (uint8_t)(((qh >> j) & 1) << 4);
}

// Q2_K: 16 bytes scale | min << 4, 64 bytes of 2-bit values (element 128h + 32j + l is bits 2j of
// byte 32h + l), d, dmin.
void decode_q2_k(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t*, uint16_t* d, uint16_t* dm) {
  for (int s = 0; s < 16; ++s) sc[s] = (int8_t)b[s];
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) u[128 * h + 32 * j + l] = (b[16 + 32 * h + l] >> (2 * j)) & 3;
  *d = u16(b + 80);
  *dm = u16(b + 82);
}

// Q3_K: 32 bytes hmask (element 32j + l: bit j of byte l), 64 bytes of low 2-bit values (as Q2_K),
// 12 bytes of 16 6-bit scales, d. u = low + 4 * hmask bit, offset 4.
void decode_q3_k(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t*, uint16_t* d, uint16_t*) {
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) u[128 * h + 32 * j + l] = (b[32 + 32 * h + l] >> (2 * j)) & 3;
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 32; ++l) u[32 * j + l] |= (uint8_t)(((b[l] >> j) & 1) << 2);
  const uint8_t* s = b + 96;
  for (int i = 0; i < 16; ++i) {
    const int lo = i < 8 ? s[i] & 0x0F : s[i - 8] >> 4;
    const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    sc[i] = (int8_t)((lo | hi << 4) - 32);
  }
  *d = u16(b + 108);
}

// Q4_K: d, dmin, 12 bytes of 6-bit scales and minima, 128 nibble bytes.
void decode_q4_k(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t* mc, uint16_t* d, uint16_t* dm) {
  *d = u16(b);
  *dm = u16(b + 2);
  scale_min_k4(b + 4, sc, mc);
  nibbles256(b + 16, u);
}

// Q5_K: as Q4_K with 32 bytes qh (element 32j + l: bit j of byte l) before the nibbles.
void decode_q5_k(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t* mc, uint16_t* d, uint16_t* dm) {
  *d = u16(b);
  *dm = u16(b + 2);
  scale_min_k4(b + 4, sc, mc);
  nibbles256(b + 48, u);
  for (int j = 0; j < 8; ++j)
    for (int l = 0; l < 32; ++l) u[32 * j + l] |= (uint8_t)(((b[16 + l] >> j) & 1) << 4);
}

// Q6_K: 128 bytes ql (element 128h + 64i + l: nibble i of byte 64h + l), 64 bytes qh (element
// 128h + 32j + l: bits 2j of byte 32h + l), 16 int8 scales, d. Offset 32.
void decode_q6_k(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t*, uint16_t* d, uint16_t*) {
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 2; ++i)
      for (int l = 0; l < 64; ++l) u[128 * h + 64 * i + l] = (b[64 * h + l] >> (4 * i)) & 0x0F;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l)
        u[128 * h + 32 * j + l] |= (uint8_t)(((b[128 + 32 * h + l] >> (2 * j)) & 3) << 4);
  }
  for (int s = 0; s < 16; ++s) sc[s] = (int8_t)b[192 + s];
  *d = u16(b + 208);
}

// IQ4_NL: d, 16 nibble bytes of grid indices.
void decode_iq4_nl(const uint8_t* b, uint8_t* u, int8_t*, uint8_t*, uint16_t* d, uint16_t*) {
  *d = u16(b);
  nibbles32(b + 2, u);
}

// IQ4_XS: d, u16 scales_h (2 bits each), 4 bytes scales_l (nibbles), 128 bytes: 8 sub-blocks of
// 16 nibble bytes. Scale code ls - 32.
void decode_iq4_xs(const uint8_t* b, uint8_t* u, int8_t* sc, uint8_t*, uint16_t* d, uint16_t*) {
  *d = u16(b);
  const uint16_t sh = u16(b + 2);
  for (int s = 0; s < 8; ++s) {
    const int ls = ((b[4 + s / 2] >> (4 * (s % 2))) & 0x0F) | (((sh >> (2 * s)) & 3) << 4);
    sc[s] = (int8_t)(ls - 32);
    nibbles32(b + 8 + 16 * s, u + 32 * s);
  }
}

// MXFP4: e8m0 exponent e (kept in d's low byte), 16 nibble bytes of e2m1 grid indices.
void decode_mxfp4(const uint8_t* b, uint8_t* u, int8_t*, uint8_t*, uint16_t* d, uint16_t*) {
  *d = b[0];
  nibbles32(b + 1, u);
}

BlkShape::BlkShape(int fmt_, int64_t n, int64_t k)
    : fmt(fmt_), N(n), K(k), Np(round_up(n, kPanel)), P(round_up(n, kPanel) / kPanel) {}

int64_t BlkShape::part_size(BlkPart part) const {
  const BlockFormat& F = kBlockFormats[fmt];
  switch (part) {
    case BlkPart::Q8: return F.bits == 8 ? Np * K : 0;
    case BlkPart::Nib: return F.nib ? Np * K / 2 : 0;
    case BlkPart::Bits: return P * (K / 4) * F.planes;
    case BlkPart::D: return Np * (K / F.block);
    case BlkPart::Dm: return F.min == MinKind::None ? 0 : Np * (K / F.block);
    case BlkPart::Sc: return F.scale == ScaleKind::Code ? Np * (K / F.sub) : 0;
    case BlkPart::Mc: return F.min == MinKind::Code && !F.pair4 ? Np * (K / F.sub) : 0;
  }
  return 0;
}

int blk_u(const BlkArgs& w, int64_t n, int64_t k) {
  const BlockFormat& F = kBlockFormats[w.fmt];
  const int64_t p = n / kPanel, r = n % kPanel;
  if (F.bits == 8) return w.q8[(p * w.K / kKStep + k / kKStep) * 64 + r * 4 + k % 4];
  int v = 0, bit = 0;
  if (F.nib) {
    const uint8_t byte = w.nib[(p * w.K / kQ4Step + k / kQ4Step) * 64 + r * 4 + k % 4];
    v = k % kQ4Step < 4 ? byte & 0x0F : byte >> 4;
    bit = 4;
  }
  for (int j = 0; j < F.planes; ++j) {
    const uint64_t word = w.bits[(p * (w.K / 4) + k / 4) * F.planes + j];
    v |= (int)((word >> (r * 4 + k % 4)) & 1) << (bit + j);
  }
  if (F.lut == Lut::IQ4) v = kLutIQ4[v];
  if (F.lut == Lut::MXFP4) v = kLutMXFP4[v];
  return v;
}

void blk_codes(const BlkArgs& w, int64_t n, int64_t s, int* code, int* mcode) {
  const BlockFormat& F = kBlockFormats[w.fmt];
  const int64_t at_sub = (n / kPanel * (w.K / F.sub) + s) * kPanel + n % kPanel;
  *code = F.scale != ScaleKind::Code ? 1 : F.pair4 ? (uint8_t)w.sc[at_sub] & 0x0F : w.sc[at_sub];
  *mcode = F.min != MinKind::Code ? 0 : F.pair4 ? (uint8_t)w.sc[at_sub] >> 4 : w.mc[at_sub];
}

void blk_block_scales(const BlkArgs& w, int64_t n, int64_t blk, float* d, float* dm) {
  const BlockFormat& F = kBlockFormats[w.fmt];
  const int64_t at_blk = (n / kPanel * (w.K / F.block) + blk) * kPanel + n % kPanel;
  *d = F.scale == ScaleKind::E8M0 ? e8m0_half(((const uint8_t*)w.d)[at_blk])
                                  : ref::half_to_float(((const uint16_t*)w.d)[at_blk]);
  *dm = F.min == MinKind::None ? 0.f : ref::half_to_float(w.dm[at_blk]);
}

void blk_scale(const BlkArgs& w, int64_t n, int64_t s, float* D, float* B) {
  const BlockFormat& F = kBlockFormats[w.fmt];
  int code, mcode;
  float d, dm;
  blk_codes(w, n, s, &code, &mcode);
  blk_block_scales(w, n, s * F.sub / F.block, &d, &dm);
  *D = F.scale == ScaleKind::Code ? d * (float)code : d;
  *B = F.min == MinKind::Half ? dm : F.min == MinKind::Code ? -(dm * (float)mcode) : 0.f;
}

void blk_from_gguf(const uint8_t* raw, int64_t row_bytes, const BlkShape& s, int64_t first, int64_t last,
                   uint8_t* q8, uint8_t* nib, uint64_t* bits, void* d, uint16_t* dm, int8_t* sc,
                   uint8_t* mc) {
  const BlockFormat& F = kBlockFormats[s.fmt];
  const int64_t nblk = s.K / F.block, nsub = s.K / F.sub, spb = F.block / F.sub;
  // one panel at a time: its 16 rows' bit planes are built with ORs into words only it owns
  parallel_panels(last - first, s.K, [&](int64_t r0, int64_t r1) {
    const int64_t n0 = first + r0, n1 = first + r1;
    uint8_t u[256];
    int8_t codes[16];
    uint8_t mins[16];
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / kPanel, r = n % kPanel;
      for (int64_t b = 0; b < nblk; ++b) {
        uint16_t dd = 0, ddm = 0;
        F.decode(raw + (n - first) * row_bytes + b * F.bytes, u, codes, mins, &dd, &ddm);
        const int64_t at_blk = (p * nblk + b) * kPanel + r;
        if (F.scale == ScaleKind::E8M0)
          ((uint8_t*)d)[at_blk] = (uint8_t)dd;
        else
          ((uint16_t*)d)[at_blk] = dd;
        if (F.min != MinKind::None) dm[at_blk] = ddm;
        for (int64_t j = 0; j < spb && F.scale == ScaleKind::Code; ++j) {
          const int64_t at_sub = (p * nsub + b * spb + j) * kPanel + r;
          sc[at_sub] = codes[j];
          if (F.min == MinKind::Code && !F.pair4) mc[at_sub] = mins[j];
        }
        for (int64_t i = 0; i < F.block; ++i) {
          const int64_t k = b * F.block + i;
          int v = u[i], bit = 0;
          if (F.bits == 8) q8[(p * s.K / kKStep + k / kKStep) * 64 + r * 4 + k % 4] = (uint8_t)v;
          if (F.nib) {
            uint8_t& byte = nib[(p * s.K / kQ4Step + k / kQ4Step) * 64 + r * 4 + k % 4];
            byte |= k % kQ4Step < 4 ? (v & 0x0F) : (v & 0x0F) << 4;
            bit = 4;
          }
          for (int j = 0; j < F.planes; ++j)
            bits[(p * (s.K / 4) + k / 4) * F.planes + j] |= (uint64_t)((v >> (bit + j)) & 1) << (r * 4 + k % 4);
        }
      }
    }
  });
}

void blk_dequantize(const BlkArgs& w, const int64_t* rows, int64_t nrows, float* out) {
  const BlockFormat& F = kBlockFormats[w.fmt];
  auto body = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t s = 0; s < w.K / F.sub; ++s) {
        float D, B;
        blk_scale(w, rows[i], s, &D, &B);
        for (int64_t k = s * F.sub; k < (s + 1) * F.sub; ++k) {
          const float v = D * (float)(blk_u(w, rows[i], k) - F.offset);
          out[i * w.K + k] = F.min == MinKind::None ? v : v + B;
        }
      }
  };
  if (nrows * w.K < (1 << 16)) return body(0, nrows);  // a few rows: an embedding lookup
  parallel_for(nrows, body);
}

}  // namespace lowbit
