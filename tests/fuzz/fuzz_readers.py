"""Coverage-guided fuzzing of lowbit's file readers (atheris, libFuzzer's engine for Python).

    pip install atheris
    python tests/fuzz/fuzz_readers.py gguf -runs=1000000        # or lowbit, gptq, awq, header
    python tests/fuzz/fuzz_readers.py all -runs=20000           # each reader in turn (CI)
    python tests/fuzz/fuzz_readers.py seeds                      # rewrite the seed corpus

Each input is written to a file (in /dev/shm when it exists) and read the way a user would: the
header, every tensor, and a matmul with each weight. The "header" target fuzzes the JSON header
of a safetensors / lowbit file alone: the input is the header text, written with its length
before it and a fixed data section after it (tests/fuzz/header.data, the data of the seed
header's file), so that mutations spend themselves on the JSON and what lb.load makes of it. The only exception a reader may raise is
lowbit.FormatError; anything else, or a crash, is a finding (libFuzzer saves the input as
crash-*). The fuzzer starts from the seed files in tests/fuzz/corpus/<reader>/ (valid small
files) and keeps what it discovers in a temporary directory, so the repository's corpus only
changes through `seeds`. lowbit's Python modules (and the Python loaded with them, json's
included) are instrumented for coverage; the C++ behind them is exercised but not instrumented.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# where each input is written for the reader to open (memory, when the machine has /dev/shm)
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
CORPUS = HERE / "corpus"
READERS = ("gguf", "lowbit", "gptq", "awq", "header")
HEADER_DATA = HERE / "header.data"


def make_seeds():
    """Small valid files for every reader, deterministic."""
    import gguf
    from gguf import GGMLQuantizationType as T, quants
    from safetensors.numpy import save_file

    import lowbit as lb

    rng = np.random.default_rng(0)
    f32 = np.float32
    for r in READERS:
        shutil.rmtree(CORPUS / r, ignore_errors=True)
        (CORPUS / r).mkdir(parents=True)

    path = CORPUS / "gguf" / "small.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_string("general.name", "seed")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "bc", "def"])
    for name, kind in (("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q8_0", T.Q8_0)):
        w.add_tensor(name, quants.quantize(rng.normal(size=(4, 32)).astype(f32), kind), raw_dtype=kind)
    for name, f in lb.formats.BLOCK_FORMATS.items():  # random bytes are valid blocks of these
        w.add_tensor("blk_" + name.lower(), rng.integers(0, 256, (2, f.bytes), dtype=np.uint8), raw_dtype=T[name])
    w.add_tensor("f16", rng.normal(size=(3, 4)).astype(np.float16))
    w.add_tensor("f32", rng.normal(size=(5,)).astype(f32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    w = rng.normal(0, 0.02, (16, 64)).astype(f32)
    lb.save(CORPUS / "lowbit" / "small.lowbit",
            {"a": lb.quantize(w, bits=8), "b": lb.quantize(w, bits=4, group_size=32),
             "c": lb.quantize(w, bits=4, symmetric=False), "bias": np.ones(16, f32)})
    # the header target: small.lowbit's header as the seed, its data section as the fixed data
    small = (CORPUS / "lowbit" / "small.lowbit").read_bytes()
    n = int.from_bytes(small[:8], "little")
    (CORPUS / "header" / "small.json").write_bytes(small[8:8 + n])
    HEADER_DATA.write_bytes(small[8 + n:])
    x = rng.normal(size=(64, 64)).astype(f32)
    gguf_weights = lb.load_gguf(path)
    lb.save(CORPUS / "lowbit" / "blocks.lowbit",
            {n: gguf_weights["blk_" + n] for n in ("q4_k", "q6_k", "q2_k", "iq4_xs", "mxfp4")})
    lb.save(CORPUS / "lowbit" / "methods.lowbit",
            {"gptq": lb.quantize(w, bits=4, group_size=32, method="gptq", calibration=x,
                                 act_order=True),
             "awq": lb.quantize(w, bits=4, group_size=32, method="awq", calibration=x)})

    k, n, g = 64, 16, 32
    q = rng.integers(0, 16, (k, n)).astype(np.uint32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.uint32)
    shifts = 4 * np.arange(8, dtype=np.uint32)
    gptq = {"l.qweight": (q.reshape(k // 8, 8, n) << shifts[None, :, None]).sum(1).astype(np.uint32),
            "l.qzeros": ((z - 1) % 16).reshape(k // g, n // 8, 8).__lshift__(shifts).sum(2).astype(np.uint32),
            "l.scales": rng.uniform(0.01, 0.1, (k // g, n)).astype(np.float16),
            "l.g_idx": (np.arange(k) // g).astype(np.int32)}
    save_file({name: a.view(np.int32) if a.dtype == np.uint32 else a for name, a in gptq.items()},
              str(CORPUS / "gptq" / "small.safetensors"))
    order = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    awq = {"l.qweight": (q.reshape(k, n // 8, 8)[:, :, order] << shifts).sum(2).astype(np.uint32),
           "l.qzeros": (z.reshape(k // g, n // 8, 8)[:, :, order] << shifts).sum(2).astype(np.uint32),
           "l.scales": gptq["l.scales"]}
    save_file({name: a.view(np.int32) if a.dtype == np.uint32 else a for name, a in awq.items()},
              str(CORPUS / "awq" / "small.safetensors"))


def reader(name):
    """The function one fuzz input goes through: path -> None, raising only FormatError."""
    import lowbit as lb

    one = None

    def run(weights):
        nonlocal one
        for t in weights.values():
            if isinstance(t, lb.QuantizedWeight):
                if one is None or one.shape[1] != t.shape[1]:
                    one = np.ones((1, t.shape[1]), np.float32)
                lb.matmul(one, t, activations="float" if t.bits == 4 else "int8")
                t.dequantize(rows=0)

    if name == "gguf":
        return lambda path: (lb.gguf_metadata(path), run(lb.load_gguf(path)))
    if name in ("lowbit", "header"):
        return lambda path: run(lb.load(path))
    return lambda path: run((lb.load_gptq if name == "gptq" else lb.load_awq)(path))


def fuzz(name, work, args):
    """Fuzzes reader `name` in this process, its findings in directory `work` and each input in
    SCRATCH (or `work`) under work's name (libFuzzer ends the process when done, so the caller,
    another process, removes them: `main`)."""
    import atheris

    import lowbit as lb
    import lowbit.checkpoints  # noqa: F401
    import lowbit.gguf  # noqa: F401
    import lowbit.io  # noqa: F401
    # everything loaded so far: instrument_imports() saw nothing under an editable install, whose
    # import hook bypasses atheris's ("no interesting inputs ... Is the code instrumented?")
    atheris.instrument_all()
    read = reader(name)
    suffix = {"gguf": ".gguf", "lowbit": ".lowbit"}.get(name, ".safetensors")
    path = (SCRATCH or Path(work)) / f"{Path(work).name}{suffix}"
    header_data = HEADER_DATA.read_bytes() if name == "header" else b""

    def one_input(data):
        if name == "header":  # the input is the JSON header: frame it as a file
            data = len(data).to_bytes(8, "little") + data + header_data
        path.write_bytes(data)
        try:
            read(path)
        except lb.FormatError:
            pass

    found = Path(work) / "found"
    found.mkdir()
    atheris.Setup([sys.argv[0], *args, str(found), str(CORPUS / name)], one_input)
    atheris.Fuzz()


def main(argv):
    if not argv or argv[0] not in READERS + ("all", "seeds", "--child"):
        sys.exit(f"usage: {Path(__file__).name} {{{'|'.join(READERS)}|all|seeds}} [libFuzzer flags]")
    what, rest = argv[0], argv[1:]
    if what == "seeds":
        make_seeds()
    elif what == "--child":
        fuzz(rest[0], rest[1], rest[2:])
    else:  # libFuzzer exits the process when done: one child per reader, its files removed here
        for name in READERS if what == "all" else (what,):
            print(f"== {name}", flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"lowbit-fuzz-{name}-"))
            try:
                rc = subprocess.run([sys.executable, __file__, "--child", name, str(work), *rest]).returncode
            finally:
                shutil.rmtree(work, ignore_errors=True)
                for f in (SCRATCH.glob(f"{work.name}.*") if SCRATCH else ()):
                    f.unlink(missing_ok=True)
            if rc:  # a finding (libFuzzer's crash-* file is in the current directory)
                sys.exit(rc)


if __name__ == "__main__":
    main(sys.argv[1:])
