// What sits beside VPDPBUSD on this core: one core runs 16 independent VPDPBUSD a loop, alone and
// with the other instructions of the int4 / block-format kernels added (broadcast loads, logic,
// FMAs, converts, loads, adds), then the float-activation table path's FMA / VPERMPS / shift mix,
// so that a kernel's operation count can be set against the cycles it takes (bench/RESULTS.md,
// seventeenth session). Needs AVX-512 VNNI:
//
//   g++ -O2 -mavx512f -mavx512bw -mavx512vnni bench/issue_slots.cpp -o issue_slots && ./issue_slots
#include <chrono>
#include <cstdint>
#include <cstdio>

alignas(64) static int32_t buf[1 << 13];

#define DP(a) "vpdpbusd %%zmm20, %%zmm21, %%zmm" #a "\n\t"
#define DOTS DP(0) DP(1) DP(2) DP(3) DP(4) DP(5) DP(6) DP(7) DP(8) DP(9) DP(10) DP(11) DP(12) DP(13) DP(14) DP(15)
#define FMA(a) "vfmadd231ps %%zmm20, %%zmm" #a ", %%zmm" #a "\n\t"
#define PERM(d) "vpermps %%zmm21, %%zmm23, %%zmm" #d "\n\t"
#define SHR(d, s) "vpsrld $" #s ", %%zmm22, %%zmm" #d "\n\t"
// The symmetric W4A8 tile's step (gemm_q4/avx512.cpp, 4 rows x 2 panels, 8 inputs): two 64-byte
// weight loads, their nibbles unpacked (4 AND, 2 shifts), 8 activation broadcasts, 16 VPDPBUSD
// into 8 accumulators (lo then hi into each)
#define PAIR(a, w1, w2, b1, b2) \
  "vpdpbusd %%zmm" #b1 ", %%zmm" #w1 ", %%zmm" #a "\n\t vpdpbusd %%zmm" #b2 ", %%zmm" #w2 ", %%zmm" #a "\n\t"
#define W4A8_STEP                                                                                   \
  "vmovdqu64 (%0), %%zmm16\n\t vmovdqu64 64(%0), %%zmm18\n\t vpsrlw $4, %%zmm16, %%zmm17\n\t"       \
  "vpsrlw $4, %%zmm18, %%zmm19\n\t vpandd %%zmm30, %%zmm16, %%zmm16\n\t"                            \
  "vpandd %%zmm30, %%zmm17, %%zmm17\n\t vpandd %%zmm30, %%zmm18, %%zmm18\n\t"                       \
  "vpandd %%zmm30, %%zmm19, %%zmm19\n\t vpbroadcastd (%1), %%zmm20\n\t vpbroadcastd 4(%1), %%zmm21\n\t" \
  "vpbroadcastd 4096(%1), %%zmm22\n\t vpbroadcastd 4100(%1), %%zmm23\n\t"                           \
  "vpbroadcastd 8192(%1), %%zmm24\n\t vpbroadcastd 8196(%1), %%zmm25\n\t"                           \
  "vpbroadcastd 12288(%1), %%zmm26\n\t vpbroadcastd 12292(%1), %%zmm27\n\t"                         \
  PAIR(0, 16, 17, 20, 21) PAIR(1, 18, 19, 20, 21) PAIR(2, 16, 17, 22, 23) PAIR(3, 18, 19, 22, 23)     \
  PAIR(4, 16, 17, 24, 25) PAIR(5, 18, 19, 24, 25) PAIR(6, 16, 17, 26, 27) PAIR(7, 18, 19, 26, 27)
#define F8 FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7)
#define P8 PERM(8) PERM(9) PERM(10) PERM(11) PERM(12) PERM(13) PERM(14) PERM(15)
#define S8 SHR(24, 4) SHR(25, 8) SHR(26, 12) SHR(27, 16) SHR(28, 20) SHR(29, 24) SHR(30, 28) SHR(31, 4)

// Every vector register the variants write (so that the compiler keeps nothing live in them).
#define CLOBBERS                                                                                \
  "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",      \
      "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19",  \
      "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29",  \
      "xmm30", "xmm31"

