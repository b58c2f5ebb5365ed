"""Hugging Face transformers: ``from_pretrained`` of what ``save_pretrained`` wrote from a model
quantized by lowbit.torch.

``quantize_model`` and ``load`` mark a transformers model's config with
``quantization_config = {"quant_method": "lowbit"}``, which ``save_pretrained`` writes into
config.json beside the layers' state. lowbit.torch registers the method with transformers (a
quantization config and an ``HfQuantizer``) once ``transformers.quantizers.auto`` is imported, so
that importing lowbit.torch does not import transformers (seconds): ``from_pretrained`` then
builds each LowbitLinear from the checkpoint before transformers loads the state into it.
Without lowbit.torch imported, transformers only warns of an unknown quantization type and loads
a float model whose quantized layers keep their random initial weights.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

METHOD = "lowbit"
_AUTO = "transformers.quantizers.auto"


def install() -> None:
    """Registers the method now if transformers' quantizer table is loaded, else when it is."""
    if _AUTO in sys.modules:
        _register()
    elif not any(isinstance(f, _WhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenImported())


def mark(model) -> None:
    """Marks a transformers model's config as holding lowbit layers (save_pretrained writes it);
    a model quantized by another method, or not a transformers model, is left alone."""
    transformers = sys.modules.get("transformers")
    config = getattr(model, "config", None)
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        return
    current = getattr(config, "quantization_config", None)
    method = current.get("quant_method") if isinstance(current, dict) else getattr(current, "quant_method", None)
    if current is None or method == METHOD:
        config.quantization_config = {"quant_method": METHOD}


class _WhenImported(importlib.abc.MetaPathFinder):
    """Runs _register right after transformers.quantizers.auto executes."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)  # (so that find_spec below asks the other finders)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register() -> None:
    try:  # (never a failed import of transformers for lowbit's sake)
        _define()
    except Exception as e:  # a transformers without custom quantizers, or of another interface
        warnings.warn(f"lowbit.torch: transformers' from_pretrained cannot load lowbit models "
                      f"({type(e).__name__}: {e})")


def _define() -> None:
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return

    @auto.register_quantization_config(METHOD)
    class LowbitConfig(QuantizationConfigMixin):
        """config.json's quantization_config of a model saved with lowbit layers."""

        def __init__(self, quant_method=METHOD, **kwargs):
            self.quant_method = METHOD
            self.__dict__.update(kwargs)

    @auto.register_quantizer(METHOD)
    class LowbitQuantizer(HfQuantizer):
        """Builds each LowbitLinear from the checkpoint (its settings and weight parts) in place of
        the float model's nn.Linear before transformers loads the state."""

        requires_calibration = True  # (pre-quantized checkpoints only)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .torch import _install_layers

            if not checkpoint_files:
                raise ValueError("lowbit: from_pretrained needs the checkpoint's safetensors files")
            _install_layers(model, list(checkpoint_files))
            tied = getattr(model, "all_tied_weights_keys", None)
            for target in list(tied or ()):  # a tied lm_head quantized: no weight to tie any more
                try:
                    model.get_parameter(target)
                except AttributeError:
                    tied.pop(target)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model
