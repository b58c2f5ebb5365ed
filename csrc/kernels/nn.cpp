// Float building blocks of transformer models (lowbit.nn): GELU, LayerNorm / RMSNorm, softmax,
// attention. One source for every ISA, compiled with each ISA's flags in its native vector width.
// Elementwise maths is the same operations on every lane; reductions keep 16 partial sums in a
// fixed order (combined pairwise) whatever the width; dot products are fma chains in a fixed
// order (hardware FMA, or the correctly rounded std::fma where the ISA has none). So results are
// bit-identical on every ISA.
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#include "kernels/isa.h"
#include "kernels/vec.h"

namespace lowbit {
namespace LOWBIT_NS {
namespace {

constexpr int kLanes = 16;  // partial sums of every reduction

// Tiles of attention: kTile queries x 32 keys (or 32 of head_dim), kTile * kV accumulators, as
// many as the ISA's registers hold beside the operands (vec.h: the vector of kN floats).
#if defined(__AVX512F__)
constexpr int64_t kTile = 8;  // 16 accumulators: two FMA pipes of latency 4 stay busy
#elif defined(__FMA__)
constexpr int64_t kTile = 2;
#elif defined(__ARM_NEON)
constexpr int64_t kTile = 4;  // 32 vector registers: 4 queries x 8 accumulators beside the operands
#else
constexpr int64_t kTile = 2;
#endif
constexpr int kV = 32 / kN;  // vectors per 32 floats

// v, kept in a register: an operand loaded once for several rows' FMAs. Without it the compiler
// folds the load into each FMA (one load per row), and at 2 x 256 bits a cycle (Zen 4) the loads,
// not the FMAs, set the pace of the attention tiles.
template <class V>
inline V in_register(V v) {
#if defined(__AVX2__) || defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__ARM_NEON)
  asm("" : "+w"(v));
#endif
  return v;
}

// e^x in float32 (relative error ~2e-7): 2^k * e^r with k = round(x / ln 2), |r| <= ln(2) / 2,
// e^r by its degree-7 Taylor polynomial. Below -87.3 (where e^x leaves the normal range): 0.
// Polynomials here step by fmav, one rounding per step on every ISA: a multiply and an add each
// made GELU's erf form 1.6x slower (Zen 4: 6.3 M values 4.9 -> 3.0 ms).
inline vf expv(vf x) {
  vf xc = x > 88.f ? splat(88.f) : x;
  xc = xc < -87.f ? splat(-87.f) : xc;
  const vf k = fmav(xc, splat(1.44269504f), splat(12582912.f)) - 12582912.f;  // nearest integer
  const vf r = fmav(k, splat(-1.42860677e-6f), fmav(k, splat(-0.693145752f), xc));  // ln 2 in two parts
  vf p = splat(1.f / 5040);
  p = fmav(p, r, splat(1.f / 720));
  p = fmav(p, r, splat(1.f / 120));
  p = fmav(p, r, splat(1.f / 24));
  p = fmav(p, r, splat(1.f / 6));
  p = fmav(p, r, splat(0.5f));
  p = fmav(p, r, splat(1.f));
  p = fmav(p, r, splat(1.f));
  const vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  return x < -87.3f ? splat(0.f) : p * (vf)bits;
}

// e^(-z) for z >= 0 (or NaN) in float32 (relative error ~3e-9 before rounding): 2^-k * e^-r with
// k = round(z / ln 2), r = z - k ln 2 in [-ln(2) / 2, ln(2) / 2], e^-r by a degree-6 polynomial
// fitted on that interval (Chebyshev nodes); 2^-k from the bits of the rounding sum itself. Past
// z = 87.3 (e^-z below the normal range): 0. A NaN z gives a finite value (GELU's other factors
// carry the NaN).
inline vf neg_exp(vf z) {
  const vf zc = z < 87.3f ? z : splat(87.3f);
  const vf s = fmav(zc, splat(1.44269504f), splat(12582912.f));  // 1.5 * 2^23 + k, k in its low bits
  const vf k = s - 12582912.f;
  const vf r = fmav(k, splat(-1.42860677e-6f), fmav(k, splat(-0.693145752f), zc));
  vf p = splat(0.00139485812f);
  p = fmav(p, r, splat(-0.00837512873f));
  p = fmav(p, r, splat(0.0416662171f));
  p = fmav(p, r, splat(-0.166664153f));
  p = fmav(p, r, splat(0.5f));
  p = fmav(p, r, splat(-1.f));
  p = fmav(p, r, splat(1.f));
  const vi bits = (vi)(0x3F800000u - (((vu)s - 0x4B400000u) << 23));  // 2^-k
  return z > 87.3f ? splat(0.f) : p * (vf)bits;
}

// y[i] = f(x[i]) a vector at a time (the tail through a zero-padded vector); y may be x. Four
// vectors per step: f is a long chain of dependent operations (polynomials, a division), and four
// independent chains keep the FP units busy where one would leave them waiting on latency.
template <class F>
inline void map(const float* x, float* y, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 4 * kN <= n; i += 4 * kN) {
    const vf v0 = f(load(x + i)), v1 = f(load(x + i + kN));
    const vf v2 = f(load(x + i + 2 * kN)), v3 = f(load(x + i + 3 * kN));
    store(y + i, v0);
    store(y + i + kN, v1);
    store(y + i + 2 * kN, v2);
    store(y + i + 3 * kN, v3);
  }
  for (; i + kN <= n; i += kN) store(y + i, f(load(x + i)));
  if (i < n) {
    vf v = {};
    std::memcpy(&v, x + i, (size_t)(n - i) * sizeof(float));
    v = f(v);
    std::memcpy(y + i, &v, (size_t)(n - i) * sizeof(float));
  }
}

// The lanes of v combined by op in halves, in registers: lane l op lane l + n/2 for l < n/2, then
// the same on those, down to one lane (the order of combine's and max_of's trees).
// (Halves by shuffles, not copies through memory: those kept the loop variable of the caller,
// max_of's, in memory, a store and a load each step.)
template <class V, size_t... L>
inline auto lo_half(V v, std::index_sequence<L...>) { return __builtin_shufflevector(v, v, L...); }
template <class V, size_t... L>
inline auto hi_half(V v, std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, (L + sizeof...(L))...);
}
template <class V, class Op>
inline auto fold_halves(V v, Op op) {
  constexpr size_t n = sizeof(V) / sizeof(v[0]);
  if constexpr (n == 1) {
    return v[0];
  } else {
    return fold_halves(op(lo_half(v, std::make_index_sequence<n / 2>()),
                          hi_half(v, std::make_index_sequence<n / 2>())), op);
  }
}

// 16 partial sums combined pairwise (lane l with l + 8, then l + 4, ...), held as kLanes / kN
// vectors (lanes 0.., kN.., ...) or as 16 floats.
inline float combine(const vf* acc) {
  vf v[kLanes / kN];
  for (int i = 0; i < kLanes / kN; ++i) v[i] = acc[i];
  for (int n = kLanes / kN; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i) v[i] += v[i + n / 2];
  return fold_halves(v[0], [](auto a, auto b) { return a + b; });
}
inline float combine(const float* acc) {
  vf v[kLanes / kN];
  std::memcpy(v, acc, sizeof v);
  return combine(v);
}

// Sum of n floats as 16 interleaved partial sums combined pairwise.
inline float sum16(const float* v, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += v[i];
  return combine(acc);
}

inline float sq_sum16(const float* v, float mean, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += (v[i + l] - mean) * (v[i + l] - mean);
  for (int l = 0; i < n; ++i, ++l) acc[l] += (v[i] - mean) * (v[i] - mean);
  return combine(acc);
}

// Largest of n >= 1 floats (max is exact: any order gives the same value).
inline float max_of(const float* v, int64_t n) {
  vf m = splat(v[0]);
  int64_t i = 0;
  for (; i + kN <= n; i += kN) m = load(v + i) > m ? load(v + i) : m;
  float r = v[0];
  for (; i < n; ++i) r = v[i] > r ? v[i] : r;
  // a tree: a short dependency chain
  const float top = fold_halves(m, [](auto a, auto b) { return b > a ? b : a; });
  return top > r ? top : r;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// kN vectors of kN floats transposed in registers (lane c of row r to lane r of row c): round W
// swaps bit W of the row with bit W of the lane, each pair of rows by two two-input shuffles.
template <int W, size_t... L>
inline void transpose_round(vf* rows, std::index_sequence<L...>) {
  for (int r = 0; r < kN; ++r)
    if (!(r & W)) {
      const vf a = rows[r], b = rows[r + W];
      rows[r] = __builtin_shufflevector(a, b, (L & W ? kN + L - W : L)...);
      rows[r + W] = __builtin_shufflevector(a, b, (L & W ? kN + L : L + W)...);
    }
  if constexpr (W > 1) transpose_round<W / 2>(rows, std::index_sequence<L...>());
}
inline void transpose(vf* rows) { transpose_round<kN / 2>(rows, std::make_index_sequence<kN>()); }

// The larger of a and b per lane, NaN where either is.
template <class V>
inline V max_nan(V a, V b) {
  return (b > a) | (b != b) ? b : a;
}

// The first n < kN floats at p, zeros after them (n >= kN: a whole vector; n <= 0: zeros).
inline vf load_n(const float* p, int64_t n) {
  if (n >= kN) return load(p);
  vf v = {};
  if (n > 0) std::memcpy(&v, p, (size_t)n * sizeof(float));
  return v;
}

// round-half-even(x) for |x| < 2^22, as integer lanes: x + 1.5 * 2^23 holds the rounded integer in
// its low mantissa bits (a conversion instruction would round by the rounding mode).
inline vi round_to_int(vf x) { return (vi)(x + 12582912.f) - 0x4B400000; }

typedef uint8_t vb __attribute__((vector_size(kN)));  // kN bytes

// int8 quantization of lanes of largest magnitude m: 127 / m where that is a finite number (0 for
// m = 0, NaN, or so small that 127 / m overflows: such lanes quantize to 0 and their scale, NaN or
// tiny, tells), and q = round-half-even(x * inv), 0 where x * inv is NaN (x infinite or NaN), so
// that every q is in -127..127 and sums of them cannot overflow.
inline vf inverse_scale(vf m) {
  const vf inv = 127.f / m;
  return (m > 0.f) & (inv < INFINITY) ? inv : splat(0.f);
}
inline vi quantize_lanes(vf x, vf inv) {
  const vf t = x * inv;
  return round_to_int(t == t ? t : splat(0.f));
}

inline vf absv(vf v) { return v < 0.f ? -v : v; }

// Rows row(0) .. row(rows - 1) of d floats to symmetric int8, kN rows at a time transposed in
// registers, so that each row's scale and values are lanewise work: scale = amax / 127,
// q = round-half-even(x * (127 / amax)) in -127..127 (inverse_scale, quantize_lanes; a row with
// NaN or inf gets scale NaN or inf, which marks whatever uses it). Byte c of row i, q + add, at
// out[((c / 4) * ldo + i) * 4 + c % 4] (4 dimensions of a row in a 32-bit lane; dimensions
// d .. d4 * 4 hold add), its scale at scale[i] and, when sum is given, the sum of its q at
// sum[i]. Rows from `rows` to the next multiple of kN (ldo and the arrays reach it) get zeros and
// scale 0. tmp: round_up(d4 * 4, kN) * kN floats.
template <class Row>
void quantize_rows(const Row& row, int64_t rows, int64_t d, uint8_t add, uint8_t* out, int64_t ldo,
                   float* scale, int32_t* sum, float* tmp) {
  const int64_t d4 = (d + 3) / 4, dt = round_up(d4 * 4, kN);
  for (int64_t i0 = 0; i0 < rows; i0 += kN) {
    const int64_t n = rows - i0 < kN ? rows - i0 : kN;
    vf m0 = {}, m1 = {};
    for (int64_t c = 0; c < dt; c += kN) {
      vf t[kN];
      if (n == kN && c + kN <= d)  // (the common case without the copies of load_n)
        for (int i = 0; i < kN; ++i) t[i] = load(row(i0 + i) + c);
      else
        for (int i = 0; i < kN; ++i) t[i] = i < n ? load_n(row(i0 + i) + c, d - c) : vf{};
      transpose(t);
      for (int i = 0; i < kN; i += 2) {
        store(tmp + (c + i) * kN, t[i]);
        store(tmp + (c + i + 1) * kN, t[i + 1]);
        m0 = max_nan(m0, absv(t[i]));
        m1 = max_nan(m1, absv(t[i + 1]));
      }
    }
    const vf m = max_nan(m0, m1), inv = inverse_scale(m);
    store(scale + i0, m / 127.f);
    vi total = {};
    for (int64_t c4 = 0; c4 < d4; ++c4) {
      vu w = {};
      for (int i = 0; i < 4; ++i) {
        const vi q = quantize_lanes(load(tmp + (c4 * 4 + i) * kN), inv);
        total += q;
        w |= (vu)((q + add) & 0xFF) << (8 * i);
      }
      std::memcpy(out + (c4 * ldo + i0) * 4, &w, sizeof w);
    }
    if (sum) std::memcpy(sum + i0, &total, sizeof total);
  }
}

}  // namespace

void gelu(const float* x, float* y, int64_t n, bool tanh) {
  if (tanh) {
    // x (1 + tanh u) / 2 = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): one exp, one
    // division. Where -2u > 88 (x < -10) the result, below 1e-37 in size, is 0 (so GELU(-inf) = 0).
    map(x, y, n, [](vf v) {
      const vf m2u = v * fmav(v * v, splat(-0.0713548162f), splat(-1.59576912f));
      return m2u > 88.f ? splat(0.f) : v / (expv(m2u) + 1.f);
    });
    return;
  }
  // x * Phi(x) = max(x, 0) - |x| * erfc(|x| / sqrt 2) / 2, erfc by Abramowitz & Stegun 7.1.26
  // (|error| <= 1.5e-7): erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-a^2), t = 1/(1+pa),
  // the coefficients halved (the / 2), e^(-a^2) as neg_exp computes it
  map(x, y, n, [](vf v) {
    const vf av = (vf)((vu)v & 0x7FFFFFFFu);
    const vf a = av * 0.707106781f;
    const vf t = 1.f / fmav(a, splat(0.3275911f), splat(1.f));
    vf p = splat(0.5307027145f);
    p = fmav(p, t, splat(-0.7265760135f));
    p = fmav(p, t, splat(0.7107068705f));
    p = fmav(p, t, splat(-0.142248368f));
    p = fmav(p, t, splat(0.127414796f));
    const vf half_erfc = (p * t) * neg_exp(a * a);
    // where erfc underflows to 0 the tail term is 0 (for |x| = inf too, where inf * 0 is NaN):
    // GELU(+inf) = +inf, GELU(-inf) = 0; NaN stays NaN
    const vf tail = half_erfc == 0.f ? splat(0.f) : av * half_erfc;
    return (v > 0.f ? v : splat(0.f)) - tail;
  });
}

void mul(const float* x, const float* c, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kN <= n; i += kN) store(y + i, load(x + i) * load(c + i));
  for (; i < n; ++i) y[i] = x[i] * c[i];
}

