"""Mutated files for every reader: a byte flipped, a run overwritten, the file cut short. A reader
may accept a mutation it cannot tell from valid data, but may only ever fail with FormatError."""
from pathlib import Path

import numpy as np
import pytest

import lowbit as lb

F32 = np.float32
FUZZ = Path(__file__).parent / "fuzz"
MUTATIONS = 1500


def mutations(data, rng):
    """Deterministic corruptions of `data`, weighted toward its header."""
    n = len(data)
    for i in range(MUTATIONS):
        b = bytearray(data)
        at = int(rng.integers(0, min(n, 512) if i % 2 else n))
        kind = i % 4
        if kind == 0:
            b[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            b[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        elif kind == 2:
            b[at:at + 8] = (0xFF).to_bytes(1, "little") * 8  # huge counts and sizes
        else:
            del b[at:]
        yield bytes(b)


def check_reader(tmp_path, data, read, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "fuzzed"
    outcomes = {"ok": 0, "FormatError": 0}
    for blob in mutations(data, rng):
        path.write_bytes(blob)
        try:
            read(path)
            outcomes["ok"] += 1
        except lb.FormatError:
            outcomes["FormatError"] += 1
    assert outcomes["FormatError"] > MUTATIONS // 4  # the mutations do reach the checks


def test_gguf_reader_survives_mutations(tmp_path, rng):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T, quants
    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(str(src), arch="llama")
    w.add_string("general.name", "fuzz")
    w.add_array("tokens", ["a", "bc", "def"])
    w.add_tensor("q4", quants.quantize(rng.normal(size=(16, 64)).astype(F32), T.Q4_1), raw_dtype=T.Q4_1)
    w.add_tensor("q8", quants.quantize(rng.normal(size=(16, 64)).astype(F32), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("f", rng.normal(size=(5,)).astype(F32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def read(path):
        lb.gguf_metadata(path)
        for t in lb.load_gguf(path).values():
            if isinstance(t, lb.QuantizedWeight):
                lb.matmul(np.ones((1, t.shape[1]), F32), t)
    check_reader(tmp_path, src.read_bytes(), read, 1)


def test_lowbit_file_reader_survives_mutations(tmp_path, rng):
    src = tmp_path / "src.lowbit"
    w = rng.normal(0, 0.02, (20, 64)).astype(F32)
    lb.save(src, {"a": lb.quantize(w, bits=8), "b": lb.quantize(w, bits=4, group_size=32),
                  "c": lb.quantize(w, bits=4, symmetric=False), "bias": np.ones(20, F32)})

    def read(path):
        for t in lb.load(path).values():
            if isinstance(t, lb.QuantizedWeight):
                lb.matmul(np.ones((1, t.shape[1]), F32), t)
    check_reader(tmp_path, src.read_bytes(), read, 2)


@pytest.mark.parametrize("reader", ["load", "load_gptq"])
def test_safetensors_header_survives_mutations(tmp_path, rng, reader):
    """The JSON header alone mutated (as tests/fuzz/fuzz_readers.py's "header" target does),
    framed with its length and the original data section: only FormatError, from lb.load and
    from the GPTQ / AWQ loaders, which share its reader."""
    src = tmp_path / "src.lowbit"
    w = rng.normal(0, 0.02, (20, 64)).astype(F32)
    lb.save(src, {"a": lb.quantize(w, bits=8), "b": lb.quantize(w, bits=4, symmetric=False),
                  "bias": np.ones(20, F32)})
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = data[8:8 + n], data[8 + n:]
    framed = (len(h).to_bytes(8, "little") + h + body for h in mutations(header, rng))
    path = tmp_path / "fuzzed"
    read = getattr(lb, reader)
    outcomes = {"ok": 0, "FormatError": 0}
    for blob in framed:
        path.write_bytes(blob)
        try:
            for t in read(path).values():
                if isinstance(t, lb.QuantizedWeight):
                    lb.matmul(np.ones((1, t.shape[1]), F32), t)
            outcomes["ok"] += 1
        except lb.FormatError:
            outcomes["FormatError"] += 1
    assert outcomes["FormatError"] > MUTATIONS // 4


@pytest.mark.parametrize("path", sorted(FUZZ.glob("corpus/*/regress-*")), ids=lambda p: p.name)
def test_fuzz_findings_stay_fixed(path, monkeypatch):
    """Inputs the coverage-guided fuzzer once crashed a reader with (tests/fuzz/corpus/*/regress-*):
    each must now read or raise FormatError."""
    pytest.importorskip("gguf")
    monkeypatch.syspath_prepend(str(FUZZ))
    from fuzz_readers import reader
    try:
        reader(path.parent.name)(path)
    except lb.FormatError:
        pass
