"""PyTorch interop: run a model's ``nn.Linear`` layers on lowbit's kernels (inference only).

    import lowbit.torch
    model = lowbit.torch.quantize_model(model, bits=4, group_size=32)   # in place; returns model
    with torch.inference_mode():
        y = model(x)

Every ``nn.Linear`` (float32 weights, optionally filtered by ``include``) becomes a
:class:`LowbitLinear`: the weight is quantized once (``lb.quantize``, any method), and forward
hands the input to ``lb.Linear`` as a numpy view of the tensor's memory (no copy for contiguous
float32 CPU tensors) and wraps the numpy result as a tensor (no copy either). Nothing is compiled
against PyTorch; torch is imported only when this module is. No gradients flow through these
layers (their weights are not parameters).
"""
from __future__ import annotations

import torch

from .linear import Linear
from .quantize import quantize


class LowbitLinear(torch.nn.Module):
    """An ``nn.Linear`` replacement computing ``x @ W.T + b`` with an :class:`lowbit.Linear`."""

    def __init__(self, layer: Linear):
        super().__init__()
        self.layer = layer
        self.in_features = layer.in_features
        self.out_features = layer.out_features

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, bits=8, group_size=None, symmetric=True,
                    activations="int8", method="rtn", calibration=None, **method_options):
        w = linear.weight.detach().to(torch.float32).cpu().numpy()
        b = None if linear.bias is None else linear.bias.detach().to(torch.float32).cpu().numpy()
        qw = quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                      calibration=calibration, **method_options)
        return cls(Linear(qw, b, activations=activations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"lowbit runs on the CPU; got a tensor on {x.device}")
        if x.dtype not in (torch.float32, torch.float16):
            raise TypeError(f"x: expected float32 or float16, got {x.dtype}")
        y = self.layer(x.detach().contiguous().numpy())
        return torch.from_numpy(y)

    def extra_repr(self):
        w = self.layer.weight
        g = "per-channel" if w.group_size is None else f"group_size={w.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={w.bits}, {g}, activations={self.layer.activations!r}")


def quantize_model(model: torch.nn.Module, *, bits=8, group_size=None, symmetric=True,
                   activations="int8", include=None, min_features=1, **options) -> torch.nn.Module:
    """Replaces the ``nn.Linear`` modules of `model` (in place) by :class:`LowbitLinear` and
    returns the model (a model that is itself an ``nn.Linear`` is returned replaced). include: a predicate on the module's qualified name (e.g.
    ``lambda name: "lm_head" not in name``); layers with fewer than `min_features` inputs or
    outputs stay as they are. The other keywords are those of ``lb.quantize`` / ``lb.Linear``;
    a Linear whose shape the format does not fit (a group size not dividing its inputs) raises
    ValueError naming it."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)
               and (include is None or include(name))
               and min(m.in_features, m.out_features) >= min_features]
    for name, module in targets:
        try:
            new = LowbitLinear.from_linear(module, bits=bits, group_size=group_size,
                                           symmetric=symmetric, activations=activations, **options)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if not name:  # the model is itself a Linear
            return new
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model
