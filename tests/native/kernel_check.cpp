// Every kernel set this CPU runs, checked bit for bit against the reference, without Python: the
// aarch64 sets run it under qemu-user (tests/native/run.sh), the x86 sets natively.
//
// Each case builds its inputs once from a seeded generator (floats made from integers times powers
// of two, so they are the same numbers on every architecture), runs the ops of csrc/ops.h under
// `ref` and under every other set, and compares the output bytes: quantized weights, scales,
// compensation and layer outputs. The cases sweep M = 1.., N tails, K below / at / above the
// blocks, per-channel and grouped weights, static activations, bias, GELU epilogues, extreme
// values, every block format with int8 and float activations, and the lowbit.nn float ops.
//
// It prints one digest per family of cases (FNV-1a of the reference outputs in order): identical
// digests on two machines mean identical outputs, which is how run.sh compares x86 with aarch64.
//
//   kernel_check [--list | --case-digests]   exit status 0: every set matched ref on every case
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

using namespace lowbit;

namespace {

// splitmix64; uniform() is a 24-bit integer times 2^-24, exact on every machine.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return (int64_t)(next() % (uint64_t)n); }
  float uniform() { return (float)(next() >> 40) * (1.f / 16777216.f); }
  float sym(float scale) { return (uniform() * 2.f - 1.f) * scale; }  // scale: a power of two
  std::vector<float> floats(int64_t n, float scale) {
    std::vector<float> v((size_t)n);
    for (float& f : v) f = sym(scale);
    return v;
  }
};

using Bytes = std::vector<uint8_t>;
template <class T>
void put(Bytes& out, const T* p, int64_t n) {
  const uint8_t* b = (const uint8_t*)p;
  out.insert(out.end(), b, b + n * (int64_t)sizeof(T));
}
template <class T>
void put(Bytes& out, const std::vector<T>& v) { put(out, v.data(), (int64_t)v.size()); }
// Float outputs with every NaN written as one quiet NaN: a NaN's sign and payload are the
// hardware's (x86 makes 0xFFC00000, ARM 0x7FC00000), the only bits lowbit does not promise.
void put(Bytes& out, const std::vector<float>& v) {
  for (float f : v) {
    const float g = std::isnan(f) ? NAN : f;
    put(out, &g, 1);
  }
}

uint64_t fnv(uint64_t h, const Bytes& b) {
  for (uint8_t c : b) h = (h ^ c) * 0x100000001B3ull;
  return h;
}

struct Case {
  std::string family, name;
  std::function<Bytes()> run;  // the outputs under the current kernel set
};
std::vector<Case> cases;

void add(const std::string& family, const std::string& name, std::function<Bytes()> run) {
  cases.push_back({family, name, std::move(run)});
}

std::string shape(const char* fmt, int64_t a, int64_t b, int64_t c, int64_t d = 0) {
  char buf[128];
  std::snprintf(buf, sizeof buf, fmt, (long long)a, (long long)b, (long long)c, (long long)d);
  return buf;
}

// Rows of x with the extremes mixed in: row 1 all zero, row 2 one large value among small ones.
std::vector<float> activations(Rng& r, int64_t M, int64_t K, float scale) {
  std::vector<float> x = r.floats(M * K, scale);
  if (M > 1)
    for (int64_t k = 0; k < K; ++k) x[1 * K + k] = 0.f;
  if (M > 2) {
    for (int64_t k = 0; k < K; ++k) x[2 * K + k] *= 1.f / 65536.f;
    x[2 * K + K / 2] = 4096.f;
  }
  return x;
}

