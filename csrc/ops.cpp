#include "ops.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <cstring>
#include <mutex>
#include <numeric>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "threadpool.h"

namespace lowbit {
namespace {

// Below this many multiply-adds a matrix product runs on the caller's thread: waking a worker
// costs more than it saves. In a model's decode step the weights come from DRAM, not cache, and one
// core alone streams them at half the machine's bandwidth: SmolLM2's 1 x 576 x 576 (331K) and
// 1 x 960 x 576 layers took 18 / 30 us on one thread and 12 / 18 us on two (Zen 4, 2 threads,
// bench/RESULTS.md "Small GEMVs on two threads"); from cache, two threads cost about the same as
// one there (bench/calls.py). 1 x 576 x 192 (110K) stays on one thread.
constexpr int64_t kSerialMacs = 1 << 18;
// Weight quantization (once per weight, from cache or not) threads from here.
constexpr int64_t kSerialQuantize = 1 << 20;

// Scratch memory per thread, grown on demand and kept between calls up to kKeepScratch bytes per
// buffer (ops.h), so that most calls allocate nothing; a larger one is freed when the call that
// needed it returns (ScratchScope), so one call on a 512 MB input leaves no 500 MB resident for
// the life of the thread.

struct ScratchBuffers {
  std::vector<uint8_t> bytes, activations;
  std::vector<float> scales;
};

ScratchBuffers& buffers() {
  thread_local ScratchBuffers b;
  return b;
}

// Declared first in every op that takes the calling thread's scratch buffers (which stay valid
// until the op returns): trims them when it does.
struct ScratchScope {
  ScratchScope() = default;
  ScratchScope(const ScratchScope&) = delete;
  ScratchScope& operator=(const ScratchScope&) = delete;
  ~ScratchScope() {
    ScratchBuffers& b = buffers();
    trim(b.bytes);
    trim(b.activations);
    trim(b.scales);
  }
};

uint8_t* scratch(size_t bytes) {
  std::vector<uint8_t>& buf = buffers().bytes;
  if (buf.size() < bytes) buf.resize(bytes);
  return buf.data();
}

float* scratch_scales(int64_t M) {
  std::vector<float>& buf = buffers().scales;
  if ((int64_t)buf.size() < M) buf.resize((size_t)M);
  return buf.data();
}

// Row stride of the activation operand: 64-byte aligned, and never a multiple of 4 KB, so the rows
// a tile reads do not all fall into the same L1 cache set.
int64_t activation_stride(int64_t Kp) { return round_up(Kp, 64) % 4096 ? round_up(Kp, 64) : Kp + 64; }

// The kernels' activation operand: M rows of lda bytes (room for a multiple of 32 rows). With
// `amx_pad`, the rows after M up to that multiple hold 128 (the INT8 GEMM's zero), which the AMX
// kernel reads whole. (Padding every call cost a 1 x 576 x 576 GEMV an 18 KB memset, half of L1.)
uint8_t* activation_buffer(int64_t M, int64_t lda, bool amx_pad = false) {
  std::vector<uint8_t>& buf = buffers().activations;
  const size_t rows = (size_t)round_up(M, 32), bytes = rows * (size_t)lda;
  if (buf.size() < bytes) buf.resize(bytes);
  if (amx_pad) std::memset(buf.data() + M * lda, 128, (rows - (size_t)M) * (size_t)lda);
  return buf.data();
}

// Whether an INT8 GEMM of M rows may run on AMX tiles (the `amx` kernel set, kAmxMinRows rows or
// more), and so needs activation_buffer's padding rows.
bool amx_rows(const Kernels& kt, int64_t M) { return M >= kAmxMinRows && std::strcmp(kt.name, "amx") == 0; }

// One input row as the kernels read it: dst[k] = x[perm[k]] (the packed input order of act-order
// weights; x[k] without perm), times c[k] where given (one float multiply on every ISA), with
// the caller's kernel set `kt` (pool workers have no use_isa choice of their own).
void gather_row(const Kernels& kt, const float* x, int64_t K, const float* c, const int64_t* perm,
                float* dst) {
  if (!perm && !c) {
    std::memcpy(dst, x, (size_t)K * sizeof(float));
  } else if (!perm) {
    kt.mul(x, c, dst, K);
  } else if (!c) {
    for (int64_t k = 0; k < K; ++k) dst[k] = x[perm[k]];
  } else {
    for (int64_t k = 0; k < K; ++k) dst[k] = x[perm[k]] * c[k];
  }
}

// Runs quant(rows, ld, r0, r1) over rows [m0, m1) of x, `rows` pointing at row r0, ld floats
// apart: x itself in one call, or, with per-column factors c (a layer's input_scale) or an input
// order perm, blocks of rows as gather_row makes them in a per-thread buffer (ld = K; trimmed
// like the scratch buffers, as it returns).
template <class Quant>
void with_scaled_rows(const Kernels& kt, const float* x, int64_t ldx, int64_t K, const float* c,
                      const int64_t* perm, int64_t m0, int64_t m1, const Quant& quant) {
  if (!c && !perm) return quant(x + m0 * ldx, ldx, m0, m1);
  constexpr int64_t kRows = 16;
  thread_local std::vector<float> buf;
  buf.resize((size_t)(kRows * K));
  for (int64_t r0 = m0; r0 < m1; r0 += kRows) {
    const int64_t r1 = r0 + kRows < m1 ? r0 + kRows : m1;
    for (int64_t m = r0; m < r1; ++m)
      gather_row(kt, x + m * ldx, K, c, perm, buf.data() + (m - r0) * K);
    quant(buf.data(), K, r0, r1);
  }
  trim(buf);
}

// Splits rows x panels into tasks (row block x panel block), panel-block major so that a thread's
// consecutive tasks reuse the same weights from cache, and runs fn(m0, m1, p0, p1) on the pool.
// Few rows stream the weights: one long contiguous panel range per thread; more rows: blocks of
// `pb` panels and row blocks of `mb` rows. Each output is computed whole inside one task.
// Each thread takes a contiguous range of the tasks. So panel blocks are of equal size (within a
// panel: 24 panels in blocks of 16 gave one thread 16 and the other 8, a third of the time lost),
// and there are as many as give every thread whole panel blocks (blocks of at least 4 panels), or
// else a task count that is a multiple of the thread count.
template <class Fn>
void split(int64_t M, int64_t panels, int64_t mb, int64_t pb, int64_t work, const Fn& fn) {
  const int64_t nt = get_num_threads();
  if (work < kSerialMacs || nt == 1 || panels == 1) {
    fn(0, M, 0, panels);
    return;
  }
  if (M <= 4) {  // one even share of the panels per thread (in 8-panel steps when large)
    pb = (panels + nt - 1) / nt;
    if (pb > 32) pb = round_up(pb, 8);
  }
  const int64_t row_blocks = (M + mb - 1) / mb;
  int64_t panel_blocks = (panels + pb - 1) / pb;
  if (M > 4) {
    const int64_t want = round_up(panel_blocks, nt) * 4 <= panels ? nt : nt / std::gcd(nt, row_blocks);
    panel_blocks = round_up(panel_blocks, want);
    if (panel_blocks > panels) panel_blocks = panels;
  }
  // panel block i: [i * panels / panel_blocks, (i + 1) * panels / panel_blocks)
  auto edge = [&](int64_t i) {
    return M > 4 ? i * panels / panel_blocks : (i * pb < panels ? i * pb : panels);
  };
  parallel_for(row_blocks * panel_blocks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t % row_blocks, i = t / row_blocks;
      fn(r * mb, (r + 1) * mb < M ? (r + 1) * mb : M, edge(i), edge(i + 1));
    }
  });
}

