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
inline vf in_register(vf v) {
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
template <class V, class Op>
inline float fold_halves(V v, Op op) {
  if constexpr (sizeof(V) == sizeof(float)) {
    return v[0];
  } else {
    typedef float H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
    return fold_halves(op(lo, hi), op);
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
  // (|error| <= 1.5e-7): erfc(a) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-a^2), t = 1/(1+pa)
  map(x, y, n, [](vf v) {
    const vf av = v < 0.f ? -v : v;
    const vf a = av * 0.707106781f;
    const vf t = 1.f / fmav(a, splat(0.3275911f), splat(1.f));
    vf p = splat(1.061405429f);
    p = fmav(p, t, splat(-1.453152027f));
    p = fmav(p, t, splat(1.421413741f));
    p = fmav(p, t, splat(-0.284496736f));
    p = fmav(p, t, splat(0.254829592f));
    const vf half_erfc = (p * t) * 0.5f * expv(-(a * a));
    // where erfc underflows to 0 the tail term is 0 (for |x| = inf too, where inf * 0 is NaN):
    // GELU(+inf) = +inf, GELU(-inf) = 0; NaN stays NaN
    const vf tail = half_erfc == 0.f ? splat(0.f) : av * half_erfc;
    return (v > 0.f ? v : splat(0.f)) - tail;
  });
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

void attention(const AttnArgs* a, int64_t t0, int64_t t1) {
  const int64_t d = a->d, dp = round_up(d, 32);
  const int64_t blocks = (a->Sq + kAttnQueries - 1) / kAttnQueries, group = a->H / a->Hkv;
  const int64_t off = a->Sk - a->Sq;  // query i sits at key position off + i
  // k transposed (d, Kp), v padded (Kp, dp) when needed, a tile's weights (kTile, Kp), of keys j0..:
  // kept per thread between calls (a decode step calls once per layer), let go above 4 MB
  thread_local std::vector<float> kt, vp, S;
  struct Trim {
    ~Trim() {
      for (std::vector<float>* buf : {&kt, &vp, &S})
        if (buf->capacity() * sizeof(float) > (size_t(4) << 20)) std::vector<float>().swap(*buf);
    }
  } trim;
  float sums[kTile];  // of the tile's rows
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
      // rows of the transposed keys Kp + 16 floats apart: an odd number of cache lines, so that
      // the d rows a score tile reads spread over every L1 set (a stride of 1 or 4 KB, Kp = 256
      // or 1024, would put them all in a few sets and evict them each step)
      const int64_t ktld = Kp + 16;
      if (!a->k_transposed && kt.size() < (size_t)(d * ktld)) kt.resize((size_t)(d * ktld));
      if (d != dp && vp.size() < (size_t)(Kp * dp)) vp.resize((size_t)(Kp * dp));
      if (S.size() < (size_t)(kTile * Kp)) S.resize((size_t)(kTile * Kp));
      const float* k = a->k + b * a->ks[0] + kvh * a->ks[2];
      const float* v = a->v + b * a->vs[0] + kvh * a->vs[2];
      if (a->k_transposed) {  // the caller's rows (past `held` they only feed padding scores)
        krows = k + j0 / 32 * a->kbs, kld = a->ks[1], kbs = a->kbs;
      } else {  // transposed kN keys x kN dimensions at a time in registers, the rest one by one
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
      // else copied with each row padded by zeros to dp
      if (d == dp) {
        vrows = v + j0 * a->vs[1], vld = a->vs[1];
      } else {
        for (int64_t j = 0; j < held; ++j) {
          std::memcpy(&vp[j * dp], v + (j0 + j) * a->vs[1], (size_t)d * sizeof(float));
          std::memset(&vp[j * dp + d], 0, (size_t)(dp - d) * sizeof(float));
        }
        vrows = vp.data(), vld = dp;
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
      const int64_t lo = first(r0), n = limit(r0 + R - 1);
      for (int64_t c = 0; c < dp; c += 32) {
        vf acc[R][kV] = {};
        for (int64_t j = lo; j < n; ++j) {
          vf vv[kV];
          for (int u = 0; u < kV; ++u) vv[u] = in_register(load(vrows + j * vld + c + u * kN));
          for (int64_t r = 0; r < R; ++r) {
            const vf p = splat(sr[r][j]);
            for (int u = 0; u < kV; ++u) acc[r][u] = fmav(p, vv[u], acc[r][u]);
          }
        }
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
    for (int64_t r = 0; r < rows; r += kTile)
      with_rows(rows - r, [&](auto R) {
        score_tile(r, R);
        softmax_rows(r, r + R);
        out_tile(r, R);
      });
  }
}

}  // namespace LOWBIT_NS
}  // namespace lowbit