// ---- INT8: weight quantization, activation quantization (dynamic / static), the GEMM; the
// same weights with float activations (W8A32) ----
void int8_cases() {
  // (33, 70, 129: several 32-row AMX blocks, the last one partial, and a second 128-row pass)
  const int64_t Ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 70, 129};
  const int64_t Ns[] = {1, 15, 17, 33};
  const int64_t Ks[] = {1, 4, 5, 32, 33, 64, 100, 128, 260};  // (64, 128: grouped every other case)
  int idx = 0;
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t K : Ks) {
        ++idx;
        const int64_t group = (K % 32 == 0 && K >= 64 && idx % 2) ? 32 : 0;
        const bool bias = idx % 2, stat = idx % 3 == 0, gelu = idx % 5 == 0, cs = idx % 4 == 1;
        Rng r(1000 + idx);
        auto w = std::make_shared<std::vector<float>>(r.floats(N * K, 1.f));
        if (N > 2) {
          for (int64_t k = 0; k < K; ++k) (*w)[1 * K + k] = 0.f;  // an all-zero row
          (*w)[2 * K] = 1048576.f;                                  // a row dominated by one value
        }
        auto x = std::make_shared<std::vector<float>>(activations(r, M, K, 4.f));
        auto b = std::make_shared<std::vector<float>>(r.floats(N, 2.f));
        auto c = std::make_shared<std::vector<float>>(r.floats(K, 2.f));
        const int32_t zero = (int32_t)(idx % 7) - 3;
        add("int8", shape("M=%lld N=%lld K=%lld group=%lld", M, N, K, group) +
                        (bias ? " bias" : "") + (stat ? " static" : "") + (gelu ? " gelu" : "") +
                        (cs ? " colscale" : ""),
            [=] {
              const W8Shape s(N, K, group);
              std::vector<int8_t> packed((size_t)(s.Np * s.Kp));
              std::vector<float> scales((size_t)(s.G * s.Np)), y((size_t)(M * N));
              std::vector<int32_t> comp((size_t)(s.G * s.Np));
              const int64_t bad = quantize_w8(w->data(), K, s, packed.data(), scales.data(), comp.data());
              linear_w8a8(x->data(), K, M, packed.data(), scales.data(), comp.data(),
                          bias ? b->data() : nullptr, s, stat ? 1.f / 64 : 0.f, stat ? zero : 0,
                          cs ? c->data() : nullptr, gelu, y.data());
              std::vector<float> yf((size_t)(M * N));  // the same weights, float activations
              linear_w8f32(x->data(), K, M, packed.data(), scales.data(), bias ? b->data() : nullptr,
                           s, cs ? c->data() : nullptr, gelu, yf.data());
              Bytes out;
              put(out, &bad, 1);
              put(out, packed), put(out, scales), put(out, comp), put(out, y), put(out, yf);
              return out;
            });
      }
  // a NaN weight: the first bad row is reported the same way by every set
  add("int8", "NaN weight row", [] {
    const int64_t N = 20, K = 40;
    std::vector<float> w((size_t)(N * K), 0.5f);
    w[17 * K + 3] = NAN;
    const W8Shape s(N, K, 0);
    std::vector<int8_t> packed((size_t)(s.Np * s.Kp));
    std::vector<float> scales((size_t)s.Np);
    std::vector<int32_t> comp((size_t)s.Np);
    const int64_t bad = quantize_w8(w.data(), K, s, packed.data(), scales.data(), comp.data());
    Bytes out;
    put(out, &bad, 1);
    return out;
  });
}

// ---- exact int32 GEMM (lb.matmul on int8), extremes included ----
void int32_cases() {
  // (130: two AMX passes of 128 rows; K 1000, 4099: several AMX K chunks and a K tail)
  const int64_t Ms[] = {1, 2, 3, 5, 8, 17, 33, 130};
  const int64_t Ns[] = {1, 16, 17, 33};
  const int64_t Ks[] = {1, 4, 5, 64, 100, 1000, 4099};
  int idx = 0;
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (int64_t K : Ks) {
        ++idx;
        Rng r(5000 + idx);
        auto a = std::make_shared<std::vector<int8_t>>((size_t)(M * K));
        auto b = std::make_shared<std::vector<int8_t>>((size_t)(N * K));
        for (auto& v : *a) v = (int8_t)r.next();
        for (auto& v : *b) v = (int8_t)r.next();
        for (int64_t k = 0; k < K; ++k) {  // the largest magnitudes: -128 x -128 and -128 x 127
          (*a)[k] = -128;
          (*b)[k] = -128;
          if (N > 1) (*b)[K + k] = 127;
        }
        add("int32", shape("M=%lld N=%lld K=%lld", M, N, K), [=] {
          std::vector<int32_t> c((size_t)(M * N));
          gemm_s8(a->data(), M, b->data(), N, K, c.data());
          Bytes out;
          put(out, c);
          return out;
        });
      }
}

