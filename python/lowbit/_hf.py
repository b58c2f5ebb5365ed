"""Hugging Face transformers: ``from_pretrained`` of what ``save_pretrained`` wrote from a model
quantized by lowbit.torch.

``quantize_model`` and ``load`` mark the config of each transformers model holding lowbit layers
with ``quantization_config = {"quant_method": "lowbit"}``, which ``save_pretrained`` writes into
config.json beside the layers' state. lowbit.torch registers the method with transformers (a
quantization config and an ``HfQuantizer``, in ``lowbit._hf_quantizer``) once
``transformers.quantizers.auto`` is imported, so that importing lowbit.torch does not import
transformers (seconds): ``from_pretrained`` then builds each LowbitLinear from the checkpoint
before transformers loads the state into it (transformers 5; with 4, from_pretrained raises and
``lowbit.torch.load(folder, float_model)`` reads the folder). transformers refuses ``.half()`` /
``.float()`` on a model it loaded quantized (by any method); ``.to(torch.bfloat16)`` converts
the float parts. Without lowbit.torch imported, transformers only warns of an unknown
quantization type and loads a float model whose quantized layers keep their random initial
weights.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
import warnings

METHOD = "lowbit"
_AUTO = "transformers.quantizers.auto"


def install() -> None:
    """Registers the method now if transformers' quantizer table is loaded, else when it is."""
    if _AUTO in sys.modules:
        register()
    elif not any(type(f).__name__ == "_WhenImported" for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported())


def register() -> None:
    try:  # (never a failed import of transformers for lowbit's sake)
        importlib.import_module("lowbit._hf_quantizer")
    except Exception as e:  # a transformers without custom quantizers, or of another interface
        warnings.warn(f"lowbit.torch: transformers' from_pretrained cannot load lowbit models "
                      f"({type(e).__name__}: {e})")


def mark(model) -> None:
    """Marks the config of each outermost transformers model in `model` that holds a lowbit layer
    (save_pretrained writes it); a model quantized by another method is left alone."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    from .torch import LowbitLinear

    marked = []
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if (not isinstance(config, transformers.PretrainedConfig)
                or any(name.startswith(p) for p in marked)
                or not any(isinstance(x, LowbitLinear) for x in m.modules())):
            continue
        marked.append(name + "." if name else "")
        current = getattr(config, "quantization_config", None)
        method = (current.get("quant_method") if isinstance(current, dict)
                  else getattr(current, "quant_method", None))
        if current is None or method == METHOD:
            config.quantization_config = {"quant_method": METHOD}


class _WhenImported(importlib.abc.MetaPathFinder):
    """Registers the method right after transformers.quantizers.auto executes (and again at a
    later import, should that one fail)."""

    def __init__(self):
        self.local = threading.local()  # (this thread's own lookup below, not another's import)

    def find_spec(self, name, path, target=None):
        if name != _AUTO or getattr(self.local, "busy", False):
            return None
        self.local.busy = True
        try:
            spec = importlib.util.find_spec(name)  # (the other finders)
        finally:
            self.local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_module
        return spec