// Byte offsets of weight (n, k) in the packed layouts (kernels.h).
int64_t w8_at(const W8Shape& s, int64_t n, int64_t k) {
  return ((n / kPanel * s.Kp / kKStep + k / kKStep) * kPanel + n % kPanel) * kKStep + k % kKStep;
}
int64_t w4_at(const Q4Shape& s, int64_t n, int64_t k) {
  return (n / kPanel * s.Kp / kQ4Step + k / kQ4Step) * 64 + n % kPanel * 4 + k % 4;
}
// ORs nibble q of weight (n, k) into zero-filled packed int4 weights.
void put_w4(uint8_t* packed, const Q4Shape& s, int64_t n, int64_t k, uint8_t q) {
  packed[w4_at(s, n, k)] |= k % kQ4Step < 4 ? q : (uint8_t)(q << 4);
}

// Runs fn(n0, n1) over ranges of whole 16-row panels of an N x K matrix, threaded when large.
template <class Fn>
void over_panels(int64_t N, int64_t K, const Fn& fn) {
  const int64_t panels = round_up(N, kPanel) / kPanel;
  auto body = [&](int64_t p0, int64_t p1) { fn(p0 * kPanel, p1 * kPanel < N ? p1 * kPanel : N); };
  if (N * K < kSerialQuantize)
    body(0, panels);
  else
    parallel_for(panels, body);
}