void silu_mul(const float* g, const float* u, float* y, int64_t n) {
  const auto f = [](vf v, vf w) {
    const vf m = -v;
    return (m > 88.f ? splat(0.f) : v / (expv(m) + 1.f)) * w;
  };
  int64_t i = 0;
  for (; i + kN <= n; i += kN) store(y + i, f(load(g + i), load(u + i)));
  if (i < n) {
    vf a = {}, b = {};
    std::memcpy(&a, g + i, (size_t)(n - i) * sizeof(float));
    std::memcpy(&b, u + i, (size_t)(n - i) * sizeof(float));
    const vf v = f(a, b);
    std::memcpy(y + i, &v, (size_t)(n - i) * sizeof(float));
  }
}

void layer_norm(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                float eps, bool rms, int64_t rows, int64_t n, float* y) {
  for (int64_t m = 0; m < rows; ++m) {
    float* out = y + m * n;
    const float* in = x + m * ld;
    if (r) {
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] + r[m * n + i];
      in = out;
    }
    const float mean = rms ? 0.f : sum16(in, n) / (float)n;
    const float inv = 1.f / __builtin_sqrtf(sq_sum16(in, mean, n) / (float)n + eps);
    if (rms)
      for (int64_t i = 0; i < n; ++i) out[i] = in[i] * inv * w[i];
    else
      for (int64_t i = 0; i < n; ++i) out[i] = (in[i] - mean) * inv * w[i] + b[i];
  }
}

