#!/usr/bin/env bash
# The native kernel check (kernel_check.cpp) on this machine's x86 sets, then cross-compiled for
# aarch64 and run under qemu-user on three CPU models, so that each aarch64 set runs:
#   cortex-a53: neon only;  neoverse-n1: + dotprod;  max: + dotprod and i8mm.
# Every set must match `ref` bit for bit, and every aarch64 run must print the digests of the x86
# run (the same inputs give the same outputs on both architectures).
#
#   bash tests/native/run.sh        (about 2 minutes on 2 cores; installs the cross tools if absent)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${LOWBIT_NATIVE_BUILD:-build-native}

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null
fi

# (Release: the kernel objects get the flags of the pip builds, so that a compiler cache, .ci/run's
# ccache, serves them from those builds)
cmake -S . -B "$build/x86" -DLOWBIT_KERNEL_CHECK=ON -DLOWBIT_ISAS= -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build/x86" -j2 >/dev/null
cmake -S . -B "$build/aarch64" -DLOWBIT_KERNEL_CHECK=ON -DLOWBIT_ISAS= -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/tests/aarch64/toolchain.cmake" >/dev/null
cmake --build "$build/aarch64" -j2 >/dev/null

# The GEMV weight prefetches (csrc/kernels/stream.h) must be in every SIMD set's 4-bit and
# block-format kernels: GCC once deleted them all, unseen, as calls without effect.
check_prefetches() {  # objdump, instruction, object files
  local dump=$1 insn=$2; shift 2
  for o in "$@"; do
    if [ "$("$dump" -d "$o" | grep -c "$insn")" -eq 0 ]; then
      echo "no $insn in $o: the GEMV weight prefetches were compiled out (stream.h)" >&2
      exit 1
    fi
  done
}
check_prefetches objdump prefetcht1 "$build"/x86/CMakeFiles/lowbit_{avx2,avx512vnni}.dir/csrc/kernels/gemm_{blk,q4}/*.o
check_prefetches aarch64-linux-gnu-objdump prfm "$build"/aarch64/CMakeFiles/lowbit_{neon,dotprod,i8mm}.dir/csrc/kernels/gemm_{blk,q4}/neon.cpp.o

echo "== x86-64 ($(uname -m), native)"
"$build/x86/kernel_check" | tee "$build/x86.out"
grep '^digest' "$build/x86.out" > "$build/x86.digests"

# The `amx` set on an AVX-512 VNNI CPU without AMX (the set needs AVX-512 besides the tiles): its
# tiles emulated in C (amx_emu.h), so that its kernels' logic is checked where no AMX CPU is.
if ! grep -q '^amx: ok' "$build/x86.out" && grep -q '^avx512vnni: ok' "$build/x86.out" &&
   grep -q 'LOWBIT_CXX_HAS_AMX:INTERNAL=1' "$build/x86/CMakeCache.txt"; then
  cmake -S . -B "$build/x86-amx-emu" -DLOWBIT_KERNEL_CHECK=ON -DLOWBIT_ISAS=amx -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_FLAGS="-include $PWD/tests/native/amx_emu.h -DLOWBIT_EMULATE_AMX" >/dev/null
  cmake --build "$build/x86-amx-emu" -j2 --target kernel_check >/dev/null
  echo "== x86-64, AMX tiles emulated"
  "$build/x86-amx-emu/kernel_check" | tee "$build/x86-amx-emu.out"
  grep -q '^amx: ok' "$build/x86-amx-emu.out" || { echo "the emulated amx set did not run or differs from ref" >&2; exit 1; }
fi
for cpu in cortex-a53 neoverse-n1 max; do
  echo "== aarch64, qemu -cpu $cpu"
  qemu-aarch64 -cpu "$cpu" "$build/aarch64/kernel_check" | tee "$build/$cpu.out"
  if ! diff <(grep '^digest' "$build/$cpu.out") "$build/x86.digests"; then
    echo "aarch64 ($cpu) outputs differ from x86-64's (digests above)" >&2
    exit 1
  fi
done
echo "kernel check: every set matches ref, and aarch64 matches x86-64"