// Runs quantize(n0, n1, &why) -> first bad row in [n0, n1) or -1, over panel ranges (threaded when
// the matrix is large), and returns the first bad row of all with its reason.
template <class Fn>
int64_t quantize_rows(int64_t N, int64_t K, int* why, const Fn& quantize) {
  std::mutex mutex;
  int64_t bad = -1;
  over_panels(N, K, [&](int64_t n0, int64_t n1) {
    int r_why = 0;
    const int64_t r = quantize(n0, n1, &r_why);
    std::lock_guard<std::mutex> lock(mutex);
    if (r >= 0 && (bad < 0 || r < bad)) {
      bad = r;
      *why = r_why;
    }
  });
  return bad;
}

// GELU in place on rows [m0, m1) x panels [p0, p1) of a float32 output (N columns, ldc apart):
// the epilogue of a task's block while it is still in cache.
void gelu_block(const Kernels& kt, float* c, int64_t ldc, int64_t N, int64_t m0, int64_t m1,
                int64_t p0, int64_t p1) {
  const int64_t n0 = p0 * kPanel, n1 = p1 * kPanel < N ? p1 * kPanel : N;
  for (int64_t m = m0; m < m1 && n0 < n1; ++m) kt.gelu(c + m * ldc + n0, c + m * ldc + n0, n1 - n0, false);
}

// The INT8 GEMM over all rows and panels (float32 outputs through GELU when `gelu`).
void run_gemm(const Kernels& kt, const GemmArgs& args, bool int32_out, bool gelu = false) {
  const auto gemm = int32_out ? kt.gemm_u8s8_i32 : kt.gemm_u8s8_f32;
  // Row blocks keep the activation block around 256 KB (in L2 next to a block of weights), in
  // multiples of 96 rows: whole 6-row VNNI tiles and 32-row AMX blocks.
  const int64_t mb = (256 * 1024 / args.Kp) / 96 * 96 > 96 ? (256 * 1024 / args.Kp) / 96 * 96 : 96;
  const size_t elem = int32_out ? sizeof(int32_t) : sizeof(float);
  split(args.M, args.Np / kPanel, mb, 16, args.M * args.N * args.Kp,
        [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
          GemmArgs sub = args;
          sub.M = m1 - m0;
          sub.a = args.a + m0 * args.lda;
          if (args.ascale) sub.ascale = args.ascale + m0;
          sub.c = (char*)args.c + m0 * args.ldc * elem;
          gemm(&sub, p0, p1);
          if (gelu) gelu_block(kt, (float*)args.c, args.ldc, args.N, m0, m1, p0, p1);
        });
}

