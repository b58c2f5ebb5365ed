import numpy as np
import pytest

import lowbit as lb

ALL_ISAS = ["ref", "avx2", "avxvnni", "avx512vnni", "amx"]

# The CPU features each kernel set needs (csrc/dispatch.cpp), as their manuals name them.
NEEDS = {"avx2": ["avx2", "fma", "f16c", "bmi2"],
         "avxvnni": ["avx2", "fma", "f16c", "bmi2", "avxvnni"],
         "avx512vnni": ["avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
                        "avx512dq", "avx512vnni"],
         "amx": ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "amx-int8"]}
FEATURE_NAMES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avxvnni": "AVX-VNNI",
                 "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512vl": "AVX-512VL",
                 "avx512dq": "AVX-512DQ", "avx512vnni": "AVX-512 VNNI",
                 "amx-int8": "AMX-INT8"}  # (dispatch.cpp also asks the OS for the tiles)


def isa_skip_reason(name):
    """Why kernel set `name` cannot run here, for a skip a reader understands; None if it can."""
    info = lb.cpu_info()
    if name in info["available"]:
        return None
    if name not in info["compiled"]:
        return f"{name}: not in this build (a compiler without its flags, or not x86-64)"
    missing = [FEATURE_NAMES.get(f, f) for f in NEEDS.get(name, []) if not info["features"].get(f)]
    return f"{name}: this CPU lacks {', '.join(missing) or 'it'} (kernel set not available)"


@pytest.fixture(params=ALL_ISAS)
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