// ---- 4-bit weights: quantization (symmetric, minima), integer zero points, W4A8 and W4A32 ----
void w4_cases() {
  // (40, 70: AMX's 32-row blocks, the last one partial, and its 64-row passes)
  const int64_t Ms[] = {1, 2, 3, 5, 8, 9, 17, 33, 40, 70};
  const int64_t Ns[] = {1, 15, 17, 33};
  struct KG { int64_t K, group; };
  const KG kgs[] = {{1, 0}, {31, 0}, {32, 0}, {33, 0}, {100, 0}, {288, 0},
                    {64, 32}, {128, 64}, {256, 128}, {96, 32}, {1024, 256}};
  int idx = 0;
  for (int64_t M : Ms)
    for (int64_t N : Ns)
      for (const KG& kg : kgs) {
        ++idx;
        const int64_t K = kg.K, group = kg.group;
        const int kind = idx % 3;  // 0 symmetric, 1 minima, 2 integer zero points
        const bool bias = idx % 2, gelu = idx % 7 == 0, cs = idx % 5 == 1, stat = idx % 11 == 0;
        Rng r(9000 + idx);
        auto w = std::make_shared<std::vector<float>>(r.floats(N * K, 1.f));
        if (N > 2)
          for (int64_t k = 0; k < K; ++k) (*w)[1 * K + k] = 0.f;
        auto x = std::make_shared<std::vector<float>>(activations(r, M, K, 2.f));
        auto b = std::make_shared<std::vector<float>>(r.floats(N, 2.f));
        auto c = std::make_shared<std::vector<float>>(r.floats(K, 2.f));
        auto z = std::make_shared<std::vector<uint8_t>>((size_t)(N + 16) * (K + 32) / 32 + 64);
        for (auto& v : *z) v = (uint8_t)(r.next() % 16);
        static const char* kinds[] = {"symmetric", "minima", "zero points"};
        add("w4", shape("M=%lld N=%lld K=%lld group=%lld ", M, N, K, group) + kinds[kind] +
                      (bias ? " bias" : "") + (gelu ? " gelu" : "") + (cs ? " colscale" : "") +
                      (stat ? " static" : ""),
            [=] {
              const Q4Shape s(N, K, group);
              std::vector<uint8_t> packed((size_t)(s.Np * s.Kp / 2));
              std::vector<uint16_t> scales((size_t)(s.Np * s.G)), mins((size_t)(s.Np * s.G));
              int why = 0;
              const int64_t bad = quantize_w4(w->data(), K, s, packed.data(), scales.data(),
                                              kind == 1 ? mins.data() : nullptr, &why);
              const uint16_t* m = kind == 1 ? mins.data() : nullptr;
              const uint8_t* zp = kind == 2 ? z->data() : nullptr;
              std::vector<float> y8((size_t)(M * N)), y32((size_t)(M * N));
              const float* bp = bias ? b->data() : nullptr;
              const float* cp = cs ? c->data() : nullptr;
              linear_w4(x->data(), K, M, packed.data(), scales.data(), m, zp, bp, s, true,
                        stat ? 1.f / 32 : 0.f, cp, gelu, y8.data());
              linear_w4(x->data(), K, M, packed.data(), scales.data(), m, zp, bp, s, false, 0.f,
                        cp, gelu, y32.data());
              Bytes out;
              put(out, &bad, 1), put(out, &why, 1);
              put(out, packed), put(out, scales), put(out, mins), put(out, y8), put(out, y32);
              return out;
            });
      }
}