// Float activation rows [m0, m1) for the weight-only kernels: x (gathered by perm, times the
// per-column factors c) padded with zeros to Kp, and, when `sums`, each group's sum of x: 8
// interleaved partial sums combined pairwise, one fixed order for every ISA and thread count
// (group a multiple of 8).
void float_rows(const Kernels& kt, const float* x, int64_t ldx, int64_t K, int64_t Kp, const float* c,
                const int64_t* perm, int64_t group, int64_t m0, int64_t m1, float* dst0,
                int64_t lda, float* sums, int64_t G) {
  for (int64_t m = m0; m < m1; ++m) {
    float* dst = dst0 + m * lda;
    gather_row(kt, x + m * ldx, K, c, perm, dst);
    std::memset(dst + K, 0, (size_t)(Kp - K) * sizeof(float));
    for (int64_t g = 0; sums && g < G; ++g) {
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = g * group; k < (g + 1) * group; k += 8)
        for (int i = 0; i < 8; ++i) part[i] += dst[k + i];
      sums[m * G + g] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
  }
}

}  // namespace

W8Shape::W8Shape(int64_t n, int64_t k, int64_t grp)
    : N(n), K(k), Np(round_up(n, kPanel)), Kp(grp ? k : round_up(k, kKStep)),
      group(grp ? grp : Kp), G(Kp / group) {}

int64_t quantize_w8(const float* w, int64_t ldw, const W8Shape& s, int8_t* packed, float* scales,
                    int32_t* comp) {
  const Kernels& kt = kernels();
  int why = 0;
  return quantize_rows(s.N, s.K, &why, [&](int64_t n0, int64_t n1, int*) {
    return kt.quantize_w8(w, ldw, s.N, s.K, s.Kp, s.group, n0, n1, packed, scales, comp);
  });
}

void linear_w8a8(const float* x, int64_t ldx, int64_t M, const int8_t* packed, const float* scales,
                 const int32_t* comp, const float* bias, const W8Shape& s, float act_scale,
                 int32_t act_zero, const float* colscale, bool gelu, float* y, const int64_t* perm) {
  if (M == 0) return;
  const ScratchScope scope;
  const Kernels& kt = kernels();
  const int64_t lda = activation_stride(s.Kp);
  uint8_t* a = activation_buffer(M, lda, amx_rows(kt, M));
  float* ascale = (float*)scratch_scales(M);
  auto quant = [&](int64_t m0, int64_t m1) {
    with_scaled_rows(kt, x, ldx, s.K, colscale, perm, m0, m1, [&](const float* rows, int64_t ld, int64_t r0, int64_t r1) {
      kt.quantize_a8(rows, ld, s.K, s.Kp, 0, r1 - r0, a + r0 * lda, lda, ascale + r0, act_scale, act_zero);
    });
  };
  M * s.K < (1 << 16) ? quant(0, M) : parallel_for(M, quant);
  GemmArgs args{a, lda, M, packed, scales, comp, s.Kp, s.group, s.Np, s.N, ascale, bias, y, s.N};
  run_gemm(kt, args, false, gelu);
}

void linear_w8f32(const float* x, int64_t ldx, int64_t M, const int8_t* packed, const float* scales,
                  const float* bias, const W8Shape& s, const float* colscale, bool gelu, float* y,
                  const int64_t* perm) {
  if (M == 0) return;
  const ScratchScope scope;
  const Kernels& kt = kernels();
  // the rows as they are where they need no padding and no per-column factors, else a copy
  const bool direct = !colscale && !perm && s.K == s.Kp;
  const int64_t lda = direct ? ldx : activation_stride(s.Kp * 4) / 4;
  const float* a = x;
  if (!direct) {
    float* rows = (float*)activation_buffer(M, lda * 4);
    auto prep = [&](int64_t m0, int64_t m1) {
      float_rows(kt, x, ldx, s.K, s.Kp, colscale, perm, s.group, m0, m1, rows, lda, nullptr, s.G);
    };
    M * s.K >= (1 << 16) ? parallel_for(M, prep) : prep(0, M);
    a = rows;
  }
  const GemmArgs args{(const uint8_t*)a, lda, M, packed, scales, nullptr, s.Kp, s.group, s.Np,
                      s.N, nullptr, bias, y, s.N};
  split(M, s.Np / kPanel, 64, 8, M * s.N * s.Kp, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    GemmArgs sub = args;
    sub.M = m1 - m0;
    sub.a = (const uint8_t*)(a + m0 * lda);
    sub.c = y + m0 * s.N;
    kt.gemm_s8f32(&sub, p0, p1);
    if (gelu) gelu_block(kt, y, s.N, s.N, m0, m1, p0, p1);
  });
}

