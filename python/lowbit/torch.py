"""PyTorch interop: run a model's ``nn.Linear`` layers on lowbit's kernels (frozen weights).

    import lowbit.torch
    model = lowbit.torch.quantize_model(model, bits=4, group_size=32)   # in place; returns model
    with torch.inference_mode():
        y = model(x)
    lowbit.torch.save(model, "model.lowbit")          # or torch.save(model.state_dict(), ...)
    lowbit.torch.load("model.lowbit", fresh_float_model)

Every ``nn.Linear`` (and transformers' ``Conv1D``; optionally filtered by ``include``) becomes a
:class:`LowbitLinear`: the weight is quantized once (``lb.quantize``, any method; calibrated
methods and static activations from each layer's own inputs, see :func:`quantize_model`). Its
state is ordinary module state: one buffer per part of the packed weight (``weight_packed``,
``weight_scales``, ... as the kernels read them; float parts held as integer tensors of the same
width, so that ``model.half()`` or ``model.to(torch.bfloat16)`` cannot round them), the bias,
and the settings in ``get_extra_state`` (their JSON as a uint8 tensor): ``state_dict`` /
``load_state_dict`` / ``torch.save`` / pickling round-trip bit for bit, and safetensors'
``save_model`` and Hugging Face's ``save_pretrained`` store the state (:func:`load` reads it
into a float model; a transformers model's ``from_pretrained`` rebuilds it, see ``lowbit._hf``).

Forward is the custom op ``torch.ops.lowbit.linear`` (``torch.library``): a pure function of the
input, the weight's part tensors, the bias and a settings string, with a fake (meta) kernel giving
the output's shape and dtype, so ``torch.compile(fullgraph=True)``, ``torch.jit.trace`` and
``torch.export`` see one real op. Inputs in float32, float16 or bfloat16 (of any layout);
the kernels read float32, and the output comes back in the input's dtype. In training mode
(``model.train()``), gradients flow to the input (and to a bias made a trainable Parameter) as
through ``x @ W.T + b`` with the weight as ``dequantize()`` gives it, straight through the
activations' quantization: adapters or prompts trained around a quantized model (QLoRA's
setting) learn; the weight itself is frozen (its parts are buffers, not parameters), and a layer
with a fused epilogue passes no gradient (backward raises). Each backward dequantizes the weight,
a chunk of rows at a time. In eval mode (``model.eval()``, as ``from_pretrained`` leaves a
Hugging Face model) the layers compute without autograd, as inference does, even where the
input asks for gradients: a model called without ``torch.no_grad()`` keeps its speed.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import weakref
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _core, _hf, runtime
from .calibrate import StaticActivations
from .linear import (Linear, _check_activations, _forward, _kernel_bias, _plan,
                     _zero_point_term)
from .quantize import QuantizedWeight, quantize

_INT_PARTS = ("packed", "scales", "comp", "mins", "zeros", "perm", "in_scale")  # __init__ names
_SPEC_VERSION = 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # inputs the layers take


def _dense(m) -> Optional[tuple]:
    """(weight as (out_features, in_features), bias) of a module computing ``x @ W.T + b``: an
    ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's layers, whose weight is stored (in, out));
    None for any other module."""
    if isinstance(m, torch.nn.Linear):
        return m.weight, m.bias
    if (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2):
        return m.weight.t(), m.bias
    return None


def _parts_of(qw: QuantizedWeight) -> dict:
    """{part: array} of the arrays a weight's kernels read."""
    if qw._parts is not None:
        return dict(qw._parts)
    return {p: getattr(qw, "_" + p) for p in _INT_PARTS if getattr(qw, "_" + p) is not None}


def _tensor(a: np.ndarray, share=False) -> torch.Tensor:
    """A tensor holding the bits of `a`: wider than a byte as the signed integer of its width.
    share: a view of `a` (writable: a file's copy-on-write map), not a copy."""
    if share:
        a = a.view()  # (a QuantizedWeight holds its arrays read-only; their memory may be written)
        a.flags.writeable = True
    else:
        a = np.array(a, copy=True, order="C")  # writeable and owned (files are read-only mmaps)
    return torch.from_numpy(a if a.itemsize == 1 else a.view(f"i{a.itemsize}"))