void softmax(float* x, int64_t rows, int64_t n) {
  for (int64_t m = 0; m < rows; ++m) {
    float* v = x + m * n;
    const float mx = max_of(v, n);
    map(v, v, n, [mx](vf e) { return expv(e - mx); });
    const float inv = 1.f / sum16(v, n);
    for (int64_t i = 0; i < n; ++i) v[i] *= inv;
  }
}

// f(R) for the tile of n rows: R = n up to kTile (one instance per count, so that a short tile
// runs no copies of its rows), kTile beyond.
template <int64_t R = 1, class F>
void with_rows(int64_t n, const F& f) {
  if constexpr (R >= kTile)
    f(std::integral_constant<int64_t, kTile>());
  else if (n <= R)
    f(std::integral_constant<int64_t, R>());
  else
    with_rows<R + 1>(n, f);
}

// buf holding at least n elements (kept between calls: grown, never shrunk here).
template <class T>
void grow(std::vector<T>& buf, int64_t n) {
  if (buf.size() < (size_t)n) buf.resize((size_t)n);
}

// A thread's buffer above 4 MB let go (kept between calls otherwise).
template <class T>
void let_go_if_large(std::vector<T>& buf) {
  if (buf.capacity() * sizeof(T) > (size_t(4) << 20)) std::vector<T>().swap(buf);
}