void gemm_s8(const int8_t* a, int64_t M, const int8_t* b, int64_t N, int64_t K, int32_t* c) {
  if (M == 0 || N == 0) return;
  const ScratchScope scope;
  const W8Shape s(N, K, 0);
  // Operands in the kernel's form: a + 128 padded with 128; b in panels, with its column sums.
  const size_t b_bytes = (size_t)(s.Np * s.Kp);
  const int64_t lda = activation_stride(s.Kp);
  uint8_t* au = activation_buffer(M, lda, amx_rows(kernels(), M));
  uint8_t* buf = scratch(b_bytes + (size_t)s.Np * sizeof(int32_t));
  int8_t* bp = (int8_t*)buf;
  int32_t* comp = (int32_t*)(buf + b_bytes);
  std::memset(bp, 0, b_bytes);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) au[m * lda + k] = (uint8_t)(a[m * K + k] ^ 0x80);
    for (int64_t k = K; k < s.Kp; ++k) au[m * lda + k] = 128;
  }
  for (int64_t n = 0; n < s.Np; ++n) {
    int32_t sum = 0;
    for (int64_t k = 0; n < N && k < K; ++k) {
      bp[w8_at(s, n, k)] = b[n * K + k];
      sum += b[n * K + k];
    }
    comp[n] = 128 * sum;
  }
  GemmArgs args{au, lda, M, bp, nullptr, comp, s.Kp, s.Kp, s.Np, N, nullptr, nullptr, c, N};
  run_gemm(kernels(), args, true);
}

double dot_peak(double seconds) {
  const Kernels& kt = kernels();
  const int64_t nt = get_num_threads();
  int64_t iters = 1 << 16;
  for (;;) {  // grow until one round takes a measurable time, then scale to `seconds`
    std::atomic<int64_t> macs{0};
    const auto t0 = std::chrono::steady_clock::now();
    parallel_for(nt, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) macs += kt.dot_peak(iters);
    });
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > seconds / 4 || iters > (int64_t(1) << 40)) return (double)macs.load() / dt;
    iters = (int64_t)((double)iters * (dt > 1e-4 ? seconds / dt : 16.0));
  }
}

double read_bandwidth(const uint8_t* p, int64_t n, int repeats) {
  const Kernels& kt = kernels();
  const int64_t nt = get_num_threads();
  std::atomic<uint64_t> sink{0};
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < repeats; ++r)
    parallel_for(nt, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) sink ^= kt.stream_read(p + n * t / nt, n * (t + 1) / nt - n * t / nt);
    });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink.load() == 1 ? 0.0 : (double)n * repeats / dt;  // the test only keeps `sink` alive
}

Q4Shape::Q4Shape(int64_t n, int64_t k, int64_t grp)
    : N(n), K(k), Np(round_up(n, kPanel)), Kp(grp ? k : round_up(k, kActBlock)),
      group(grp ? grp : Kp), G(Kp / group) {}

int64_t quantize_w4(const float* w, int64_t ldw, const Q4Shape& s, uint8_t* packed,
                    uint16_t* scales, uint16_t* mins, int* why) {
  const Kernels& kt = kernels();
  return quantize_rows(s.N, s.K, why, [&](int64_t n0, int64_t n1, int* row_why) {
    return kt.quantize_w4(w, ldw, s.N, s.K, s.Kp, s.group, n0, n1, packed, scales, mins, row_why);
  });
}