// The largest 4-bit block dots (every nibble 15 against int8 activations of -128 / 127, static
// scale so they clamp) with float16 scales from subnormal to the largest, zero, inf and NaN, both signs.
void w4_extreme_cases() {
  const uint16_t halves[] = {0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x0000, 0x8000,
                             0xFBFF, 0x8001, 0x2E66, 0xB800, 0x1400, 0x7C00, 0xFE01};
  for (int kind = 0; kind < 3; ++kind)
    for (int64_t M : {1, 3, 8, 33, 70})  // (33, 70: the AMX tile kernel)
      add("w4", shape("extremes M=%lld kind=%lld", M, kind, 0), [M, kind, halves] {
        const int64_t N = 24, K = 96, group = 32;
        const Q4Shape s(N, K, group);
        std::vector<uint8_t> packed((size_t)(s.Np * s.Kp / 2), 0xFF), zeros((size_t)(s.Np * s.G));
        std::vector<uint16_t> scales((size_t)(s.Np * s.G)), mins((size_t)(s.Np * s.G));
        for (size_t i = 0; i < scales.size(); ++i) {
          scales[i] = halves[i % 14];
          mins[i] = halves[(i * 5 + 3) % 14];
          zeros[i] = (uint8_t)(i % 16);
        }
        std::vector<float> x((size_t)(M * K));
        for (int64_t i = 0; i < M * K; ++i) x[(size_t)i] = (i / 7) % 3 ? -1e6f : 1e6f;
        std::vector<float> y8((size_t)(M * N)), y32((size_t)(M * N));
        const uint16_t* m = kind == 1 ? mins.data() : nullptr;
        const uint8_t* z = kind == 2 ? zeros.data() : nullptr;
        linear_w4(x.data(), K, M, packed.data(), scales.data(), m, z, nullptr, s, true, 1.f / 32,
                  nullptr, false, y8.data());
        for (float& v : x) v = v > 0 ? 127.f : -128.f;  // the float kernels at the same extremes
        linear_w4(x.data(), K, M, packed.data(), scales.data(), m, z, nullptr, s, false, 0.f,
                  nullptr, false, y32.data());
        Bytes out;
        put(out, y8), put(out, y32);
        return out;
      });
}

// ---- block formats (GGUF types): parts from random file blocks, int8 and float activations ----
uint16_t half_bits(Rng& r, bool allow_zero) {
  // a finite float16 of magnitude 2^-12 .. 2^-3 (or zero), either sign
  if (allow_zero && r.below(16) == 0) return 0;
  const uint16_t exp = (uint16_t)(3 + r.below(10)), man = (uint16_t)r.below(1024);
  return (uint16_t)((r.below(2) << 15) | (exp << 10) | man);
}

void blk_cases() {
  // AVX-512 rebuilds a panel pair's values once for all row tiles from 12 rows (bit planes) or 32
  const int64_t Ms[] = {1, 2, 3, 5, 8, 17, 33};
  const int64_t Ns[] = {1, 15, 16, 17, 33};
  for (int f = 0; f < kNumBlockFormats; ++f) {
    const BlockFormat& F = kBlockFormats[f];
    int idx = 0;
    for (int64_t M : Ms)
      for (int64_t N : Ns)
        for (int64_t nb = 1; nb <= 3; ++nb) {
          ++idx;
          const int64_t K = F.block * nb;
          const bool bias = idx % 2, gelu = idx % 7 == 0, cs = idx % 5 == 1;
          Rng r(20000 + 1000 * f + idx);
          const BlkShape s(f, N, K);
          // the weight: random file bytes repacked, then finite scale fields
          auto parts = std::make_shared<std::vector<std::vector<uint8_t>>>();
          static const int elem[] = {1, 1, 8, 2, 2, 1, 1};
          for (int p = 0; p < 7; ++p)
            parts->emplace_back((size_t)(s.part_size((BlkPart)p) * elem[p]));
          if (F.scale == ScaleKind::E8M0) (*parts)[3].resize((size_t)s.part_size(BlkPart::D));
          std::vector<uint8_t> raw((size_t)(N * K / F.block * F.bytes));
          for (auto& v : raw) v = (uint8_t)r.next();
          auto& P = *parts;
          blk_from_gguf(raw.data(), K / F.block * F.bytes, s, 0, N, P[0].data(), P[1].data(),
                        (uint64_t*)P[2].data(), P[3].data(), (uint16_t*)P[4].data(),
                        (int8_t*)P[5].data(), P[6].data());
          if (F.scale == ScaleKind::E8M0)
            for (auto& e : P[3]) e = (uint8_t)(118 + r.below(18));
          else
            for (size_t i = 0; i < P[3].size() / 2; ++i) ((uint16_t*)P[3].data())[i] = half_bits(r, true);
          for (size_t i = 0; i < P[4].size() / 2; ++i) ((uint16_t*)P[4].data())[i] = half_bits(r, false);
          auto x = std::make_shared<std::vector<float>>(activations(r, M, K, 2.f));
          auto b = std::make_shared<std::vector<float>>(r.floats(N, 2.f));
          auto c = std::make_shared<std::vector<float>>(r.floats(K, 2.f));
          add(std::string("blk:") + F.name,
              shape("M=%lld N=%lld K=%lld", M, N, K) + (bias ? " bias" : "") +
                  (gelu ? " gelu" : "") + (cs ? " colscale" : ""),
              [=] {
                auto& P = *parts;
                BlkArgs w{};
                w.fmt = f, w.N = N, w.Np = s.Np, w.K = K;
                w.q8 = P[0].data(), w.nib = P[1].data(), w.bits = (const uint64_t*)P[2].data();
                w.d = P[3].data(), w.dm = (const uint16_t*)P[4].data();
                w.sc = (const int8_t*)P[5].data(), w.mc = P[6].data();
                std::vector<float> y8((size_t)(M * N)), y32((size_t)(M * N));
                const float* bp = bias ? b->data() : nullptr;
                const float* cp = cs ? c->data() : nullptr;
                linear_blk(x->data(), K, M, w, bp, true, 0.f, cp, gelu, y8.data());
                linear_blk(x->data(), K, M, w, bp, false, 0.f, cp, gelu, y32.data());
                Bytes out;
                put(out, y8), put(out, y32);
                return out;
              });
        }
  }
}