// Seconds per loop iteration of variant V.
template <int V>
double run(long iters) {
  const int32_t* p = buf;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    if (V == 0) asm volatile(DOTS ::: CLOBBERS);
    if (V == 1)
      asm volatile(DOTS "vpbroadcastd (%0), %%zmm22\n\t vpbroadcastd 4(%0), %%zmm23\n\t"
                   "vpbroadcastd 8(%0), %%zmm24\n\t vpbroadcastd 12(%0), %%zmm25\n\t"
                   "vpbroadcastd 16(%0), %%zmm26\n\t vpbroadcastd 20(%0), %%zmm27\n\t"
                   "vpbroadcastd 24(%0), %%zmm28\n\t vpbroadcastd 28(%0), %%zmm29\n\t" ::"r"(p) : CLOBBERS);
    if (V == 2)
      asm volatile(DOTS "vpandd %%zmm30, %%zmm31, %%zmm22\n\t vpandd %%zmm30, %%zmm31, %%zmm23\n\t"
                   "vpandd %%zmm30, %%zmm31, %%zmm24\n\t vpandd %%zmm30, %%zmm31, %%zmm25\n\t"
                   "vpsrlw $4, %%zmm31, %%zmm26\n\t vpsrlw $4, %%zmm31, %%zmm27\n\t" ::: CLOBBERS);
    if (V == 3) asm volatile(DOTS FMA(22) FMA(23) ::: CLOBBERS);
    if (V == 4) asm volatile(DOTS "vcvtdq2ps %%zmm30, %%zmm22\n\t vcvtdq2ps %%zmm31, %%zmm23\n\t" ::: CLOBBERS);
    if (V == 5) asm volatile(DOTS "vmovdqu64 (%0), %%zmm22\n\t vmovdqu64 64(%0), %%zmm23\n\t" ::"r"(p) : CLOBBERS);
    if (V == 6)
      asm volatile(DOTS "vpsubd %%zmm30, %%zmm31, %%zmm22\n\t vpsubd %%zmm30, %%zmm31, %%zmm23\n\t"
                   "vpaddd %%zmm30, %%zmm31, %%zmm24\n\t vpaddd %%zmm30, %%zmm31, %%zmm25\n\t" ::: CLOBBERS);
    if (V == 7) asm volatile(F8 ::: CLOBBERS);
    if (V == 8) asm volatile(F8 P8 ::: CLOBBERS);
    if (V == 9) asm volatile(F8 S8 ::: CLOBBERS);
    if (V == 10) asm volatile(P8 S8 ::: CLOBBERS);
    if (V == 11) asm volatile(F8 P8 S8 ::: CLOBBERS);
    if (V == 12) asm volatile(W4A8_STEP ::"r"(buf), "r"(buf + 1024) : CLOBBERS);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

int main() {
  const long n = 20000000;
  for (int r = 0; r < 3; ++r) {
    const double dot = run<0>(n) / 16;  // one VPDPBUSD's share of a loop: the unit below
    printf("16 VPDPBUSD, per VPDPBUSD: alone 1.00  +8 broadcast loads %.2f  +6 logic %.2f  "
           "+2 FMA %.2f  +2 convert %.2f  +2 loads %.2f  +4 add/sub %.2f\n",
           run<1>(n) / 16 / dot, run<2>(n) / 16 / dot, run<3>(n) / 16 / dot, run<4>(n) / 16 / dot,
           run<5>(n) / 16 / dot, run<6>(n) / 16 / dot);
    printf("in VPDPBUSD times: 8 FMA %.1f  8 FMA + 8 VPERMPS %.1f  8 FMA + 8 shifts %.1f  "
           "8 VPERMPS + 8 shifts %.1f  all 24 %.1f\n",
           run<7>(n) / dot, run<8>(n) / dot, run<9>(n) / dot, run<10>(n) / dot, run<11>(n) / dot);
    printf("the W4A8 tile's step (16 VPDPBUSD and its loads and unpacking): %.2f a VPDPBUSD\n",
           run<12>(n) / 16 / dot);
  }
}