void linear_w4(const float* x, int64_t ldx, int64_t M, const uint8_t* packed,
               const uint16_t* scales, const uint16_t* mins, const uint8_t* zeros,
               const float* bias, const Q4Shape& s,
               bool int8_activations, float act_scale, const float* colscale, bool gelu,
               float* y, const int64_t* perm) {
  if (M == 0) return;
  const ScratchScope scope;
  const Kernels& kt = kernels();
  const int64_t nblocks = s.Kp / kActBlock;
  const int64_t elem = int8_activations ? 1 : 4;
  const int64_t lda = activation_stride(s.Kp * elem) / elem;
  uint8_t* a = activation_buffer(M, lda * elem);
  // per row: group sums, 32-block scales and, for symmetric weights, 32-block integer sums
  const bool symmetric = int8_activations && !mins && !zeros;
  float* agroup = scratch_scales(M * (s.G + nblocks + (symmetric ? nblocks : 0)));
  float* ablock = agroup + M * s.G;
  int32_t* asum = symmetric ? (int32_t*)(ablock + M * nblocks) : nullptr;
  const bool big = M * s.K >= (1 << 16);
  if (int8_activations) {
    auto quant = [&](int64_t m0, int64_t m1) {
      with_scaled_rows(kt, x, ldx, s.K, colscale, perm, m0, m1, [&](const float* rows, int64_t ld, int64_t r0, int64_t r1) {
        kt.quantize_a8_blocks(rows, ld, s.K, s.Kp, s.group, 0, r1 - r0, (int8_t*)a + r0 * lda, lda,
                              ablock + r0 * nblocks, agroup + r0 * s.G,
                              asum ? asum + r0 * nblocks : nullptr, act_scale);
      });
    };
    big ? parallel_for(M, quant) : quant(0, M);
  } else {
    auto prep = [&](int64_t m0, int64_t m1) {
      float_rows(kt, x, ldx, s.K, s.Kp, colscale, perm, s.group, m0, m1, (float*)a, lda, agroup, s.G);
    };
    big ? parallel_for(M, prep) : prep(0, M);
  }
  const Q4Args args{M, s.N, s.Np, s.Kp, s.group, packed, scales, mins, zeros, a, lda, ablock, agroup, asum, bias, y, s.N};
  const auto gemm = int8_activations ? kt.gemm_q4a8 : kt.gemm_q4f32;
  split(M, s.Np / kPanel, 64, 8, M * s.N * s.Kp, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    Q4Args sub = args;
    sub.M = m1 - m0;
    sub.a = (const uint8_t*)a + m0 * lda * elem;
    sub.ablock = ablock + m0 * nblocks;
    sub.agroup = agroup + m0 * s.G;
    if (asum) sub.asum = asum + m0 * nblocks;
    sub.c = y + m0 * s.N;
    gemm(&sub, p0, p1);
    if (gelu) gelu_block(kt, y, s.N, s.N, m0, m1, p0, p1);
  });
}

void pack_w8(const int8_t* q, const W8Shape& s, int8_t* packed, int32_t* comp) {
  over_panels(s.N, s.K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < s.G; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * s.group; k < (g + 1) * s.group && k < s.K; ++k) {
          packed[w8_at(s, n, k)] = q[n * s.K + k];
          sum += q[n * s.K + k];
        }
        comp[g * s.Np + n] = 128 * sum;
      }
  });
}

void pack_w4(const uint8_t* q, const Q4Shape& s, uint8_t* packed) {
  over_panels(s.N, s.K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < s.K; ++k) put_w4(packed, s, n, k, q[n * s.K + k]);
  });
}