// int8 attention's keys and values from key j0 (k and v point at it; rows kld, vld floats apart)
// into the layouts attention_impl reads: keys [0, held) per key (quantize_rows), zeros up to Kp;
// values per 32-key block and dimension over the keys that hold data, [0, filled) (filled >=
// held: a block's scales do not depend on how many of its keys a query sees), zeros up to Kp.
void fill_int8(const float* k, int64_t kld, const float* v, int64_t vld, int64_t d, int64_t held,
               int64_t filled, int64_t Kp, std::vector<uint8_t>& kq, std::vector<float>& ksc,
               std::vector<int32_t>& kcorr, std::vector<uint8_t>& vq, std::vector<float>& vsc,
               std::vector<float>& tmp) {
  const int64_t d4 = (d + 3) / 4, dp = round_up(d, 32);
  filled = filled < Kp ? filled : Kp;
  grow(kq, d4 * Kp * 4), grow(ksc, Kp), grow(kcorr, Kp), grow(vq, Kp * dp), grow(vsc, Kp / 32 * dp);
  grow(tmp, round_up(d4 * 4, kN) * kN);
  quantize_rows([&](int64_t j) { return k + j * kld; }, held, d, 0, kq.data(), Kp, ksc.data(),
                kcorr.data(), tmp.data());
  for (int64_t j = held; j < Kp; ++j) {  // padding keys
    ksc[j] = 0.f, kcorr[j] = 0;
    for (int64_t c4 = 0; c4 < d4; ++c4) std::memset(&kq[(c4 * Kp + j) * 4], 0, 4);
  }
  for (int64_t j = 0; j < held; ++j) kcorr[j] *= 128;
  for (int64_t jb = 0; jb < Kp; jb += 32) {
    const int64_t n = filled - jb < 0 ? 0 : filled - jb < 32 ? filled - jb : 32;
    for (int64_t c = 0; c < dp; c += kN) {
      auto value = [&](int64_t j) {  // dimensions c.. of value jb + j
        return d - c >= kN ? load(v + (jb + j) * vld + c) : load_n(v + (jb + j) * vld + c, d - c);
      };
      vf m0 = {}, m1 = {};
      int64_t j = 0;
      for (; j + 2 <= n; j += 2)
        m0 = max_nan(m0, absv(value(j))), m1 = max_nan(m1, absv(value(j + 1)));
      if (j < n) m0 = max_nan(m0, absv(value(j)));
      const vf m = max_nan(m0, m1), inv = inverse_scale(m);
      store(&vsc[jb / 32 * dp + c], m / 127.f);
      for (int64_t j4 = 0; j4 < 32; j4 += 4) {
        vu w = {};
        for (int64_t i = 0; i < 4; ++i)
          if (j4 + i < n) w |= (vu)(quantize_lanes(value(j4 + i), inv) & 0xFF) << (8 * i);
        std::memcpy(&vq[((jb + j4) / 4 * dp + c) * 4], &w, sizeof w);
      }
    }
  }
}