def _spec(qw: QuantizedWeight, parts: dict, activations, epilogue) -> str:
    if not isinstance(activations, str):
        activations = [activations.scale, activations.zero_point]
    return json.dumps({"version": _SPEC_VERSION, "shape": list(qw.shape), "format": qw.format,
                       "bits": qw.bits, "group_size": qw.group_size, "symmetric": qw.symmetric,
                       "parts": [[p, a.dtype.str] for p, a in parts.items()],
                       "activations": activations, "epilogue": epilogue}, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _settings(spec: str):
    """(shape, format, bits, group_size, symmetric, [(part, numpy dtype)], activations, epilogue)."""
    s = json.loads(spec)
    if not isinstance(s, dict) or s.get("version") != _SPEC_VERSION:
        raise ValueError(f"lowbit.torch: unreadable layer settings {spec!r}")
    parts = tuple((p, np.dtype(dt)) for p, dt in s["parts"])
    fmt = s["format"]
    acts = s["activations"]
    if not isinstance(acts, str):  # a static scale and zero point
        acts = StaticActivations(acts[0], int(acts[1]))
    acts = _check_activations(acts, fmt)
    return (tuple(s["shape"]), fmt, s["bits"], s["group_size"], s["symmetric"], parts, acts,
            s["epilogue"])


def _state_settings(state) -> dict:
    """The settings dict of a LowbitLinear's extra state: the uint8 tensor of their JSON (as
    get_extra_state writes it) or the dict itself (as lowbit wrote it before)."""
    if isinstance(state, torch.Tensor):
        if state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError(f"lowbit.torch: layer settings should be a 1-D uint8 tensor of JSON, "
                             f"got {state.dtype} of shape {tuple(state.shape)}")
        try:
            state = json.loads(bytes(state.cpu().numpy()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"lowbit.torch: unreadable layer settings ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"lowbit.torch: layer settings should be a dict or a uint8 tensor, "
                         f"got {type(state).__name__}")
    return state


def _weight(spec: str, tensors, borrow=False) -> tuple:
    """(QuantizedWeight on views of `tensors`, activations, epilogue) for a layer's settings;
    borrow: views that do not hold the tensors (_op_prepared)."""
    shape, fmt, bits, group, sym, parts, acts, epilogue = _settings(spec)
    if len(tensors) != len(parts):
        raise ValueError(f"lowbit.torch: {len(tensors)} weight tensors for parts {parts}")
    view = _borrowed if borrow else lambda t: t.detach().contiguous().numpy()
    arrays = {p: view(t).view(dt) for (p, dt), t in zip(parts, tensors)}
    if fmt in ("int8", "int4"):
        qw = QuantizedWeight(shape, bits, group, sym, **arrays)
    else:
        qw = QuantizedWeight.from_blocks(fmt, shape, arrays)
    return qw, acts, epilogue


def _share_torch_threads():
    """When torch's intra-op threads are OpenMP's (its Linux wheels: libgomp), lowbit's kernels
    run on those same threads (runtime.use_openmp): one team takes turns between torch's ops and
    lowbit's layers, where two pools would fight for the cores (measured in bench/RESULTS.md,
    "PyTorch: lowbit on torch's own OpenMP threads"). ``lowbit.runtime.use_openmp(None)`` goes
    back to lowbit's own pool."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    found = runtime.loaded_openmp(under=os.path.dirname(torch.__file__))
    if not found:  # a torch linked against the system's runtime
        found = runtime.loaded_openmp()
    if len(found) == 1 and not _core.openmp_runtime():
        try:
            runtime.use_openmp(found[0])
        except ValueError:  # not a GNU-compatible runtime: lowbit's own pool stays
            pass


_share_torch_threads()
_hf.install()  # transformers' from_pretrained reads models saved with lowbit layers


def _follow_torch_threads():
    """Unless the user chose lowbit's thread count (lb.set_num_threads, LOWBIT_NUM_THREADS),
    lowbit's layers in a torch model run on as many threads as torch's ops (torch.set_num_threads,
    OMP_NUM_THREADS): the two pools then take turns on the same cores, not on more."""
    n = torch.get_num_threads()
    if not runtime._chosen_threads and n != _core.get_num_threads():
        _core.set_num_threads(n)


def _linear(x: torch.Tensor, parts: list[torch.Tensor], bias: Optional[torch.Tensor],
            spec: str) -> torch.Tensor:
    """``x @ W.T + bias`` for the weight whose packed parts and settings (see LowbitLinear) are
    given; the output in x's dtype."""
    return _run(x, *_op_prepared(spec, [*parts, bias]))


def _borrowed(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t's memory that does not keep t alive (a contiguous copy where t is not
    contiguous): what _op_prepared's entries hold, so that they die with the tensors."""
    t = t.detach()
    if not t.is_contiguous() or not t.numel():
        return t.contiguous().numpy()
    like = t.numpy()  # (only for its dtype and shape)
    memory = (ctypes.c_char * like.nbytes).from_address(t.data_ptr())
    return np.ndarray(like.shape, like.dtype, memory)


# The op's prepared weights (compiled and exported graphs call it with a module's buffers each
# time, and making them again took ~100 us a call), per first part tensor: {id: (weak references
# to the tensors, the _serve entry keyed by the spec and their addresses)}. The entries
# borrow the memory (_borrowed) and are removed when their tensor dies, so no model outlives its
# last reference here; a hit needs the very same tensors (weak references) at the same addresses.
_OP_CACHE: dict = {}


def _op_prepared(spec: str, tensors: list) -> tuple:
    head = tensors[0]
    held = _OP_CACHE.get(id(head))  # (weak references to the tensors, the _serve entry)
    same = held is not None and all((r is None) == (t is None) and (r is None or r() is t)
                                    for r, t in zip(held[0], tensors))
    where = [spec] + [None if t is None else t.data_ptr() for t in tensors]
    entry = _serve(held[1] if same else None, where, spec, tensors, borrow=True)
    if held is None:
        weakref.finalize(head, _OP_CACHE.pop, id(head), None)
    if not same or entry is not held[1]:
        _OP_CACHE[id(head)] = ([None if t is None else weakref.ref(t) for t in tensors], entry)
    return entry[1]


def _serve(entry, key, spec: str, tensors: list, borrow=False) -> tuple:
    """A prepared-weight cache entry, (key, _prepared's tuple, refresh, versions watched), for
    the parts and bias in `tensors`: `entry` while its key is `key` and the versions it watches
    stay, else made again (_cacheable); the kernel's own bias refreshed where it has one."""
    if (entry is None or entry[0] != key or (entry[3] is not None and (
            entry[3] is _UNTRACKED or entry[3] != _versions(tensors)))):
        prepared, refresh, watch = _cacheable(spec, tensors, borrow)
        versions = _versions(tensors) if watch == "versions" else (
            _UNTRACKED if watch == "always" else None)
        entry = (key, prepared, refresh, versions)
    if entry[2] is not None:
        entry[2]()
    return entry


def _numpy32(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """The float32 values of t as numpy (a view when t is float32; fp16 / bf16 converted
    exactly: the kernels read float32)."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    return (t if t.dtype == torch.float32 else t.to(torch.float32)).numpy()


def _prepared(weight: tuple, bias: Optional[torch.Tensor]) -> tuple:
    """(QuantizedWeight, its kernel call, the kernel's bias) for a weight as _weight gives it."""
    qw, acts, epilogue = weight
    b = _kernel_bias(qw, _numpy32(bias), acts)
    return qw, _plan(qw, b, acts, epilogue), b


def _in_place(t: torch.Tensor) -> bool:
    """Whether the kernels read t's memory itself (else the binding copies it: another layout,
    or an address off its element size)."""
    return t.is_contiguous() and t.data_ptr() % t.element_size() == 0


def _cacheable(spec: str, tensors: list, borrow=False) -> tuple:
    """(_prepared of the weight parts and bias in `tensors`; None or a function that makes the
    kernel's bias again where the kernel does not read the bias tensor itself; what the cache
    must watch: None, "versions" (the kernels read a copy of a part, act-order's permuted input
    scale, or a static zero point's term: derived from the parts) or "always" (such a copy of
    parts torch keeps no versions of: made again every call))."""
    qw, acts, epilogue = weight = _weight(spec, tensors[:-1], borrow)
    bias = tensors[-1]
    term = _zero_point_term(qw, acts)
    copied = ((qw._perm is not None and qw._in_scale is not None) or
              not all(_in_place(t) for t in tensors[:-1]))
    untracked = _versions(tensors) is _UNTRACKED
    watch = ("always" if untracked else "versions") if copied else (
        "versions" if term is not None and not untracked else None)
    if term is None and (bias is None or (bias.dtype is torch.float32 and _in_place(bias))):
        return _prepared(weight, bias), None, watch
    b = np.empty(qw.shape[0], np.float32)  # the kernel's own bias, which it reads in place

    def refresh():  # (as _kernel_bias; the term again where torch keeps no versions of the parts)
        t = _zero_point_term(qw, acts) if untracked else term
        src = None if bias is None else _numpy32(bias)
        b[...] = t if src is None else src if t is None else t + src
    refresh()
    return (qw, _plan(qw, b, acts, epilogue), b), refresh, watch


_UNTRACKED = "untracked"  # (a cache entry made again every call)


def _versions(tensors: list):
    """The tensors' in-place write counts, or _UNTRACKED where torch keeps none for one of them
    (inference tensors)."""
    out = []
    for t in tensors:
        if t is not None:
            if t.is_inference():
                return _UNTRACKED
            out.append(t._version)
    return out


def _run(x: torch.Tensor, qw: QuantizedWeight, plan, bias: Optional[np.ndarray]) -> torch.Tensor:
    """x through a prepared weight (_prepared), in x's dtype."""
    _follow_torch_threads()
    if x.is_neg():  # (a lazily negated view, as .conj().imag gives: numpy() refuses those)
        x = x.resolve_neg()
    dtype = x.dtype
    if dtype is torch.float32 and not x.requires_grad:  # a view, the output as it comes
        return torch.from_numpy(_forward(plan, qw, x.numpy(), None, bias))
    return torch.from_numpy(_forward(plan, qw, _numpy32(x), None, bias)).to(dtype)


linear = torch.library.custom_op("lowbit::linear", _linear, mutates_args=())


@linear.register_fake
def _linear_fake(x, parts, bias, spec):
    return x.new_empty((*x.shape[:-1], _settings(spec)[0][0]))


@torch.library.custom_op("lowbit::linear_input_grad", mutates_args=())
def linear_input_grad(grad: torch.Tensor, parts: list[torch.Tensor], spec: str) -> torch.Tensor:
    """``grad @ W`` (float32, W as ``dequantize()`` gives it): the gradient of lowbit::linear's
    output with respect to its input, in grad's dtype."""
    qw, _, _ = _weight(spec, parts)
    g = grad.to(torch.float32).reshape(-1, grad.shape[-1])
    out = torch.zeros((g.shape[0], qw.shape[1]), dtype=torch.float32)
    step = max(1, (16 << 20) // (4 * qw.shape[1]))  # rows of W dequantized at a time: ~16 MB
    for r in range(0, qw.shape[0], step):
        out += g[:, r:r + step] @ torch.from_numpy(qw.dequantize(slice(r, r + step)))
    return out.reshape(*grad.shape[:-1], qw.shape[1]).to(grad.dtype)


@linear_input_grad.register_fake
def _linear_input_grad_fake(grad, parts, spec):
    return grad.new_empty((*grad.shape[:-1], _settings(spec)[0][1]))


def _keep_for_backward(ctx, inputs, output):
    x, parts, bias, spec = inputs
    ctx.save_for_backward(*parts)
    ctx.spec, ctx.x_dtype = spec, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    """To the input (straight through the activations' quantization) and the bias; the weight's
    parts are frozen."""
    epilogue = _settings(ctx.spec)[7]
    if epilogue is not None:
        raise RuntimeError(f"lowbit.torch: a layer with a fused {epilogue!r} epilogue passes no "
                           f"gradient; quantize it without the epilogue to train through it")
    parts = list(ctx.saved_tensors)
    gx = linear_input_grad(grad, parts, ctx.spec).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    gb = (grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
          if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None)
    return gx, [None] * len(parts), gb, None


linear.register_autograd(_backward, setup_context=_keep_for_backward)


@linear.register_vmap
def _linear_vmap(info, in_dims, x, parts, bias, spec):
    """torch.func.vmap over x's rows: the op takes any leading dimensions, so the batched one
    moves to the front (a batched weight or bias is not a lowbit layer)."""
    x_dim, part_dims, bias_dim, _ = in_dims
    if any(d is not None for d in part_dims) or bias_dim is not None:
        raise ValueError("lowbit::linear: vmap over a LowbitLinear's weight or bias is not supported")
    if x_dim is None:
        return linear(x, parts, bias, spec), None
    return linear(x.movedim(x_dim, 0), parts, bias, spec), 0


class LowbitLinear(torch.nn.Module):
    """An ``nn.Linear`` replacement computing ``x @ W.T + b`` on lowbit's kernels (see the module
    docstring for its state)."""

    def __init__(self, layer: Linear, share=False):
        """share: the weight's buffers view the layer's arrays (writable ones: a file's
        copy-on-write map, for transformers' loader to replace), not copies."""
        super().__init__()
        if not isinstance(layer, Linear):
            raise TypeError(f"LowbitLinear: expected an lb.Linear, got {type(layer).__name__}")
        qw = layer.weight
        parts = _parts_of(qw)
        self.in_features = qw.shape[1]
        self.out_features = qw.shape[0]
        self._spec = _spec(qw, parts, layer.activations, layer.epilogue)
        self._part_names = tuple(parts)
        self._buffer_names = tuple("weight_" + p for p in parts) + ("bias",)
        for p, a in parts.items():
            self.register_buffer("weight_" + p, _tensor(a, share))
        bias = None if layer.bias is None else torch.from_numpy(layer.bias.copy())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, bits=8, group_size=None, symmetric=True,
                    activations="int8", method="rtn", calibration=None, **method_options):
        """Quantizes `linear`'s weight (float of any dtype; an ``nn.Linear`` or transformers'
        ``Conv1D``) with ``lb.quantize``. calibration: the
        layer's inputs (S, in_features), for the calibrated methods and for static activations:
        `activations` may be an observer class (or any callable returning a fresh observer, e.g.
        ``functools.partial(lb.PercentileObserver, 99.99)``), fed the inputs as the kernel sees
        them."""
        dense = _dense(linear)
        if dense is None:
            raise TypeError(f"from_linear: expected an nn.Linear (or transformers' Conv1D), got "
                            f"{type(linear).__name__}")
        w = dense[0].detach().to(torch.float32).cpu().numpy()
        b = None if dense[1] is None else dense[1].detach().to(torch.float32).cpu().numpy()
        if isinstance(calibration, torch.Tensor):
            calibration = calibration.detach().to(torch.float32).cpu().numpy()
        observe = callable(activations)
        if observe and calibration is None:
            raise ValueError("activations: an observer needs calibration (the layer's inputs)")
        if not observe:
            _check_activations(activations, f"int{bits}")
        qw = quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, method=method,
                      calibration=None if method == "rtn" else calibration, **method_options)
        if observe:
            seen = calibration if qw.input_scale is None else calibration * qw.input_scale
            activations = activations().observe(seen).params()
        return cls(Linear(qw, b, activations=activations)).train(linear.training)

    @property
    def layer(self) -> Linear:
        """The lb.Linear this module runs (its arrays are views of the module's buffers)."""
        qw, acts, epilogue = _weight(self._spec, self._weights())
        b = None if self.bias is None else self.bias.detach().to(torch.float32).numpy()
        return Linear(qw, b, activations=acts, epilogue=epilogue)

    @property
    def weight(self) -> QuantizedWeight:
        return self.layer.weight

    def _weights(self):
        return [getattr(self, "weight_" + p) for p in self._part_names]

    def _prepared(self):
        """_prepared of the buffers, kept while they are the same memory. The kernels read the
        weight parts and a float32 bias where they are, so every write to them shows, tracked or
        not (through ``.data``, or to inference tensors, which have no version). A bias the
        kernel reads from a buffer of its own (converted from float16 / bfloat16, or carrying a
        static zero point's term) is made again from the bias tensor each call. What is derived
        from the weight parts (that term; copies of parts not laid out for the kernels) is kept
        while the parts' versions stay, and made again every call where torch keeps no versions
        (inference tensors). Not checked again after the first call: the ranges of block-format
        scale codes, should a part be overwritten with codes no file holds."""
        buffers = self._buffers  # (nn.Module.__getattr__ costs a few us a buffer)
        try:
            tensors = [buffers[n] for n in self._buffer_names]  # the parts, then the bias
        except KeyError:  # one made a Parameter (the bias, for BitFit): where the module holds it
            tensors = [getattr(self, n) for n in self._buffer_names]
        key = [self._spec]
        for t in tensors:  # (the cache holds its tensors: neither id nor memory is reused)
            if t is not None:
                key += id(t), t.data_ptr()
        cached = self.__dict__.get("_views")
        entry = _serve(cached, key, self._spec, tensors)
        if entry is not cached:
            self.__dict__["_views"] = entry
        return entry[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.__dict__.pop("_views", None)  # (inference tensors copied into: no version moves)
        theirs = state_dict.get(prefix + "_extra_state")
        if theirs is not None:  # refused before torch copies the buffers whose shapes fit
            self._check_kind(theirs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):  # pickle / deepcopy: the buffers, not views of them
        state = super().__getstate__()
        state.pop("_views", None)
        state.pop("_state", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_buffer_names" not in state:  # pickled by lowbit 0.x before it was kept
            self._buffer_names = tuple("weight_" + p for p in self._part_names) + ("bias",)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear's name for it)
        x = input
        if not x.is_cpu:
            raise ValueError(f"lowbit runs on the CPU; got a tensor on {x.device}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
        if type(x) is torch.Tensor and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                                            or torch._C._are_functorch_transforms_active()
                                            or self._wants_gradient(x)):
            # eager: the op's own function, without the dispatcher's ~30 us a call (a tenth of
            # a batch-1 MiniLM forward); compile, export, trace and autograd see the op
            return _run(x, *self._prepared())
        return torch.ops.lowbit.linear(x, self._weights(), self.bias, self._spec)

    def _wants_gradient(self, x) -> bool:
        """Whether autograd needs this call: training mode, grad mode on, and x or a bias
        Parameter needing one (in eval mode inference keeps the cached eager path)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        bias = self._parameters.get("bias")  # (a bias made a Parameter; buffers need none)
        return x.requires_grad or (bias is not None and bias.requires_grad)

    def get_extra_state(self) -> torch.Tensor:
        """The settings, as the bytes of their JSON in a uint8 tensor: a state_dict of tensors
        only, which safetensors (``save_model``) and Hugging Face's ``save_pretrained`` store.
        The same tensor while the settings stay, so that a module under two names shares it as
        it shares its buffers (which savers write once)."""
        cached = self.__dict__.get("_state")
        if cached is None or cached[0] is not self._spec:
            cached = self.__dict__["_state"] = (
                self._spec, torch.frombuffer(bytearray(self._spec.encode()), dtype=torch.uint8))
        return cached[1]

    def set_extra_state(self, state):
        self._spec = self._check_kind(state)

    def _check_kind(self, state) -> str:
        """The settings `state` holds (get_extra_state's tensor, or the dict lowbit wrote before
        it), if its weight's kind (shape, format, bits, group size, symmetry, parts' names and
        dtypes) is this layer's; ValueError if not."""
        spec = json.dumps(_state_settings(state), sort_keys=True)
        theirs = _settings(spec)
        if theirs[:6] != _settings(self._spec)[:6]:
            shape, fmt, bits, group, sym, parts = theirs[:6]
            raise ValueError(f"lowbit.torch: a {fmt} {shape} layer (bits={bits}, group_size="
                             f"{group}, symmetric={sym}, parts {[f'{p} {dt}' for p, dt in parts]}) "
                             f"cannot load into this {self.extra_repr()} one; quantize the model as "
                             f"the state was, or use lowbit.torch.load")
        return spec

    def extra_repr(self):
        shape, fmt, bits, group, _, _, acts, _ = _settings(self._spec)
        g = "per-channel" if group is None else f"group_size={group}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={fmt}, bits={bits}, {g}, activations={acts!r}")


def _replace(model, name, new):
    """Puts `new` at `name` in `model` (returns `new` when name is "", the model itself)."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _run_calibration(model, calibration):
    """Runs `calibration` (a callable taking the model, or an iterable of batches: a tensor, a
    tuple of positional inputs or a mapping of keyword inputs each) without gradients."""
    with torch.inference_mode():
        if callable(calibration):
            calibration(model)
            return
        for batch in calibration:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)


def capture_inputs(model: torch.nn.Module, calibration, names=None) -> dict:
    """{name: float32 (rows, in_features)}: the inputs each ``nn.Linear`` (or LowbitLinear) of
    `model` (those in `names`, if given) receives while `calibration` runs (see quantize_model),
    recorded by forward pre-hooks, in the order the layers first run."""
    rows = {}

    def hook(name):
        def record(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            rows.setdefault(name, []).append(
                np.array(x.reshape(-1, x.shape[-1]).to(torch.float32).numpy()))
        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, m in model.named_modules()
               if (isinstance(m, LowbitLinear) or _dense(m) is not None)
               and (names is None or n in names)]
    try:
        _run_calibration(model, calibration)
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(r) for n, r in rows.items()}


def quantize_model(model: torch.nn.Module, *, bits=8, group_size=None, symmetric=True,
                   activations="int8", include=None, min_features=1, method="rtn",
                   calibration=None, **options) -> torch.nn.Module:
    """Replaces the ``nn.Linear`` modules of `model` (in place) by :class:`LowbitLinear` and
    returns the model (a model that is itself an ``nn.Linear`` is returned replaced). include: a
    predicate on the module's qualified name (e.g. ``lambda name: "lm_head" not in name``);
    layers with fewer than `min_features` inputs or outputs stay as they are. The other keywords
    are those of ``lb.quantize`` / ``lb.Linear``; a Linear whose shape the format does not fit (a
    group size not dividing its inputs) raises ValueError naming it.

    calibration: an iterable of input batches (each a tensor, a tuple of positional inputs or a
    dict of keyword inputs, e.g. a tokenizer's output), or a callable that runs the model. Each
    Linear's own inputs are captured on it (:func:`capture_inputs`) for the calibrated methods
    ("mse", "gptq", "awq") and for static activations (`activations` an observer class, see
    ``LowbitLinear.from_linear``). GPTQ goes layer by layer in forward order, re-running the
    calibration before each layer, so that a layer sees the outputs of the quantized ones before
    it (as the GPTQ paper does); the other methods use the float model's inputs.

    transformers' ``Conv1D`` layers (GPT-2's: ``x @ W + b``, the weight stored transposed) are
    replaced as Linears are. A Linear held under several names (tied) is replaced under each by
    the same LowbitLinear. ``nn.MultiheadAttention``'s output projection stays float: that module
    reads its weight itself (as torch.ao's dynamic quantization leaves it too)."""
    names = {}  # id of each Linear -> its qualified names, the first of them first
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    targets = {name: m for name, m in model.named_modules()
               if _dense(m) is not None
               and not isinstance(m, NonDynamicallyQuantizableLinear)
               and (include is None or include(name))
               and min(_dense(m)[0].shape) >= min_features}
    if calibration is not None and not callable(calibration) and iter(calibration) is calibration:
        calibration = list(calibration)  # a generator: GPTQ runs the calibration again
    needs = method != "rtn" or callable(activations)
    if needs and calibration is None:
        raise ValueError(f"method={method!r} / activations={activations!r} need calibration: "
                         f"input batches or a callable that runs the model")
    if not needs and calibration is not None:
        raise ValueError("calibration is only used by calibrated methods and static activations")
    inputs = capture_inputs(model, calibration, set(targets)) if needs else {}
    if needs and set(inputs) != set(targets):
        raise ValueError(f"calibration never ran {sorted(set(targets) - set(inputs))[:8]}")
    done = []  # (name, the Linear it replaced): put back if a later layer fails
    try:
        for i, name in enumerate(list(inputs or targets)):  # forward order when calibrated
            if method == "gptq" and i:  # the inputs the layers quantized so far give
                inputs[name] = capture_inputs(model, calibration, {name})[name]
            try:
                new = LowbitLinear.from_linear(targets[name], bits=bits, group_size=group_size,
                                               symmetric=symmetric, activations=activations,
                                               method=method, calibration=inputs.get(name), **options)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            inputs.pop(name, None)
            for alias in names[id(targets[name])]:
                done.append((alias, targets[name]))
                model = _replace(model, alias, new)
    except BaseException:  # (an interrupt too): the model as it was, not half quantized
        for alias, old in reversed(done):
            model = _replace(model, alias, old)
        raise
    if done:
        _hf.mark(model)  # (save_pretrained writes the method into config.json)
    return model


def _activations_array(acts) -> Optional[np.ndarray]:
    """A layer's activations as lowbit files keep them beside the weight (``<layer>.activations``):
    nothing for "int8" (the default), [scale, zero point] for static ones, [0, 0] for "float"."""
    if isinstance(acts, str):
        return None if acts == "int8" else np.zeros(2)
    return np.array([acts.scale, acts.zero_point], np.float64)


def _activations_of(a) -> object:
    if a is None:
        return "int8"
    a = np.asarray(a, np.float64)
    if a.shape != (2,):
        raise ValueError(f"activations: expected [scale, zero point], got shape {a.shape}")
    return "float" if a[0] == 0 else StaticActivations(float(a[0]), int(a[1]))


def save(model: torch.nn.Module, path) -> None:
    """Writes `model`'s state to a lowbit file (``lb.save``): each :class:`LowbitLinear` ``name``
    as the QuantizedWeight ``name.weight`` (packed, as the kernels read it), its bias
    ``name.bias`` and, unless "int8", its activations ``name.activations`` ([scale, zero point];
    [0, 0] for "float"); every other tensor of ``state_dict()`` as an array under its own key
    (bfloat16 as float32, exactly). :func:`load` reads it back into the matching model."""
    from .io import save as save_file

    tensors, owned, seen = {}, set(), set()
    for name, m in model.named_modules(remove_duplicate=False):  # (tied: each name's keys owned)
        if not isinstance(m, LowbitLinear):
            continue
        p = name + "." if name else ""
        owned.update(p + k for k in m.state_dict())
        if id(m) in seen:  # written under its first name; load ties the others to it again
            continue
        seen.add(id(m))
        layer = m.layer
        if layer.epilogue is not None:
            raise ValueError(f"{name}: a layer with an epilogue cannot be saved in a lowbit file")
        tensors[p + "weight"] = layer.weight
        if layer.bias is not None:
            tensors[p + "bias"] = layer.bias
        acts = _activations_array(layer.activations)
        if acts is not None:
            tensors[p + "activations"] = acts
    for key, t in model.state_dict().items():
        if key in owned:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: extra state of type {type(t).__name__} has no place in a "
                            f"lowbit file")
        t = t.detach().cpu()
        tensors[key] = (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy()
    save_file(path, tensors)


def _read_files(files, private=False) -> tuple:
    """({key: array}, {key: file}) of safetensors / lowbit files (a checkpoint's shards; a key in
    two of them is an error), BF16 tensors as lazy :class:`lowbit.io.BF16` views; private:
    writable arrays on copy-on-write maps."""
    from .errors import FormatError
    from .io import _load

    arrays, origin = {}, {}
    for f in files:
        for key, value in _load(f, bf16=True, private=private).items():
            if key in arrays:
                raise FormatError(f"{key!r} in two files: {origin[key]} and {f}")
            arrays[key] = value
            origin[key] = f
    return arrays, origin


def _read_state(path) -> tuple:
    """_read_files of a lowbit or safetensors file, or of a folder ``save_pretrained`` wrote."""
    return _read_files(_state_files(path) if os.path.isdir(path) else [path])


def _state_files(path) -> list:
    """The safetensors files of a folder ``save_pretrained`` wrote: model.safetensors, or the
    shards its index names."""
    from .errors import FormatError

    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            raise FileNotFoundError(f"{path}: a folder without model.safetensors or "
                                    f"model.safetensors.index.json")
        return [os.path.join(path, "model.safetensors")]
    try:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{index}: not a safetensors index ({e!r})") from None
    for shard in shards:
        if (not isinstance(shard, str) or os.path.basename(shard) != shard
                or shard in ("", ".", "..")):
            raise FormatError(f"{index}: shard {shard!r} is not a file name in {path}")
    return [os.path.join(path, shard) for shard in shards]


def _state_dict_layers(path, arrays: dict, origin=None) -> dict:
    """Pops from `arrays` the LowbitLinear states written as ``state_dict()`` holds them
    (``name.weight_<part>``, ``name.bias``, ``name._extra_state``: safetensors' ``save_model``,
    ``save_pretrained``): {name: lb.Linear}, each weight checked as ``lb.load`` checks its own.
    origin: {key: file} where the keys come from several files (errors name the file)."""
    from . import io
    from .errors import FormatError
    from .io import BF16

    layers = {}
    for key in [k for k in arrays if k.rsplit(".", 1)[-1] == "_extra_state"]:
        p = key[:-len("_extra_state")]
        ours = [p + "weight_" + part for part in io._PARTS if p + "weight_" + part in arrays]
        if not ours:  # another module's extra state
            continue
        where = (origin or {}).get(key, path)
        try:
            spec = json.dumps(_state_settings(torch.from_numpy(np.array(arrays.pop(key)))),
                              sort_keys=True)
            shape, fmt, bits, group, sym, parts, acts, epilogue = _settings(spec)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise FormatError(f"{where}: {key}: unreadable lowbit layer settings ({e})") from None
        listed = {p + "weight_" + part for part, _ in parts}
        if set(ours) - listed:
            raise FormatError(f"{where}: {key}: the settings list parts {sorted(listed)}, the file "
                              f"also holds {sorted(set(ours) - listed)}")
        stored = {}
        for part, dt in parts:
            a = arrays.pop(p + "weight_" + part, None)
            if not isinstance(a, np.ndarray) or a.dtype.itemsize != dt.itemsize:
                got = "missing" if a is None else "bfloat16" if isinstance(a, BF16) else str(a.dtype)
                raise FormatError(f"{where}: {p}weight_{part}: expected {dt.itemsize}-byte items, "
                                  f"got {got}")
            stored[part] = a.view(dt)
        d = {"shape": shape, "bits": bits, "group_size": group, "symmetric": sym,
             "layout": io.LAYOUT, "format": fmt}
        if fmt in ("int8", "int4"):
            qw = io._weight(where, p + "weight", d, {q: stored.get(q) for q in io._PARTS})
        else:
            d["shape"] = list(shape)
            qw = io._block_weight(where, p + "weight", d, stored, io.FORMAT_VERSION)
        bias = arrays.pop(p + "bias", None)
        try:
            layers[p[:-1]] = Linear(qw, None if bias is None else np.array(bias, np.float32),
                                    activations=acts, epilogue=epilogue)
        except (ValueError, TypeError) as e:
            raise FormatError(f"{where}: {key}: {e}") from None
    part_keys = ["weight_" + part for part in io._PARTS]
    orphans = [k for k in arrays if k.rsplit(".", 1)[-1] in part_keys]
    if orphans:  # (a layer's state without its settings: never a float Linear left random)
        raise FormatError(f"{(origin or {}).get(orphans[0], path)}: {orphans[0]}: lowbit weight "
                          f"parts without their layer's settings ({orphans[0].rsplit('.', 1)[0]}"
                          f"._extra_state)")
    return layers


def _lowbit_modules(path, model, layers: dict, share=False) -> dict:
    """{name: LowbitLinear} for `layers` ({name: lb.Linear}) in place of `model`'s nn.Linear (or
    LowbitLinear) modules of those names, checked to fit; a module tied under several names gets
    one LowbitLinear under each."""
    replace, by_module = {}, {}  # module name / id -> its LowbitLinear
    for name, layer in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, LowbitLinear) and _dense(module) is None:
            raise ValueError(f"{path}: a quantized layer {name or '(the model)'} where the model "
                             f"has {'no module' if module is None else type(module).__name__}")
        shape = (module.out_features, module.in_features) if isinstance(module, LowbitLinear) else (
            tuple(_dense(module)[0].shape))
        if shape != layer.weight.shape or ((module.bias is None) != (layer.bias is None)):
            raise ValueError(f"{name or 'the model'}: a {layer.weight.shape} weight "
                             f"{'with' if layer.bias is not None else 'without'} bias does not fit "
                             f"{module}")
        if id(module) in by_module:  # one module under two names, two weights in the file
            raise ValueError(f"{name}: a module the model also holds under another name, whose "
                             f"weight the file holds too; the model ties what the file does not")
        replace[name] = by_module[id(module)] = LowbitLinear(layer, share).train(module.training)
    for name, m in model.named_modules(remove_duplicate=False):  # (tied)
        if id(m) in by_module:
            replace[name] = by_module[id(m)]
    return replace


def _install_layers(model, files: list, rename=None) -> None:
    """Replaces `model`'s nn.Linear modules by LowbitLinears on the layers the checkpoint `files`
    (save_pretrained's shards) hold, under the names `rename` gives the files' module names,
    their buffers views of the files' copy-on-write maps, which transformers' loader then
    replaces (a write before that stays private) (_hf); layers of modules the model lacks are
    left to transformers' report of unexpected keys."""
    arrays, origin = _read_files(files, private=True)
    folder = os.path.dirname(files[0]) or "."
    layers = _state_dict_layers(folder, arrays, origin)
    if rename is not None:
        layers = {rename(name): layer for name, layer in layers.items()}
    names = dict(model.named_modules(remove_duplicate=False))
    layers = {n: layer for n, layer in layers.items() if n in names}
    for name, new in _lowbit_modules(folder, model, layers, share=True).items():
        model = _replace(model, name, new)


def load(path, model: torch.nn.Module) -> torch.nn.Module:
    """Loads quantized state into `model`, in place, and returns it. `path`: a lowbit file (from
    :func:`save`, ``lowbit quantize`` or ``lb.save``), or the state of a quantized model as
    ``state_dict()`` holds it in a safetensors file or folder (safetensors' ``save_model``,
    Hugging Face's ``save_pretrained``). Each quantized ``nn.Linear`` (or :class:`LowbitLinear`)
    ``name`` of `model` is replaced by a LowbitLinear on the file's weight: a lowbit file's
    QuantizedWeight ``name.weight`` (with ``name.bias`` and ``name.activations``), or the
    LowbitLinear state ``name.weight_<part>`` / ``name._extra_state`` (with ``name.bias``). A
    lowbit file's QuantizedWeight of another kind of module (an embedding) is loaded dequantized;
    every other array goes to the parameter or buffer of that name (converted to its dtype). A
    module or key missing on either side, or a shape that does not match, raises ValueError:
    nothing is silently dropped."""
    # Everything is checked before the model is touched: an error leaves it as it was.
    arrays, origin = _read_state(path)
    layers = _state_dict_layers(path, arrays, origin)  # name -> lb.Linear
    for key in [k for k, v in arrays.items() if isinstance(v, QuantizedWeight)]:
        qw = arrays.pop(key)
        name = key[:-len(".weight")] if key.endswith(".weight") else "" if key == "weight" else None
        try:
            module = None if name is None else model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, LowbitLinear) and _dense(module) is None:
            arrays[key] = qw.dequantize()  # a quantized embedding (or a key no module has)
            continue
        if name in layers:
            raise ValueError(f"{path}: {name or 'the model'}'s weight is in the file twice: as a "
                             f"QuantizedWeight and as LowbitLinear state")
        p = name + "." if name else ""
        bias = arrays.pop(p + "bias", None)
        layers[name] = Linear(qw, None if bias is None else np.array(bias),
                              activations=_activations_of(arrays.pop(p + "activations", None)))
    replace = _lowbit_modules(path, model, layers)
    modules = list(model.named_modules(remove_duplicate=False))
    # the keys LowbitLinears will own (every key of one replaced), and the rest of the state
    owned = {(name + "." if name else "") + k for name, m in modules
             if isinstance(m, LowbitLinear) or name in replace for k in m.state_dict()}
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in owned}
    buffers = {}  # a file's value of a buffer the model keeps out of its state_dict
    for key, buf in model.named_buffers():  # (an older transformers' saved position_ids)
        if key not in state and key not in owned and key in arrays and buf is not None:
            buffers[key] = (buf, torch.from_numpy(np.array(arrays.pop(key))))
    # a tensor held under several names (tied embeddings: lm_head.weight is embed_tokens.weight,
    # and save_pretrained writes one of them) is loaded when one of its names is in the file
    names = {}
    for k, v in state.items():
        names.setdefault(id(v), []).append(k)
    missing = sorted(k for k in state if not any(n in arrays for n in names[id(state[k])]))
    unexpected = sorted(set(arrays) - set(state))
    if missing or unexpected:
        raise ValueError(f"{path}: does not match the model: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for key, (target, value) in [(k, (state[k], v)) for k, v in arrays.items()] + list(buffers.items()):
        if isinstance(target, torch.Tensor) and tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in {path}, {tuple(target.shape)} "
                             f"in the model")
    for name, new in replace.items():
        model = _replace(model, name, new)
    extra = {}  # other modules' extra state, which only load_state_dict hands them
    with torch.no_grad():
        for buf, value in buffers.values():
            buf.copy_(value)
        for key, value in arrays.items():  # one tensor at a time (a file's BF16 read as float32)
            value = torch.from_numpy(np.array(value))
            if key.rsplit(".", 1)[-1] == "_extra_state" or not isinstance(state[key], torch.Tensor):
                extra[key] = value
            else:
                state[key].copy_(value)
    if extra:
        model.load_state_dict(extra, strict=False)
    if replace:
        _hf.mark(model)
    return model