// ---- lowbit.nn float ops and int4 packing ----
void nn_cases() {
  const int64_t sizes[] = {1, 3, 4, 5, 15, 16, 17, 33, 100, 1000, 40000};
  for (int64_t n : sizes)
    for (int t = 0; t < 2; ++t)
      add("nn", shape("gelu n=%lld tanh=%lld", n, t, 0), [n, t] {
        Rng r(30000 + n * 2 + t);
        std::vector<float> x = r.floats(n, 8.f), y((size_t)n);
        const float special[] = {INFINITY, -INFINITY, 100.f, -100.f, 1e-30f, -0.f, 10.f, -10.f};
        for (int i = 0; i < 8 && i < n; ++i) x[(size_t)(i * 7 % n)] = special[i];
        gelu(x.data(), y.data(), n, t);
        Bytes out;
        put(out, y);
        return out;
      });
  const int64_t widths[] = {1, 7, 16, 33, 384};
  for (int64_t n : widths)
    for (int rms = 0; rms < 2; ++rms)
      for (int res = 0; res < 2; ++res)
        add("nn", shape("layer_norm rows=3 n=%lld rms=%lld residual=%lld", n, rms, res), [=] {
          Rng r(31000 + n * 4 + rms * 2 + res);
          const int64_t rows = 3, ld = n + 3;
          std::vector<float> x = r.floats(rows * ld, 4.f), rr = r.floats(rows * n, 4.f);
          std::vector<float> w = r.floats(n, 2.f), b = r.floats(n, 1.f), y((size_t)(rows * n));
          layer_norm(x.data(), res ? rr.data() : nullptr, ld, w.data(), rms ? nullptr : b.data(),
                     1.f / 1024, rms, rows, n, y.data());
          Bytes out;
          put(out, y);
          return out;
        });
  const int64_t swidths[] = {1, 5, 16, 33, 1000};
  for (int64_t n : swidths)
    add("nn", shape("softmax rows=3 n=%lld", n, 0, 0), [n] {
      Rng r(32000 + n);
      std::vector<float> x = r.floats(3 * n, 16.f);
      x[0] = -INFINITY;
      softmax(x.data(), 3, n);
      Bytes out;
      put(out, x);
      return out;
    });
  struct AC { int64_t B, Sq, Sk, H, Hkv, d; bool causal, lengths; int64_t window; };
  const AC acs[] = {{1, 1, 1, 2, 1, 8, true, false, 0},   {1, 5, 8, 4, 2, 64, true, false, 0},
                    {2, 70, 70, 2, 2, 16, true, true, 0},  {2, 3, 9, 4, 1, 32, false, true, 0},
                    {1, 20, 20, 2, 1, 64, true, false, 5}, {1, 1, 40, 3, 3, 8, true, false, 7},
                    {2, 37, 37, 2, 1, 24, false, true, 0}};
  int ai = 0;
  for (const AC& c : acs) {
    add("nn", shape("attention B=%lld Sq=%lld Sk=%lld d=%lld", c.B, c.Sq, c.Sk, c.d) +
                  (c.causal ? " causal" : "") + (c.lengths ? " lengths" : "") +
                  (c.window ? " window" : ""),
        [c, ai] {
          Rng r(33000 + ai);
          std::vector<float> q = r.floats(c.B * c.Sq * c.H * c.d, 2.f);
          std::vector<float> k = r.floats(c.B * c.Sk * c.Hkv * c.d, 2.f);
          std::vector<float> v = r.floats(c.B * c.Sk * c.Hkv * c.d, 2.f);
          std::vector<float> out((size_t)(c.B * c.Sq * c.H * c.d));
          std::vector<int64_t> lengths((size_t)c.B);
          for (int64_t b = 0; b < c.B; ++b) lengths[(size_t)b] = c.Sk - b;
          AttnArgs a{};
          a.q = q.data(), a.k = k.data(), a.v = v.data(), a.out = out.data();
          const int64_t qs[3] = {c.Sq * c.H * c.d, c.H * c.d, c.d};
          const int64_t ks[3] = {c.Sk * c.Hkv * c.d, c.Hkv * c.d, c.d};
          std::memcpy(a.qs, qs, sizeof qs), std::memcpy(a.ks, ks, sizeof ks), std::memcpy(a.vs, ks, sizeof ks);
          a.B = c.B, a.Sq = c.Sq, a.Sk = c.Sk, a.H = c.H, a.Hkv = c.Hkv, a.d = c.d;
          a.lengths = c.lengths ? lengths.data() : nullptr;
          a.causal = c.causal, a.scale = 0.125f, a.window = c.window;
          attention(a);
          // again with the keys given transposed in 32-key blocks (lowbit.nn.KVCache's layout), NaN
          // past the keys
          const int64_t cols = (c.Sk + 31) / 32 * 32;
          std::vector<float> kt((size_t)(c.B * c.Hkv * c.d * cols), NAN), out_t(out.size());
          for (int64_t b = 0; b < c.B; ++b)
            for (int64_t j = 0; j < c.Sk; ++j)
              for (int64_t h = 0; h < c.Hkv; ++h)
                for (int64_t e = 0; e < c.d; ++e)
                  kt[(size_t)(((b * c.Hkv + h) * cols + j / 32 * 32) * c.d + e * 32 + j % 32)] =
                      k[(size_t)(ks[0] * b + ks[1] * j + ks[2] * h + e)];
          a.k = kt.data(), a.k_transposed = true, a.out = out_t.data();
          a.ks[0] = c.Hkv * c.d * cols, a.ks[1] = 32, a.ks[2] = c.d * cols, a.kbs = 32 * c.d;
          attention(a);
          if (std::memcmp(out.data(), out_t.data(), out.size() * sizeof(float))) {
            std::printf("attention with transposed keys differs from the plain layout\n");
            std::exit(1);
          }
          // precision="int8" (integer dot products through each set's dot4, vec.h)
          std::vector<float> out8(out.size());
          a.k = k.data(), a.k_transposed = false, a.out = out8.data(), a.int8 = true;
          std::memcpy(a.ks, ks, sizeof ks);
          attention(a);
          Bytes o;
          put(o, out);
          put(o, out8);
          return o;
        });
    ++ai;
  }
  for (int64_t n : {1, 5, 16, 17, 100, 1536})
    add("nn", shape("silu_mul rows=3 n=%lld", n, 0, 0), [n] {
      Rng r(36000 + n);
      std::vector<float> g = r.floats(3 * (n + 3), 16.f), u = r.floats(3 * (n + 3), 2.f), y((size_t)(3 * n));
      g[0] = -INFINITY, g[(size_t)(n > 1)] = 100.f, g[2 % (n + 3)] = -100.f;
      silu_mul(g.data(), n + 3, u.data(), n + 3, 3, n, y.data());
      Bytes out;
      put(out, y);
      return out;
    });
  for (int neox = 0; neox < 2; ++neox)  // (one source for every set: compared across machines)
    add("nn", shape("rope tokens=3 heads=5 d=64 neox=%lld", neox, 0, 0), [neox] {
      Rng r(35000 + neox);
      std::vector<float> x = r.floats(3 * 5 * 64, 4.f), c = r.floats(3 * 32, 1.f),
                         sn = r.floats(3 * 32, 1.f), y(x.size());
      rope(x.data(), 5 * 64, 3, 5, 64, c.data(), sn.data(), nullptr, neox, y.data());
      Bytes out;
      put(out, y);
      return out;
    });
  for (int64_t n : {1, 2, 3, 31, 32, 33, 100, 1001})
    add("int4", shape("pack / unpack n=%lld", n, 0, 0), [n] {
      Rng r(34000 + n);
      std::vector<uint8_t> q((size_t)(2 * n)), p((size_t)n), u((size_t)(2 * n));
      for (auto& v : q) v = (uint8_t)r.below(16);
      const int64_t bad_ok = pack_int4(q.data(), n, p.data());
      unpack_int4(p.data(), n, u.data());
      q[(size_t)(n / 2)] = 16;  // a value out of range is reported at its index
      const int64_t bad = pack_int4(q.data(), n, p.data());
      Bytes out;
      put(out, &bad_ok, 1), put(out, &bad, 1), put(out, u);
      return out;
    });
}

}  // namespace

