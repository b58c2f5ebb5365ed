import os
import platform

import numpy as np
import pytest

import lowbit as lb

# Every kernel set lowbit has for this machine's architecture (csrc/dispatch.cpp), and the CPU
# features each needs, as the manuals (x86) and the Linux hwcaps (aarch64) name them.
if platform.machine().lower() in ("aarch64", "arm64"):
    ARCH = "aarch64"
    ALL_ISAS = ["ref", "neon", "dotprod", "i8mm"]
    NEEDS = {"neon": ["asimd"],
             "dotprod": ["asimd", "asimddp"],
             "i8mm": ["asimd", "asimddp", "i8mm"]}
    FEATURE_NAMES = {"asimd": "Advanced SIMD (NEON)", "asimddp": "DotProd (SDOT / UDOT)",
                     "i8mm": "I8MM (SMMLA / USDOT)"}
elif platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
    ARCH = "x86-64"
    ALL_ISAS = ["ref", "avx2", "avxvnni", "avx512vnni", "amx"]
    NEEDS = {"avx2": ["avx2", "fma", "f16c", "bmi2"],
             "avxvnni": ["avx2", "fma", "f16c", "bmi2", "avxvnni"],
             "avx512vnni": ["avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
                            "avx512dq", "avx512vnni"],
             "amx": ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "amx-int8"]}
    FEATURE_NAMES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
                     "avxvnni": "AVX-VNNI", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
                     "avx512vl": "AVX-512VL", "avx512dq": "AVX-512DQ",
                     "avx512vnni": "AVX-512 VNNI",
                     "amx-int8": "AMX-INT8"}  # (dispatch.cpp also asks the OS for the tiles)
else:
    ARCH = platform.machine()
    ALL_ISAS = ["ref"]
    NEEDS = {}
    FEATURE_NAMES = {}


def tested_isas():
    """The kernel sets the `isa` fixture runs: all of this architecture's, or those named in
    LOWBIT_TEST_ISAS (comma-separated; "default" is the process's own set: the best available,
    or LOWBIT_ISA). Emulated runs (tests/aarch64.sh) test one set per CPU model this way."""
    chosen = os.environ.get("LOWBIT_TEST_ISAS", "").strip()
    if not chosen:
        return ALL_ISAS
    names = [lb.cpu_info()["isa"] if n.strip() == "default" else n.strip()
             for n in chosen.split(",")]
    unknown = [n for n in names if n not in ALL_ISAS]
    if unknown:
        raise pytest.UsageError(f"LOWBIT_TEST_ISAS: {', '.join(unknown)} is not a kernel set of "
                                f"{ARCH} ({', '.join(ALL_ISAS)})")
    return [n for n in ALL_ISAS if n in names]


def isa_skip_reason(name):
    """Why kernel set `name` cannot run here, for a skip a reader understands; None if it can."""
    info = lb.cpu_info()
    if name in info["available"]:
        return None
    if name not in info["compiled"]:
        return f"{name}: not in this build (a compiler without its flags, or left out by LOWBIT_ISAS)"
    missing = [FEATURE_NAMES.get(f, f) for f in NEEDS.get(name, []) if not info["features"].get(f)]
    return f"{name}: this CPU lacks {', '.join(missing) or 'it'} (kernel set not available)"


@pytest.fixture(params=tested_isas())
def isa(request):
    """Runs the test once per kernel set; skips those this CPU (or build) lacks, saying why."""
    reason = isa_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with lb.use_isa(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = lb.get_num_threads()
    yield
    lb.set_num_threads(before)
