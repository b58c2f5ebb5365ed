"""lowbit's quantization method for transformers (see ``lowbit._hf``): imported once
transformers' quantizer table is, it registers ``quant_method: "lowbit"``. Module-level classes,
so that a loaded model and its config pickle."""
from __future__ import annotations

import warnings

import transformers
from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._hf import METHOD
from .quantize import QuantizedWeight


class LowbitConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a model saved with lowbit layers."""

    def __init__(self, quant_method=METHOD, **kwargs):
        self.quant_method = METHOD
        self.__dict__.update(kwargs)


class LowbitQuantizer(HfQuantizer):
    """Builds each LowbitLinear from the checkpoint (its settings and weight parts) in place of
    the float model's nn.Linear before transformers loads the state into it."""

    requires_calibration = True  # (pre-quantized checkpoints only)

    def validate_environment(self, *args, **kwargs):
        if int(transformers.__version__.split(".")[0]) < 5:
            raise ImportError(f"lowbit: from_pretrained of a model saved with lowbit layers needs "
                              f"transformers 5 or later (this is {transformers.__version__}); "
                              f"lowbit.torch.load(folder, float_model) reads the folder with any")

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):  # adapters around the frozen layers: gradients reach their inputs
        return True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .torch import _install_layers

        if not checkpoint_files:
            raise ValueError("lowbit: from_pretrained needs the checkpoint's safetensors files")
        _install_layers(model, list(checkpoint_files), _renamed(model))
        tied = getattr(model, "all_tied_weights_keys", None)
        for target in list(tied or ()):  # a tied lm_head quantized: no weight to tie any more
            try:
                model.get_parameter(target)
            except AttributeError:
                tied.pop(target)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model


def _renamed(model):
    """The module name transformers loads a checkpoint's module name into: its renamings of the
    model's legacy keys, and the base model's prefix added or taken off (a head class's
    checkpoint loaded as the base model, or the reverse)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
        renamings = [t for t in get_model_conversion_mapping(model)
                     if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError) as e:  # (transformers' own interface moved)
        warnings.warn(f"lowbit: transformers' key renamings unavailable ({e!r}); layers load under "
                      f"the checkpoint's own names")
        return lambda name: name
    keys = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(name):
        key, _ = rename_source_key(name + ".weight", renamings, [], prefix, keys)
        return key[:-len(".weight")] if key.endswith(".weight") else name
    return rename


# transformers' weight initialization skips what is flagged initialized: a LowbitLinear's weight
# comes from the checkpoint (T5's, CLIP's _init_weights reach into child layers' weights)
QuantizedWeight._is_hf_initialized = True

if METHOD not in auto.AUTO_QUANTIZER_MAPPING:
    auto.register_quantization_config(METHOD)(LowbitConfig)
    auto.register_quantizer(METHOD)(LowbitQuantizer)