int main(int argc, char** argv) {
  int8_cases();
  int32_cases();
  w4_cases();
  w4_extreme_cases();
  blk_cases();
  nn_cases();
  if (argc > 1 && std::string(argv[1]) == "--list") {
    for (const Case& c : cases) std::printf("%s: %s\n", c.family.c_str(), c.name.c_str());
    return 0;
  }
  set_num_threads(3);  // tasks split across threads too (results must not depend on it)
  const std::vector<std::string> sets = available_isas();
  std::printf("kernel sets on this CPU:");
  for (const std::string& s : sets) std::printf(" %s", s.c_str());
  std::printf("\n%zu cases\n", cases.size());

  const bool per_case = argc > 1 && std::string(argv[1]) == "--case-digests";
  set_isa("ref");
  std::vector<Bytes> want;
  std::map<std::string, uint64_t> digest;
  std::vector<std::string> families;
  for (const Case& c : cases) {
    want.push_back(c.run());
    if (!digest.count(c.family)) families.push_back(c.family), digest[c.family] = 0xCBF29CE484222325ull;
    digest[c.family] = fnv(digest[c.family], want.back());
    if (per_case)  // to find which case two machines disagree on
      std::printf("case %016llx %s: %s\n", (unsigned long long)fnv(0xCBF29CE484222325ull, want.back()),
                  c.family.c_str(), c.name.c_str());
  }
  int failures = 0;
  for (const std::string& set : sets) {
    if (set == "ref") continue;
    set_isa(set);
    int bad = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
      const Bytes got = cases[i].run();
      if (got == want[i]) continue;
      size_t at = 0;
      while (at < got.size() && at < want[i].size() && got[at] == want[i][at]) ++at;
      if (++bad <= 10)
        std::printf("MISMATCH %s %s: %s (first differing byte %zu of %zu)\n", set.c_str(),
                    cases[i].family.c_str(), cases[i].name.c_str(), at, want[i].size());
    }
    std::printf("%s: %s (%d of %zu cases differ from ref)\n", set.c_str(), bad ? "FAILED" : "ok", bad,
                cases.size());
    failures += bad;
  }
  for (const std::string& f : families)
    std::printf("digest %-12s %016llx\n", f.c_str(), (unsigned long long)digest[f]);
  return failures ? 1 : 0;
}
