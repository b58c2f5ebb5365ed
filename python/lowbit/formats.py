"""The block weight formats: the GGUF types lowbit runs beyond its own int8 / int4 layouts.

One descriptor per format lives in the C++ core (``csrc/formats.h``: block, bits, scale structure,
file decoder, kernel entries, kernel-layout parts); this module only exposes that table, so the
GGUF reader, the saved-file format, :class:`lowbit.QuantizedWeight` and the tests all read the
same rows. GGUF Q4_0 and Q4_1 are not here: they map exactly onto lowbit's int4 layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core


@dataclass(frozen=True)
class BlockFormat:
    """A block format: each sub-block of ``sub`` inputs holds ``w = D (u - offset) + B`` with
    ``bits``-bit values u (``lut``: indices into a non-linear grid), D rebuilt from the file's
    scales (``scale``: "half", "code" (float16 d times an integer code) or "e8m0") and B from its
    minima (``min``: "none", "half" or "code")."""

    name: str
    index: int
    ggml_type: int
    block: int
    bytes: int
    sub: int
    bits: int
    offset: int
    lut: str
    scale: str
    min: str

    def parts(self, n: int, k: int) -> dict:
        """{part: (dtype, shape)} of an (n, k) weight in the kernel layout."""
        return {p: (np.dtype(dt), tuple(shape)) for p, (dt, shape) in _core.blk_parts(self.index, n, k).items()}


BLOCK_FORMATS = {d["name"]: BlockFormat(**d) for d in _core.block_formats()}
PARTS = ("q8", "nib", "bits", "d", "dm", "sc", "mc")  # every part a block format may have
