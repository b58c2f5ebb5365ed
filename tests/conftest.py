import numpy as np
import pytest

import lowbit as lb

ALL_ISAS = ["ref", "avx2", "avxvnni", "avx512vnni", "amx"]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs the test once per kernel set; skips those this CPU (or build) lacks."""
    if request.param not in lb.cpu_info()["available"]:
        pytest.skip(f"{request.param} not available on this CPU/build")
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