// GGUF blocks of 32 weights along a row. Q4_0: float16 d, 16 bytes;
// Q4_1: float16 d, float16 m, 16 bytes; element j < 16 is byte j's low nibble, j + 16 its high.
void gguf_q4(const uint8_t* raw, int64_t row_bytes, bool has_min, const Q4Shape& s,
             uint8_t* packed, uint16_t* scales, uint16_t* mins) {
  const int64_t bytes = has_min ? 20 : 18;
  over_panels(s.N, s.K, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < s.G; ++g) {
        const uint8_t* block = raw + n * row_bytes + g * bytes;
        const int64_t at = (n / kPanel * s.G + g) * kPanel + n % kPanel;
        std::memcpy(scales + at, block, 2);
        if (has_min) std::memcpy(mins + at, block + 2, 2);
        const uint8_t* qs = block + bytes - 16;
        for (int64_t j = 0; j < 16; ++j) {
          put_w4(packed, s, n, g * 32 + j, qs[j] & 0x0F);
          put_w4(packed, s, n, g * 32 + 16 + j, qs[j] >> 4);
        }
      }
  });
}

void parallel_panels(int64_t N, int64_t K, const std::function<void(int64_t, int64_t)>& fn) {
  over_panels(N, K, fn);
}

void linear_blk(const float* x, int64_t ldx, int64_t M, const BlkArgs& w, const float* bias,
                bool int8_activations, float act_scale, const float* colscale, bool gelu, float* y) {
  if (M == 0) return;
  const ScratchScope scope;
  const Kernels& kt = kernels();
  const BlockFormat& F = kBlockFormats[w.fmt];
  const int64_t K = w.K, n32 = K / kActBlock, n16 = K / 16, nsub = K / F.sub;
  const int64_t elem = int8_activations ? 1 : 4;
  const int64_t lda = activation_stride(K * elem) / elem;
  uint8_t* a = activation_buffer(M, lda * elem);
  // per row: 32-block scales, the quantizer's (unused) row sum, integer sums per 16, x sums
  float* ablock = scratch_scales(M * (n32 + 1 + n16 + nsub));
  float* rowsum = ablock + M * n32;
  int32_t* asum = (int32_t*)(rowsum + M);
  float* xsum = (float*)(asum + M * n16);
  const bool big = M * K >= (1 << 16);
  if (int8_activations) {
    auto quant = [&](int64_t m0, int64_t m1) {
      with_scaled_rows(kt, x, ldx, K, colscale, nullptr, m0, m1, [&](const float* rows, int64_t ld, int64_t r0, int64_t r1) {
        kt.quantize_a8_blocks(rows, ld, K, K, K, 0, r1 - r0, (int8_t*)a + r0 * lda, lda,
                              ablock + r0 * n32, rowsum + r0, nullptr, act_scale);
      });
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t h = 0; h < n16; ++h) {
          const int8_t* q = (const int8_t*)a + m * lda + 16 * h;
          int32_t sum = 0;
          for (int i = 0; i < 16; ++i) sum += q[i];
          asum[m * n16 + h] = sum;
        }
    };
    big ? parallel_for(M, quant) : quant(0, M);
  } else {
    auto prep = [&](int64_t m0, int64_t m1) {
      float_rows(kt, x, ldx, K, K, colscale, nullptr, F.sub, m0, m1, (float*)a, lda,
                 F.min == MinKind::None ? nullptr : xsum, nsub);
    };
    big ? parallel_for(M, prep) : prep(0, M);
  }
  BlkArgs args = w;
  args.M = M;
  args.lda = lda;
  args.bias = bias;
  args.ldc = w.N;
  const auto gemm = int8_activations ? kt.gemm_blk_a8 : kt.gemm_blk_f32;
  split(M, args.Np / kPanel, 64, 8, M * w.N * K, [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    BlkArgs sub = args;
    sub.M = m1 - m0;
    sub.a = (const uint8_t*)a + m0 * lda * elem;
    sub.ablock = ablock + m0 * n32;
    sub.asum = asum + m0 * n16;
    sub.xsum = xsum + m0 * nsub;
    sub.c = y + m0 * w.N;
    gemm(&sub, p0, p1);
    if (gelu) gelu_block(kt, y, w.N, w.N, m0, m1, p0, p1);
  });
}

// Element-wise work below this size stays on the caller's thread.
constexpr int64_t kSerialElems = 1 << 15;

