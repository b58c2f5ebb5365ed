"""lowbit: fast, exact low-bit (INT8 / INT4) CPU kernels for numpy.

    import lowbit as lb
    layer = lb.Linear(w, bias)          # w: (out_features, in_features) float array
    y = layer(x)                        # x: (..., in_features) -> (..., out_features) float32
"""
from ._core import __version__
from .runtime import cpu_info, get_num_threads, set_num_threads, use_isa
from .quantize import QuantizedWeight, concat_rows, quantize
from .calibrate import (EntropyObserver, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver,
                        PercentileObserver, StaticActivations)
from .linear import FusedLinear, Linear, matmul
from .kernels import gemm_s8, pack_int4, unpack_int4
from .errors import FormatError
from .gguf import gguf_metadata, load_gguf
from .checkpoints import from_awq, from_gptq, load_awq, load_gptq
from .io import load, save
from .qat import fake_quantize, fake_quantize_grad
from .mixed import layer_sensitivity, model_sensitivity, plan_precision
from . import metrics

__all__ = [
    "__version__", "cpu_info", "get_num_threads", "set_num_threads", "use_isa",
    "QuantizedWeight", "quantize", "concat_rows", "Linear", "FusedLinear", "matmul", "gemm_s8", "pack_int4", "unpack_int4",
    "FormatError", "gguf_metadata", "load_gguf", "from_gptq", "from_awq", "load_gptq", "load_awq",
    "save", "load", "StaticActivations", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "PercentileObserver", "MSEObserver", "EntropyObserver", "fake_quantize", "fake_quantize_grad",
    "layer_sensitivity", "model_sensitivity", "plan_precision", "metrics",
]

# Resolve the kernel table, the thread count and the result cache now, so that a bad LOWBIT_ISA,
# LOWBIT_NUM_THREADS or LOWBIT_CACHE_MB fails at import saying what it accepts.
from . import _core as _c
_c.isa()
_c.get_num_threads()
_c.cache_limit_mb()
del _c
