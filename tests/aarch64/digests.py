"""Same inputs, same weights file, same outputs on every architecture: sha256 digests of lowbit's
results, made on x86-64 and checked on aarch64 (tests/aarch64.sh runs it under qemu-user).

    python tests/aarch64/digests.py make DIR    # x86-64: DIR/digests.lowbit + DIR/digests.json
    python tests/aarch64/digests.py check DIR   # aarch64: the same digests on every kernel set

`make` builds every input from integers (random integers times powers of two: each float is exact,
so no libm, parser or rounding difference can enter), quantizes the weights and builds one weight
of every GGUF type lowbit reads from raw blocks, saves all of it with lb.save, then computes a
digest per (operation, mode) on every kernel set the CPU has; the sets must agree, and the digests
go to DIR/digests.json. `check` loads that file as it is (no repacking) and computes the digests
again on each kernel set this CPU has (or those named by --isas); any difference fails (exit 1).

Covered: gemm_s8; the quantizers (int8 per row and per group, int4 symmetric / asymmetric; the
digest is of the file lb.save writes for the result); INT8 layers (W8A8), INT4 layers with int8
activations (W4A8) and float activations (W4A32), with minima and with zero points; every GGUF
type lowbit reads (Q4_0, Q4_1 and lowbit.formats.BLOCK_FORMATS) with both activation modes, with
moderate scales and (block formats) once more from raw random blocks (subnormal, infinite and NaN
float16 scales);
int4 pack / unpack; the lowbit.nn ops that run in C++ (norms, GELU, softmax, attention). Each
layer digest covers M = 1 (GEMV), 2, 5 and 33 rows. NaNs are hashed as one canonical NaN: their
sign and payload are not specified to be the same across architectures (x86 makes negative
default NaNs, ARM positive ones), their positions are.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile

import numpy as np

import lowbit as lb
from lowbit import nn
from lowbit.formats import BLOCK_FORMATS
from lowbit.gguf import READ, weight_from_blocks

F32 = np.float32
N, K = 72, 512  # 4.5 panels of 16 columns; K: two 256-value super-blocks (K-quants, IQ4_XS)
ROWS = (1, 2, 5, 33)
GGUF_FIELDS = {"Q4_0": (18, (0,)), "Q4_1": (20, (0, 2))}  # block bytes, float16 field offsets


def exact(rng, lo, hi, shape, exponent):
    """Random integers in [lo, hi) times 2**exponent, as float32: every value exact."""
    return (rng.integers(lo, hi, shape).astype(np.float64) * 2.0 ** exponent).astype(F32)


def exact_halves(rng, shape):
    """Moderate float16 scales, exact: +-(1..64) * 2**-12."""
    v = rng.integers(1, 65, shape) * rng.choice([-1, 1], shape)
    return (v * 2.0 ** -12).astype(np.float16)


def block_weight(name, rng, finite):
    """A weight of GGUF type `name` from N rows of random file blocks, built as load_gguf builds
    it; finite: the float16 (and E8M0) scales replaced by moderate exact values."""
    if name in GGUF_FIELDS:
        size, fields = GGUF_FIELDS[name]
        raw = rng.integers(0, 256, (N, K // 32 * size), dtype=np.uint8)
        if finite:
            blocks = raw.reshape(-1, size)
            for at in fields:
                blocks[:, at:at + 2] = exact_halves(rng, blocks.shape[0])[:, None].view(np.uint8)
        return weight_from_blocks(name, raw, K)
    f = BLOCK_FORMATS[name]
    raw = rng.integers(0, 256, (N, K // f.block * f.bytes), dtype=np.uint8)
    qw = weight_from_blocks(name, raw, K)
    if not finite:
        return qw
    parts = {p: a.copy() for p, a in qw._parts.items()}
    for p in ("d", "dm"):
        if p in parts and parts[p].dtype == np.float16:
            parts[p][...] = exact_halves(rng, parts[p].shape)
    if f.scale == "e8m0":
        parts["d"][...] = rng.integers(118, 124, parts["d"].shape)
    return lb.QuantizedWeight.from_blocks(name, (N, K), parts)


def make_inputs():
    """{name: QuantizedWeight | array}: everything the digests run on, deterministic."""
    rng = np.random.default_rng(20261126)
    t = {
        "x": exact(rng, -512, 512, (max(ROWS), K), -7),
        "bias": exact(rng, -256, 256, N, -8),
        "w_float": exact(rng, -2048, 2048, (N, K), -14),
        "a_s8": rng.integers(-128, 128, (max(ROWS), K), dtype=np.int8),
        "b_s8": rng.integers(-128, 128, (N, K), dtype=np.int8),
        "nibbles": rng.integers(0, 16, (N, K), dtype=np.uint8),
        "nn_x": exact(rng, -1024, 1024, (9, 160), -6),
        "nn_r": exact(rng, -64, 64, (9, 160), -5),
        "nn_w": exact(rng, -128, 128, 160, -6),
        "nn_b": exact(rng, -128, 128, 160, -7),
        "q": exact(rng, -64, 64, (2, 7, 4, 64), -5),
        "k": exact(rng, -64, 64, (2, 40, 2, 64), -5),
        "v": exact(rng, -64, 64, (2, 40, 2, 64), -5),
    }
    t["w_int8"] = lb.quantize(t["w_float"])
    t["w_int8_g64"] = lb.quantize(t["w_float"], group_size=64)
    t["w_int4_sym"] = lb.quantize(t["w_float"], bits=4, group_size=32)
    t["w_int4_min"] = lb.quantize(t["w_float"], bits=4, group_size=32, symmetric=False)
    t["w_int4_zero"] = lb.QuantizedWeight.from_int(
        rng.integers(0, 16, (N, K)), exact_halves(rng, (N, K // 64)), bits=4, group_size=64,
        zeros=rng.integers(0, 16, (N, K // 64)))
    for name in READ:
        t[f"gguf_{name}"] = block_weight(name, rng, finite=True)
        if name in BLOCK_FORMATS:  # (lb.load refuses non-finite int4 scales: Q4_0 / Q4_1)
            t[f"gguf_{name}_raw"] = block_weight(name, rng, finite=False)
    return t


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.kind == "f":
            a = np.where(np.isnan(a), np.array(np.nan, a.dtype), a)  # one canonical NaN
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def saved_digest(qw):
    """The digest of the file lb.save writes for a quantizer's result (every part, every byte)."""
    with tempfile.TemporaryDirectory() as d:
        lb.save(os.path.join(d, "w"), {"w": qw})
        with open(os.path.join(d, "w"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()


def layer(x, qw, bias, activations):
    return [lb.matmul(x[:m], qw, bias, activations=activations) for m in ROWS]


def digests(t):
    """{"operation / mode": sha256} on the calling thread's kernel set."""
    x, bias, w = t["x"], t["bias"], t["w_float"]
    d = {}
    d["gemm_s8 / int32"] = digest(*[lb.gemm_s8(t["a_s8"][:m], t["b_s8"]) for m in ROWS])
    d["quantize int8 / per row"] = saved_digest(lb.quantize(w))
    d["quantize int8 / group 64"] = saved_digest(lb.quantize(w, group_size=64))
    d["quantize int4 / symmetric g32"] = saved_digest(lb.quantize(w, bits=4, group_size=32))
    d["quantize int4 / minimum g32"] = saved_digest(
        lb.quantize(w, bits=4, group_size=32, symmetric=False))
    d["int4 / pack, unpack"] = digest(lb.pack_int4(t["nibbles"]),
                                      lb.unpack_int4(lb.pack_int4(t["nibbles"])))
    d["INT8 per row / W8A8"] = digest(*layer(x, t["w_int8"], bias, "int8"))
    d["INT8 group 64 / W8A8"] = digest(*layer(x, t["w_int8_g64"], bias, "int8"))
    for name in ("sym", "min", "zero"):
        qw = t[f"w_int4_{name}"]
        d[f"INT4 {name} / W4A8"] = digest(*layer(x, qw, bias, "int8"))
        d[f"INT4 {name} / W4A32"] = digest(*layer(x, qw, bias, "float"))
    for name in READ:
        for suffix, label in (("", "finite scales"), ("_raw", "raw blocks")):
            qw = t.get(f"gguf_{name}{suffix}")
            if qw is None:
                continue
            with np.errstate(all="ignore"):
                d[f"{name} {label} / int8 act"] = digest(*layer(x, qw, bias, "int8"))
                d[f"{name} {label} / float act"] = digest(*layer(x, qw, bias, "float"))
    nx, nr, nw, nb = t["nn_x"], t["nn_r"], t["nn_w"], t["nn_b"]
    d["nn / rms_norm"] = digest(nn.rms_norm(nx, nw))
    d["nn / layer_norm + residual"] = digest(nn.layer_norm(nx, nw, nb, residual=nr))
    d["nn / gelu erf, tanh"] = digest(nn.gelu(nx), nn.gelu(nx, approximate="tanh"))
    d["nn / softmax"] = digest(nn.softmax(nx))
    q, k, v = t["q"], t["k"], t["v"]
    d["nn / attention"] = digest(nn.attention(q, k, v),
                                 nn.attention(q, k, v, causal=True, window=9),
                                 nn.attention(q, k, v, lengths=np.array([40, 17])))
    return d


def on_each_set(t, isas):
    """{set: digests} for each kernel set in `isas`."""
    out = {}
    for isa in isas:
        with lb.use_isa(isa):
            out[isa] = digests(t)
    return out


def sets_to_run(arg):
    available = lb.cpu_info()["available"]
    if not arg:
        return available
    isas = [i.strip() for i in arg.split(",")]
    missing = [i for i in isas if i not in available]
    if missing:
        sys.exit(f"digests: {', '.join(missing)} not available here ({', '.join(available)})")
    return isas


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["make", "check"])
    p.add_argument("dir")
    p.add_argument("--isas", help="comma-separated kernel sets (default: every available one)")
    args = p.parse_args()
    weights = os.path.join(args.dir, "digests.lowbit")
    record = os.path.join(args.dir, "digests.json")
    isas = sets_to_run(args.isas)
    where = f"{platform.machine()}, lowbit {lb.__version__}"

    if args.action == "make":
        os.makedirs(args.dir, exist_ok=True)
        lb.save(weights, make_inputs())
        t = lb.load(weights)  # the digests run on what the file holds, as check's do
        per_set = on_each_set(t, isas)
        expected = per_set[isas[0]]
        bad = [(isa, key) for isa in isas for key in expected if per_set[isa][key] != expected[key]]
        for isa, key in bad:
            print(f"MISMATCH {key}: {isa} differs from {isas[0]}")
        if bad:
            return 1
        with open(record, "w") as f:
            json.dump({"made on": where, "sets": isas, "digests": expected}, f, indent=1)
        for key, h in expected.items():
            print(f"{h[:16]}  {key}")
        print(f"{len(expected)} digests, identical on {', '.join(isas)} ({where}) -> {record}")
        return 0

    with open(record) as f:
        made = json.load(f)
    expected = made["digests"]
    t = lb.load(weights)
    bad = 0
    for isa, got in on_each_set(t, isas).items():
        wrong = [key for key in expected if got.get(key) != expected[key]]
        for key in wrong:
            print(f"MISMATCH {isa}: {key}: {got.get(key, 'missing')[:16]} here, "
                  f"{expected[key][:16]} on {made['made on']}")
        bad += len(wrong)
        print(f"{isa}: {len(expected) - len(wrong)}/{len(expected)} digests equal to "
              f"{made['made on']} ({', '.join(made['sets'])})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