void gelu(const float* x, float* y, int64_t n, bool tanh) {
  const Kernels& kt = kernels();
  if (n < kSerialElems) return kt.gelu(x, y, n, tanh);
  constexpr int64_t chunk = 4096;
  parallel_for((n + chunk - 1) / chunk, [&](int64_t c0, int64_t c1) {
    const int64_t e = c1 * chunk < n ? c1 * chunk : n;
    kt.gelu(x + c0 * chunk, y + c0 * chunk, e - c0 * chunk, tanh);
  });
}

void silu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t rows, int64_t n,
              float* y) {
  const Kernels& kt = kernels();
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) kt.silu_mul(g + r * ldg, u + r * ldu, y + r * n, n);
  };
  rows * n < kSerialElems ? body(0, rows) : parallel_for(rows, body);
}

void layer_norm(const float* x, const float* r, int64_t ld, const float* w, const float* b,
                float eps, bool rms, int64_t rows, int64_t n, float* y) {
  const Kernels& kt = kernels();
  if (rows * n < kSerialElems) return kt.layer_norm(x, r, ld, w, b, eps, rms, rows, n, y);
  parallel_for(rows, [&](int64_t m0, int64_t m1) {
    kt.layer_norm(x + m0 * ld, r ? r + m0 * n : nullptr, ld, w, b, eps, rms, m1 - m0, n, y + m0 * n);
  });
}

void softmax(float* x, int64_t rows, int64_t n) {
  const Kernels& kt = kernels();
  if (rows * n < kSerialElems) return kt.softmax(x, rows, n);
  parallel_for(rows, [&](int64_t m0, int64_t m1) { kt.softmax(x + m0 * n, m1 - m0, n); });
}

void attention(const AttnArgs& a) {
  const Kernels& kt = kernels();
  const int64_t tasks = a.B * a.H * ((a.Sq + kAttnQueries - 1) / kAttnQueries);
  if (a.B * a.H * a.Sq * a.Sk * a.d < 8 * kSerialElems) return kt.attention(&a, 0, tasks);
  parallel_for(tasks, [&](int64_t t0, int64_t t1) { kt.attention(&a, t0, t1); });
}

void add(const float* a, const float* b, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

void scale(const float* x, float s, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * s;
}

void gelu_mul(const float* g, int64_t ldg, const float* u, int64_t ldu, int64_t rows, int64_t n,
              bool tanh, float* y) {
  const Kernels& kt = kernels();
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = y + r * n;
      const float* ur = u + r * ldu;
      kt.gelu(g + r * ldg, yr, n, tanh);
      for (int64_t i = 0; i < n; ++i) yr[i] *= ur[i];
    }
  };
  rows * n < kSerialElems ? body(0, rows) : parallel_for(rows, body);
}

void rope(const float* x, int64_t ldx, int64_t tokens, int64_t heads, int64_t d, const float* cos,
          const float* sin, const int64_t* positions, bool neox, float* y) {
  const int64_t half = d / 2;
  // element offsets of pair i's two coordinates
  const int64_t step = neox ? 1 : 2, other = neox ? half : 1;
  auto rows = [&](int64_t r0, int64_t r1) {  // rows (token, head) r0 .. r1-1
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = positions ? positions[r / heads] : r / heads;
      const float* a = x + r / heads * ldx + r % heads * d;
      float* o = y + r * d;
      const float *c = cos + t * half, *s = sin + t * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a0 = a[i * step], a1 = a[i * step + other];
        o[i * step] = a0 * c[i] - a1 * s[i];
        o[i * step + other] = a0 * s[i] + a1 * c[i];
      }
    }
  };
  // (a prompt's queries: 256 tokens x 9 heads x 64 took 58 us on one thread)
  tokens * heads * d < kSerialElems ? rows(0, tokens * heads) : parallel_for(tokens * heads, rows);
}

int64_t pack_int4(const uint8_t* q, int64_t n_out, uint8_t* out) {
  return kernels().pack_int4(q, out, n_out);
}

void unpack_int4(const uint8_t* p, int64_t n_in, uint8_t* out) { kernels().unpack_int4(p, out, n_in); }

}  // namespace lowbit