// I8: lowbit.nn.attention's precision="int8" (kernels.h), else float32.
template <bool I8>
void attention_impl(const AttnArgs* a, int64_t t0, int64_t t1) {
  const int64_t d = a->d, dp = round_up(d, 32);
  const int64_t blocks = (a->Sq + kAttnQueries - 1) / kAttnQueries, group = a->H / a->Hkv;
  const int64_t off = a->Sk - a->Sq;  // query i sits at key position off + i
  // k transposed (d, Kp), v padded (Kp, dp) when needed, a tile's weights (kTile, Kp), of keys j0..:
  // kept per thread between calls (a decode step calls once per layer), let go above 4 MB
  thread_local std::vector<float> kt, vp, S;
  // int8: keys as bytes [d4][Kp][4] (4 dimensions of a key in a 32-bit lane), their scales and
  // 128 x their sums; values as bytes [Kp / 4][dp][4] (4 keys of a dimension in a lane), a scale
  // per 32-key block and dimension [Kp / 32][dp]; the task's queries + 128 as bytes [d4][ldq][4]
  // and their scales; a tile's weights as bytes [kTile][Kp] and its powers of two per block
  // [kTile][Kp / 32]; quantize_rows' transposed rows (tmp)
  thread_local std::vector<float> ksc, vsc, qsc, tmp, bsc;
  thread_local std::vector<int32_t> kcorr;
  thread_local std::vector<uint8_t> kq, vq, qq, P;
  struct Trim {
    ~Trim() {
      for (std::vector<float>* buf : {&kt, &vp, &S, &ksc, &vsc, &qsc, &tmp, &bsc})
        let_go_if_large(*buf);
      let_go_if_large(kcorr);
      for (std::vector<uint8_t>* buf : {&kq, &vq, &qq, &P}) let_go_if_large(*buf);
    }
  } trim;
  const int64_t d4 = (d + 3) / 4, ldq = round_up(kAttnQueries > kTile ? kAttnQueries : kTile, kN);
  if constexpr (I8) grow(tmp, round_up(d4 * 4, kN) * kN), grow(qq, d4 * ldq * 4), grow(qsc, ldq);
  float sums[kTile];  // of the tile's rows' weights
  bool bad[kTile];    // int8: the row met a NaN (its output is NaN)
  int64_t filled_b = -1, filled_kvh = -1, filled_j0 = -1, filled_keys = 0, Kp = 0;
  // dimension c of key j (from j0) at krows + j / 32 * kbs + c * kld + j % 32: 32-key blocks of d
  // rows (the caller's, lowbit.nn.KVCache's layout), or d whole rows of keys (kbs = 32)
  const float* krows = nullptr;
  const float* vrows = nullptr;  // value row j (from j0) at vrows + j * vld
  int64_t kld = 0, kbs = 32, vld = 0;
  for (int64_t t = t0, next; t < t1; t = next) {
    const int64_t b = t / (a->H * blocks), h = t / blocks % a->H, kvh = h / group;
    const int64_t i0 = t % blocks * kAttnQueries;
    const int64_t i1 = i0 + kAttnQueries < a->Sq ? i0 + kAttnQueries : a->Sq;
    // The tile's rows: queries i0 .. i1 - 1 of head h; or, for one query per head (a decode
    // step), that query of the following heads that read the same KV head (GQA), up to kTile of
    // them, so that a tile holds independent chains and reads the keys and values once.
    int64_t heads = 1;
    if (a->Sq == 1)
      while (heads < kTile && t + heads < t1 && (h + heads) / group == kvh) ++heads;
    next = t + heads;
    // row r: query i0 + r * qstep of head h + r * hstep
    const int64_t rows = heads > 1 ? heads : i1 - i0, qstep = heads > 1 ? 0 : 1, hstep = 1 - qstep;
    auto query = [&](int64_t r) { return i0 + r * qstep; };
    int64_t keys = a->lengths ? (a->lengths[b] < a->Sk ? a->lengths[b] : a->Sk) : a->Sk;
    if (a->causal && off + i1 < keys) keys = off + i1;  // the most any query of the block sees
    // Sliding window: the block's first query sees keys from off + i0 - window + 1 on. Keys are
    // held from j0, a multiple of 32 at or below that, so that every key keeps its lane (j mod 16)
    // in the sums: a query's result does not depend on the block it is computed in.
    const int64_t from = a->window > 0 ? off + i0 - a->window + 1 : 0;
    const int64_t j0 = from > 0 ? from / 32 * 32 : 0;
    // row r's query and output rows
    auto qrow = [&](int64_t r) {
      return a->q + b * a->qs[0] + (h + r * hstep) * a->qs[2] + query(r) * a->qs[1];
    };
    auto orow = [&](int64_t r) {
      return a->out + (b * a->Sq * a->H + h + r * hstep) * d + query(r) * a->H * d;
    };
    if (keys <= j0) {
      for (int64_t r = 0; r < rows; ++r) std::memset(orow(r), 0, (size_t)d * sizeof(float));
      continue;
    }
    if (b != filled_b || kvh != filled_kvh || j0 != filled_j0 || keys > filled_keys) {
      // (GQA heads share a fill)
      Kp = round_up(keys - j0, 32);
      const int64_t held = keys - j0;
      grow(S, kTile * Kp);
      const float* k = a->k + b * a->ks[0] + kvh * a->ks[2];
      const float* v = a->v + b * a->vs[0] + kvh * a->vs[2];
      if constexpr (I8) {
        fill_int8(k + j0 * a->ks[1], a->ks[1], v + j0 * a->vs[1], a->vs[1], d, held,
                  (a->lengths && a->lengths[b] < a->Sk ? a->lengths[b] : a->Sk) - j0, Kp, kq, ksc,
                  kcorr, vq, vsc, tmp);
        grow(P, kTile * Kp), grow(bsc, kTile * Kp / 32);
      } else if (a->k_transposed) {  // the caller's rows (past `held` they only feed padding scores)
        krows = k + j0 / 32 * a->kbs, kld = a->ks[1], kbs = a->kbs;
      } else {  // transposed kN keys x kN dimensions at a time in registers, the rest one by one
        // rows of the transposed keys Kp + 16 floats apart: an odd number of cache lines, so that
        // the d rows a score tile reads spread over every L1 set (a stride of 1 or 4 KB, Kp = 256
        // or 1024, would put them all in a few sets and evict them each step)
        const int64_t ktld = Kp + 16;
        grow(kt, d * ktld);
        const int64_t jv = held / kN * kN, cv = d / kN * kN;
        for (int64_t jb = 0; jb < jv; jb += kN)
          for (int64_t c = 0; c < cv; c += kN) {
            vf t[kN];
            for (int i = 0; i < kN; ++i) t[i] = load(k + (j0 + jb + i) * a->ks[1] + c);
            transpose(t);
            for (int i = 0; i < kN; ++i) store(&kt[(c + i) * ktld + jb], t[i]);
          }
        for (int64_t c = 0; c < d; ++c)
          for (int64_t j = c < cv ? jv : 0; j < held; ++j) kt[c * ktld + j] = k[(j0 + j) * a->ks[1] + c];
        // the padding keys score 0 (their weights are then zeroed by the softmax pass)
        for (int64_t c = 0; c < d; ++c) std::memset(&kt[c * ktld + held], 0, (size_t)(Kp - held) * sizeof(float));
        krows = kt.data(), kld = ktld, kbs = 32;
      }
      // v read where it is when its rows fill whole 32-float chunks (head_dim 64, 128, ...),
      // else copied with each row padded by zeros to dp (int8: fill_int8 above)
      if constexpr (!I8) {
        if (d == dp) {
          vrows = v + j0 * a->vs[1], vld = a->vs[1];
        } else {
          grow(vp, Kp * dp);
          for (int64_t j = 0; j < held; ++j) {
            std::memcpy(&vp[j * dp], v + (j0 + j) * a->vs[1], (size_t)d * sizeof(float));
            std::memset(&vp[j * dp + d], 0, (size_t)(dp - d) * sizeof(float));
          }
          vrows = vp.data(), vld = dp;
        }
      }
      filled_b = b, filled_kvh = kvh, filled_j0 = j0, filled_keys = keys;
      // The next kv head's keys and values into L2 while this one computes: a fill reads its
      // rows a token's stride apart, from memory after the projection that wrote them, ahead of
      // any hardware prefetcher (with the next head's queries below: MiniLM's attention 3-5%
      // faster after a cache flush, Zen 4).
      if (!a->k_transposed && kvh + 1 < a->Hkv)
        for (int64_t j = j0; j < keys; ++j)
          for (int64_t c = 0; c < d; c += 16) {
            __builtin_prefetch(k + a->ks[2] + j * a->ks[1] + c, 0, 2);
            __builtin_prefetch(v + a->vs[2] + j * a->vs[1] + c, 0, 2);
          }
    }
    if (h + 1 < a->H)
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t c = 0; c < d; c += 16)
          __builtin_prefetch(a->q + b * a->qs[0] + (h + 1) * a->qs[2] + i * a->qs[1] + c, 0, 2);
    // The task's output lines, for writing, long before its tiles store them (rows a token's
    // stride apart, beyond the caches for a batch: MiniLM-sized calls 2-4% faster, Zen 4)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(orow(r) + c, 1, 3);
    // Row r sees the held keys [first(r), limit(r)) (indices from j0).
    auto limit = [&](int64_t r) {
      const int64_t i = query(r), n = a->causal && off + i + 1 < keys ? off + i + 1 : keys;
      return n > j0 ? n - j0 : 0;
    };
    auto first = [&](int64_t r) {
      const int64_t f = a->window > 0 ? off + query(r) - a->window + 1 : 0;
      return f > j0 ? f - j0 : 0;
    };
    const int64_t kend = round_up(keys - j0, 32);

    // The block's rows go through in tiles of R (the rows left, up to kTile): scores, softmax
    // weights, outputs, so that the tile's weights (row r at S + r * Kp) stay in L1 throughout.
    // Scores: R rows x 32 keys in registers, an fma per element of d.
    const vf scale = splat(a->scale);
    auto score_tile = [&](int64_t r0, auto tile) {
      constexpr int64_t R = decltype(tile)::value;  // (with_rows: R <= the rows left)
      const float* qr[R];
      for (int64_t r = 0; r < R; ++r) qr[r] = qrow(r0 + r);
      // keys past the tile's last row's limit are never read (causal): not scored
      const int64_t jend = round_up(limit(r0 + R - 1), 32);
      for (int64_t j = 0; j < jend; j += 32) {
        vf acc[R][kV] = {};
        for (int64_t c = 0; c < d; ++c) {
          vf kv[kV];
          for (int u = 0; u < kV; ++u) kv[u] = in_register(load(krows + j / 32 * kbs + c * kld + u * kN));
          for (int64_t r = 0; r < R; ++r) {
            const vf qv = splat(qr[r][c]);
            for (int u = 0; u < kV; ++u) acc[r][u] = fmav(qv, kv[u], acc[r][u]);
          }
        }
        for (int64_t r = 0; r < R; ++r)
          for (int u = 0; u < kV; ++u) store(&S[r * Kp + j + u * kN], acc[r][u] * scale);
      }
    };
    // Softmax weights of rows [r0, r1), unnormalised and zero outside their keys; their sums.
    auto softmax_rows = [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* row = &S[(r - r0) * Kp];
        const int64_t lo = first(r), n = limit(r);
        if (n <= lo) {  // no key to see
          std::memset(row, 0, (size_t)kend * sizeof(float));
          sums[r - r0] = 0.f;
          continue;
        }
        const float mx = max_of(row + lo, n - lo);
        // e^(s - max) over the 16-key blocks that hold [lo, n) (by map: independent chains), zero
        // around them; then the 16 partial sums
        const int64_t jb = lo / kLanes * kLanes, je = round_up(n, kLanes);
        map(row + jb, row + jb, je - jb, [mx](vf e) { return expv(e - mx); });
        if (lo) std::memset(row, 0, (size_t)lo * sizeof(float));
        if (n < kend) std::memset(row + n, 0, (size_t)(kend - n) * sizeof(float));
        vf acc[kLanes / kN] = {};
        for (int64_t j = jb; j < je; j += kLanes)
          for (int u = 0; u < kLanes / kN; ++u) acc[u] += load(row + j + u * kN);
        sums[r - r0] = combine(acc);  // >= 1 (the max's own weight), or NaN: kept
      }
    };
    // Outputs: a tile of R rows x 32 of d, an fma per key, then divided by the sum (keys outside a
    // row's range weigh 0 and leave its sums unchanged; those before the tile's first visible key
    // are skipped).
    auto out_tile = [&](int64_t r0, auto tile) {
      constexpr int64_t R = decltype(tile)::value;
      const float* sr[R];
      for (int64_t r = 0; r < R; ++r) sr[r] = &S[r * Kp];
      // Row r takes only its keys [first(r), limit(r)): a key outside them gets no fma at all
      // (a zero weight times a NaN or inf value is NaN, and which rows share a tile is the
      // ISA's). The rows' ranges start and end in row order, so the keys every row sees form one
      // run [all_lo, all_hi); around it each row checks its own range.
      int64_t fr[R], lr[R];
      for (int64_t r = 0; r < R; ++r) fr[r] = first(r0 + r), lr[r] = limit(r0 + r);
      const int64_t lo = fr[0], n = lr[R - 1], all_lo = fr[R - 1];
      const int64_t all_hi = lr[0] > all_lo ? lr[0] : all_lo;
      for (int64_t c = 0; c < dp; c += 32) {
        vf acc[R][kV] = {};
        auto step = [&](int64_t j, auto every_row) {
          vf vv[kV];
          for (int u = 0; u < kV; ++u) vv[u] = in_register(load(vrows + j * vld + c + u * kN));
          for (int64_t r = 0; r < R; ++r)
            if (every_row || (j >= fr[r] && j < lr[r])) {
              const vf p = splat(sr[r][j]);
              for (int u = 0; u < kV; ++u) acc[r][u] = fmav(p, vv[u], acc[r][u]);
            }
        };
        int64_t j = lo;
        for (; j < n && j < all_lo; ++j) step(j, std::false_type());
        for (; j < all_hi; ++j) step(j, std::true_type());
        for (; j < n; ++j) step(j, std::false_type());
        float o[R][32];  // stored with constant indices: acc stays in registers
        for (int64_t r = 0; r < R; ++r)
          for (int u = 0; u < kV; ++u) store(&o[r][u * kN], acc[r][u]);
        const int64_t width = d - c < 32 ? d - c : 32;
        for (int64_t r = 0; r < R; ++r) {
          const float sum = sums[r];
          for (int64_t e = 0; e < width; ++e) o[r][e] = sum != 0.f ? o[r][e] / sum : 0.f;  // 0: no key
          if (width == 32)  // (a constant size: no call)
            std::memcpy(orow(r0 + r) + c, o[r], 32 * sizeof(float));
          else
            std::memcpy(orow(r0 + r) + c, o[r], (size_t)width * sizeof(float));
        }
      }
    };

    // int8: the block's queries quantized as the keys are, then scores in log2 units: the exact
    // int dot times (scale_q * (scale * log2 e)) * scale_k.
    if constexpr (I8)
      quantize_rows([&](int64_t r) { return qrow(r); }, rows, d, 128, qq.data(), ldq, qsc.data(),
                    nullptr, tmp.data());
    const float qscale = a->scale * 1.44269504f;
    auto score_tile_i8 = [&](int64_t r0, auto tile) {
      constexpr int64_t R = decltype(tile)::value;
      const int64_t jend = round_up(limit(r0 + R - 1), 32);
      for (int64_t j = 0; j < jend; j += 32) {
        vi acc[R][kV] = {};
        for (int64_t c4 = 0; c4 < d4; ++c4) {
          vi kv[kV];
          for (int u = 0; u < kV; ++u) kv[u] = in_register(loadi(&kq[(c4 * Kp + j + u * kN) * 4]));
          for (int64_t r = 0; r < R; ++r) {
            const vi qv = splat4(&qq[(c4 * ldq + r0 + r) * 4]);
            for (int u = 0; u < kV; ++u) acc[r][u] = dot4(acc[r][u], qv, kv[u]);
          }
        }
        for (int u = 0; u < kV; ++u) {
          const vi corr = loadi(&kcorr[j + u * kN]);
          const vf ks = load(&ksc[j + u * kN]);
          for (int64_t r = 0; r < R; ++r)
            store(&S[r * Kp + j + u * kN],
                  __builtin_convertvector(acc[r][u] - corr, vf) * ((qsc[r0 + r] * qscale) * ks));
        }
      }
    };
    // int8: each row's weights 2^(s - max) (its largest 1) in 32-key blocks, as bytes
    // u = round(180 * 2^(s - max - kb)) with 2^kb a power of two per row and block (kb the
    // largest round(s - max) of the block's keys the row sees; the bytes then reach 180 * 2^0.5
    // < 255.5), 0 for the keys it does not see; the sum of the row's weights 2^(kb - 7) * u,
    // key j in partial sum j mod 16 (combine). A key far below its row's largest keeps 8 bits of
    // its block's largest, not of the row's: a long tail of small weights is not rounded away.
    // 2^t by 2^round(t) times a degree-5 polynomial of the rest (relative error 3e-6, far below
    // a byte's step), t taken in [-60, 0]. A NaN among the scores the row sees marks the row.
    auto softmax_rows_i8 = [&](int64_t r0, int64_t r1) {
      vi lane;
      for (int l = 0; l < kN; ++l) lane[l] = l;
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = &S[(r - r0) * Kp];
        uint8_t* pr = &P[(r - r0) * Kp];
        float* br = &bsc[(r - r0) * (Kp / 32)];
        const int64_t lo = first(r), n = limit(r);
        sums[r - r0] = 0.f, bad[r - r0] = false;
        if (n <= lo) {
          std::memset(pr, 0, (size_t)kend);
          continue;
        }
        const float mx = max_of(row + lo, n - lo);
        const int64_t jb = lo / 32 * 32, je = round_up(n, 32);
        vi nan = {};
        vf z[kLanes / kN] = {};  // the weights' sum: key j in partial sum j mod 16 (as combine's)
        // one 32-key block; edge: it holds keys the row does not see (the masks), else all seen
        auto block = [&](int64_t j, auto edge) {
          vf p[kV];
          vi k[kV], seen[kV], kmax = vi{} - 61;
          for (int u = 0; u < kV; ++u) {
            const int64_t j1 = j + u * kN;
            const vf t = load(row + j1) - mx;
            vf tc = t > -60.f ? t : splat(-60.f);
            if constexpr (edge) {
              seen[u] = (lane + (int32_t)j1 >= (int32_t)lo) & (lane + (int32_t)j1 < (int32_t)n);
              nan |= (t != t) & seen[u];
              tc = tc < 0.f ? tc : splat(0.f);  // (keys the row does not see may score above its max)
            } else {
              nan |= t != t;
            }
            const vf big = tc + 12582912.f;
            const vf f = tc - (big - 12582912.f);  // in [-1/2, 1/2]
            vf q = splat(1.33335581e-3f);
            q = fmav(q, f, splat(9.61812911e-3f));
            q = fmav(q, f, splat(5.55041087e-2f));
            q = fmav(q, f, splat(2.40226507e-1f));
            q = fmav(q, f, splat(6.93147181e-1f));
            p[u] = fmav(q, f, splat(1.f));
            k[u] = (vi)big - 0x4B400000;  // round(tc), -60..0
            const vi kseen = edge ? (seen[u] ? k[u] : vi{} - 61) : k[u];
            kmax = kmax > kseen ? kmax : kseen;
          }
          const int32_t kb = fold_halves(kmax, [](auto x, auto y) { return x > y ? x : y; });
          // 2^(kb - 7): the sums come out about 180 / 128 times what float weights would give
          // (little headroom lost to overflow); every block here has a key seen, so kb >= -60
          const int32_t bits = (kb - 7 + 127) << 23;
          float scale;
          std::memcpy(&scale, &bits, sizeof scale);
          br[j / 32] = scale;
          for (int u = 0; u < kV; ++u) {
            // 2^(k - kb): k - kb in -60..0 for the keys seen, -60..61 for the others (masked)
            const vf x = p[u] * (vf)((k[u] - kb + 127) << 23) * 180.f;
            const vi w = round_to_int(edge ? (seen[u] ? x : splat(0.f)) : x);
            z[u % (kLanes / kN)] += __builtin_convertvector(w, vf) * scale;  // (exact products)
            const vb bytes = __builtin_convertvector(w, vb);
            std::memcpy(pr + j + u * kN, &bytes, kN);
          }
        };
        for (int64_t j = jb; j < je; j += 32)
          j >= lo && j + 32 <= n ? block(j, std::false_type()) : block(j, std::true_type());
        if (jb) std::memset(pr, 0, (size_t)jb);
        if (je < kend) std::memset(pr + je, 0, (size_t)(kend - je));
        sums[r - r0] = combine(z);
        bad[r - r0] = fold_halves(nan, [](auto x, auto y) { return x | y; }) != 0;
      }
    };
    // int8: per 32-key block the exact int dot of the weights with the values' bytes, times the
    // row's 2^(kb - 7) for the block and the block's scales, added in block order; divided by the sum
    // of the weights. A row takes only the blocks that hold keys it sees (what it computes does
    // not depend on the tile it is in).
    auto out_tile_i8 = [&](int64_t r0, auto tile) {
      constexpr int64_t R = decltype(tile)::value;
      int64_t b_lo[R], b_hi[R];
      for (int64_t r = 0; r < R; ++r) b_lo[r] = first(r0 + r) / 32, b_hi[r] = round_up(limit(r0 + r), 32) / 32;
      const int64_t lo = first(r0) / 32, hi = round_up(limit(r0 + R - 1), 32) / 32;
      for (int64_t c = 0; c < dp; c += 32) {
        vf acc[R][kV] = {};
        for (int64_t blk = lo; blk < hi; ++blk) {
          vi dots[R][kV] = {};
          for (int64_t j4 = blk * 8; j4 < blk * 8 + 8; ++j4) {
            vi vv[kV];
            for (int u = 0; u < kV; ++u) vv[u] = in_register(loadi(&vq[(j4 * dp + c + u * kN) * 4]));
            for (int64_t r = 0; r < R; ++r) {
              const vi p = splat4(&P[r * Kp + j4 * 4]);
              for (int u = 0; u < kV; ++u) dots[r][u] = dot4(dots[r][u], p, vv[u]);
            }
          }
          vf vs[kV];
          for (int u = 0; u < kV; ++u) vs[u] = load(&vsc[blk * dp + c + u * kN]);
          for (int64_t r = 0; r < R; ++r)
            if (blk >= b_lo[r] && blk < b_hi[r]) {
              const float scale = bsc[r * (Kp / 32) + blk];
              for (int u = 0; u < kV; ++u)
                acc[r][u] = fmav(__builtin_convertvector(dots[r][u], vf) * scale, vs[u], acc[r][u]);
            }
        }
        float o[R][32];
        for (int64_t r = 0; r < R; ++r)
          for (int u = 0; u < kV; ++u) store(&o[r][u * kN], acc[r][u]);
        const int64_t width = d - c < 32 ? d - c : 32;
        for (int64_t r = 0; r < R; ++r) {
          const float sum = sums[r];
          for (int64_t e = 0; e < width; ++e)
            o[r][e] = bad[r] ? NAN : sum != 0.f ? o[r][e] / sum : 0.f;
          std::memcpy(orow(r0 + r) + c, o[r], (size_t)width * sizeof(float));
        }
      }
    };
    for (int64_t r = 0; r < rows; r += kTile)
      with_rows(rows - r, [&](auto R) {
        if constexpr (I8) {
          score_tile_i8(r, R);
          softmax_rows_i8(r, r + R);
          out_tile_i8(r, R);
        } else {
          score_tile(r, R);
          softmax_rows(r, r + R);
          out_tile(r, R);
        }
      });
  }
}

void attention(const AttnArgs* a, int64_t t0, int64_t t1) {
  a->int8 ? attention_impl<true>(a, t0, t1) : attention_impl<false>(a, t0, t1);
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
