"""The lowbit command: info, bench --json, quantize."""
import io
import json
import os
import sys

import numpy as np
import pytest

import lowbit as lb
from lowbit import cli

F32 = np.float32


def test_info_json(capsys):
    cli.main(["info", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["isa"] == lb.cpu_info()["isa"] and "cpu" in info


GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


def test_cpu_name_on_x86_64_and_aarch64():
    """aarch64's /proc/cpuinfo names no model, only MIDR codes: `lowbit info` and the benchmark
    reports name the core from them."""
    assert cli.cpu_name_from("processor\t: 0\nmodel name\t: AMD EPYC 9R14\n", "x86_64") == "AMD EPYC 9R14"
    assert cli.cpu_name_from(GRAVITON2, "aarch64") == "Arm Neoverse N1"
    assert cli.cpu_name_from(GRAVITON2.replace("0xd0c", "0xd8e"), "aarch64") == "Arm part 0xd8e"
    assert cli.cpu_name_from(GRAVITON2.replace("0x41", "0xc0").replace("0xd0c", "0xac3"),
                             "aarch64") == "Ampere-1"
    # qemu-user (before 8.1) shows the host's x86 cpuinfo to an aarch64 process: not its CPU
    assert cli.cpu_name_from("model name\t: AMD EPYC 9R14\n", "aarch64") is None
    assert cli.cpu_name()


@pytest.fixture
def weights(rng):
    return {"fc1.weight": rng.normal(0, 0.02, (96, 128)).astype(F32),
            "fc2.weight": rng.normal(0, 0.02, (64, 96)).astype(np.float16),
            "fc1.bias": rng.normal(size=96).astype(F32),
            "tiny": rng.normal(size=(4, 128)).astype(F32)}


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_quantize_files(tmp_path, weights, capsys, fmt):
    src = tmp_path / f"in.{fmt}"
    if fmt == "npz":
        np.savez(src, **weights)
    else:
        lb.save(src, weights)
    out = tmp_path / "out.lowbit"
    cli.main(["quantize", str(src), str(out), "--bits", "4", "--group-size", "32"])
    got = lb.load(out)
    qw = got["fc1.weight"]
    expected = lb.quantize(weights["fc1.weight"], bits=4, group_size=32)
    np.testing.assert_array_equal(qw.dequantize(), expected.dequantize())
    assert got["fc2.weight"].bits == 4  # float16 in, quantized too
    np.testing.assert_array_equal(got["fc1.bias"], weights["fc1.bias"])  # 1-D: kept
    np.testing.assert_array_equal(got["tiny"], weights["tiny"])          # below --min-dim: kept
    report = capsys.readouterr().out
    assert "fc1.weight" in report and "int4 g32" in report and "4 tensors" in report


def test_quantize_with_a_plan(tmp_path, weights):
    src, out, plan = tmp_path / "in.safetensors", tmp_path / "out.lowbit", tmp_path / "plan.json"
    lb.save(src, weights)
    plan.write_text(json.dumps({"fc1.weight": {"bits": 8}, "fc2.weight": "keep"}))
    cli.main(["quantize", str(src), str(out), "--bits", "4", "--plan", str(plan)])
    got = lb.load(out)
    assert got["fc1.weight"].bits == 8
    np.testing.assert_array_equal(got["fc2.weight"], weights["fc2.weight"])


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_with_a_calibrated_method(tmp_path, weights, rng, capsys, method):
    src, out, cal = tmp_path / "in.safetensors", tmp_path / "out.lowbit", tmp_path / "cal.npz"
    lb.save(src, weights)
    rows = {"fc1.weight": rng.normal(size=(200, 128)).astype(F32),
            "fc2.weight": rng.normal(size=(200, 96)).astype(F32)}
    np.savez(cal, **rows)
    cli.main(["quantize", str(src), str(out), "--bits", "4", "--group-size", "32", "--method",
              method, "--calibration", str(cal)])
    got = lb.load(out)
    expected = lb.quantize(weights["fc1.weight"], bits=4, group_size=32, method=method,
                           calibration=rows["fc1.weight"])
    np.testing.assert_array_equal(got["fc1.weight"].dequantize(), expected.dequantize())
    assert f"int4 g32 {method}" in capsys.readouterr().out
    # a tensor it would quantize without input rows, or no --calibration at all: an error
    np.savez(cal, **{"fc1.weight": rows["fc1.weight"]})
    for extra in (["--calibration", str(cal)], []):
        with pytest.raises(SystemExit) as e:
            cli.main(["quantize", str(src), str(tmp_path / "o2.lowbit"), "--bits", "4",
                      "--method", method, *extra])
        assert e.value.code == 2
        assert "calibration" in capsys.readouterr().err
    assert not (tmp_path / "o2.lowbit").exists()


def test_quantize_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(bad), str(tmp_path / "out.lowbit")])
    assert e.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "out.lowbit").exists()
    w = np.ones((64, 64), np.float32)
    w[3, 5] = np.nan
    with open(tmp_path / "nan.NPZ", "wb") as f:  # (the suffix in any case)
        np.savez(f, fine=np.ones((64, 64), np.float32), broken=w)
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(tmp_path / "nan.NPZ"), str(tmp_path / "out.lowbit")])
    assert e.value.code == 2 and "tensor 'broken': weight row 3" in capsys.readouterr().err
    assert not (tmp_path / "out.lowbit").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--threads", "0"])
    assert e.value.code == 2 and "positive" in capsys.readouterr().err


def test_bf16_safetensors_load_as_float32(tmp_path):
    x = np.array([1.5, -2.25, 3.0], F32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    np.testing.assert_array_equal(lb.load(tmp_path / "b.safetensors")["x"], x)


def write_bf16(path, tensors):
    """A safetensors file of {name: float32 array} stored as bfloat16 (the top 16 bits)."""
    header, blobs, at = {}, [], 0
    for name, x in tensors.items():
        bits = (np.ascontiguousarray(x, F32).view(np.uint32) >> 16).astype("<u2")
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [at, at + bits.nbytes]}
        blobs.append(bits.tobytes())
        at += bits.nbytes
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_quantize_reads_a_bf16_checkpoint_one_tensor_at_a_time(tmp_path, rng, capsys):
    """A BF16 checkpoint's float32 copies take twice the file: the command converts each tensor
    when it quantizes it (the file's tensors stay BF16 views until then), reports the file's
    bytes, and writes the tensors it keeps back as BF16."""
    from lowbit.io import BF16

    def bf16_values(x):  # what a BF16 file holds of x, as float32
        return ((x.view(np.uint32) >> 16) << 16).view(F32)

    w = rng.normal(size=(64, 128)).astype(F32)
    norm = rng.normal(size=128).astype(F32)
    write_bf16(tmp_path / "m.safetensors", {"w": w, "norm": norm})
    tensors = cli.read_tensors(tmp_path / "m.safetensors")
    assert all(isinstance(t, BF16) for t in tensors.values()) and tensors["w"].nbytes == w.size * 2
    np.testing.assert_array_equal(np.asarray(tensors["w"]), bf16_values(w))
    cli.main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "o.lowbit"), "--bits", "4",
              "--group-size", "32"])
    table = capsys.readouterr().out
    assert "bfloat16 (kept" in table and f"{w.size * 2 / 1e6:.2f}" in table
    got = lb.load(tmp_path / "o.lowbit")
    expect = lb.quantize(bf16_values(w), bits=4, group_size=32)
    np.testing.assert_array_equal(got["w"].dequantize(), expect.dequantize())
    np.testing.assert_array_equal(got["norm"], bf16_values(norm))
    header_len = int.from_bytes((tmp_path / "o.lowbit").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "o.lowbit").read_bytes()[8:8 + header_len])
    assert header["norm"]["dtype"] == "BF16"


def fake_rows(shapes):
    return [dict(M=m, N=n, K=k, format=f, us=us * m, speedup=1.0, rel_error=0.0, weight_mb=1.0)
            for f, us in (("numpy float32", 50.0), ("int8 sym (W8A8)", 10.0)) for m, n, k in shapes]


def test_bench_plot_without_matplotlib_fails_before_timing(tmp_path, monkeypatch, capsys):
    from lowbit import bench

    def no_matplotlib():
        raise ImportError("--plot needs matplotlib: pip install 'lowbit[plot]'")
    monkeypatch.setattr(bench, "plotting", no_matplotlib)
    monkeypatch.setattr(bench, "quick_table", lambda *a, **k: pytest.fail("timed before failing"))
    with pytest.raises(SystemExit):
        cli.main(["bench", "--plot", str(tmp_path / "p.png")])
    assert "needs matplotlib" in capsys.readouterr().err


def test_bench_plot(tmp_path, monkeypatch, capsys):
    """lowbit bench --plot writes a picture of throughput against batch size, over more than
    three batch sizes by default, and says where (quick_table is replaced by fixed rows: the
    timing itself belongs to the benchmarks)."""
    pytest.importorskip("matplotlib")
    from lowbit import bench
    asked = []

    def table(shapes, threads=None):
        asked.append(shapes)
        return fake_rows(shapes)

    monkeypatch.setattr(bench, "quick_table", table)
    drawn = {}
    real_plot = bench.plot
    monkeypatch.setattr(bench, "plot", lambda rows, path, machine="": (
        drawn.update(machine=machine), real_plot(rows, path, machine)))
    out = tmp_path / "bench.png"
    cli.main(["bench", "--json", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rows"] == fake_rows(asked[0])
    assert len({m for m, _, _ in asked[0]}) > 3
    assert f"plot written to {out}" in captured.err
    info = lb.cpu_info()
    assert cli.cpu_name() in drawn["machine"] and info["isa"] in drawn["machine"]
    assert f"{info['num_threads']} threads" in drawn["machine"]
    cli.main(["bench", "--plot", str(tmp_path / "two.png"), "--shapes", "1x64x64,8x64x64,1x32x64"])
    assert asked[-1] == ((1, 64, 64), (8, 64, 64), (1, 32, 64))


def test_bench_json_says_version_kernels_and_threads(monkeypatch, capsys):
    from lowbit import bench
    monkeypatch.setattr(bench, "quick_table", lambda shapes, threads=None: fake_rows(shapes))
    cli.main(["bench", "--json", "--threads", "1", "--shapes", "2x32x64"])
    got = json.loads(capsys.readouterr().out)
    assert got["version"] == lb.__version__ and got["isa"] == lb.cpu_info()["isa"]
    assert got["threads"] == 1 and got["cpu"] == cli.cpu_name()
    assert {(r["M"], r["N"], r["K"]) for r in got["rows"]} == {(2, 32, 64)}


@pytest.mark.parametrize("shapes", ["1x4096", "1x4096x4096x2", "0x64x64", "ax64x64", "1x64x64,"])
def test_bench_refuses_bad_shapes(shapes, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--shapes", shapes])
    assert e.value.code == 2 and "MxNxK" in capsys.readouterr().err


def test_bench_table_labels_symmetry_and_runs_the_given_shapes(capsys):
    """The INT4 rows are asymmetric (d q + m): they were labelled only "int4 g32"."""
    cli.main(["bench", "--shapes", "1x64x128"])
    out = capsys.readouterr().out
    assert "int4 g32 asym (W4A8)" in out and "int4 g32 asym (W4A32)" in out
    assert "int8 sym (W8A8)" in out and "1 x 64 x 128" in out


def quantize_fails(argv, capsys, match):
    """Runs lowbit quantize expecting exit status 2 and `match` in its error; returns stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", *map(str, argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err, err
    return err


def test_quantize_and_save_name_a_missing_output_folder_before_any_work(tmp_path, weights, capsys):
    src = tmp_path / "w.npz"
    np.savez(src, **weights)
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(src), str(tmp_path / "nowhere" / "o.lowbit")])
    out, err = capsys.readouterr()
    assert f"no folder {tmp_path / 'nowhere'}" in err and "[1/" not in out + err  # (none started)
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere to write it in"):
        lb.save(tmp_path / "nowhere" / "m.lowbit", {"a": np.ones(2)})


def test_quantize_refuses_to_overwrite_its_input(tmp_path, weights, capsys):
    """lowbit quantize a.npz a.npz overwrote the float input, also through another spelling of
    its path, a symbolic or a hard link."""
    src = tmp_path / "a.npz"
    np.savez(src, **weights)
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.npz").symlink_to(src)
    os.link(src, tmp_path / "hard.npz")
    for out in (src, tmp_path / "sub" / ".." / "a.npz", tmp_path / "link.npz", tmp_path / "hard.npz"):
        quantize_fails([src, out], capsys, "refusing to overwrite")
    assert src.read_bytes() == before
    cal, plan = tmp_path / "cal.npz", tmp_path / "plan.json"
    np.savez(cal, x=np.ones(3))
    plan.write_text("{}")
    quantize_fails([src, cal, "--method", "gptq", "--calibration", cal], capsys, "refusing")
    quantize_fails([src, plan, "--plan", plan], capsys, "refusing")
    assert plan.read_text() == "{}"


def test_quantize_refuses_a_group_size_it_cannot_use(tmp_path, weights, capsys):
    """--group-size 48 quantized nothing (no width here is a multiple of 48) and exited 0."""
    src = tmp_path / "a.npz"
    np.savez(src, **{"fc1.weight": weights["fc1.weight"], "fc3.weight": np.ones((32, 64), F32)})
    quantize_fails([src, tmp_path / "o.lowbit", "--bits", "4", "--group-size", "48"], capsys,
                   "group_size must be a positive multiple of 32")
    quantize_fails([src, tmp_path / "o.lowbit", "--bits", "8", "--asymmetric"], capsys,
                   "8-bit weights are symmetric")
    assert not (tmp_path / "o.lowbit").exists()


def test_quantize_with_nothing_to_quantize_fails(tmp_path, capsys):
    src = tmp_path / "a.npz"
    np.savez(src, bias=np.ones(64, F32), small=np.ones((4, 64), F32), ids=np.ones((64, 64), np.int32))
    quantize_fails([src, tmp_path / "o.lowbit"], capsys, "nothing to quantize")
    np.savez(src, w=np.ones((64, 96), F32))  # 96 columns: not a multiple of 64
    quantize_fails([src, tmp_path / "o.lowbit", "--bits", "4", "--group-size", "64"], capsys,
                   "nothing to quantize")
    assert not (tmp_path / "o.lowbit").exists()


@pytest.mark.parametrize("entry,match", [
    ({"missing.weight": {"bits": 8}}, "tensors the input does not hold: 'missing.weight'"),
    ({"fc2.weight": {"bits": 4, "group_size": 64}}, "group_size 64 does not divide the 96 columns of 'fc2.weight'"),
    ({"fc2.weight": {"bits": 3}}, "'fc2.weight': bits must be 4 or 8, got 3"),
    ({"fc2.weight": {"group_size": 48}}, "'fc2.weight': group_size must be a positive multiple of 32"),
    ({"fc2.weight": {"bits": 8, "symmetric": False}}, "'fc2.weight': 8-bit weights are symmetric"),
    ({"fc2.weight": {"symmetric": "yes"}}, "symmetric must be true or false"),
    ({"fc2.weight": {"bits": 4, "groups": 32}}, "expected \"keep\" or an object"),
    ({"fc2.weight": "drop"}, "expected \"keep\" or an object"),
    ({"fc1.bias": {"bits": 8}}, "--plan quantizes 'fc1.bias', which is float32 of shape (96,)"),
    ([1, 2], "expected a JSON object"),
])
def test_quantize_validates_the_whole_plan_first(tmp_path, weights, capsys, entry, match):
    """A plan naming a tensor that does not exist was ignored, a group size not dividing a
    tensor's width kept it as float, {"bits": 3} failed at tensor 22 of 104 without naming it.
    Every entry is checked before the first tensor is quantized."""
    src, plan = tmp_path / "a.npz", tmp_path / "plan.json"
    np.savez(src, **weights)
    plan.write_text(json.dumps(entry))
    err = quantize_fails([src, tmp_path / "o.lowbit", "--bits", "4", "--plan", plan], capsys, match)
    assert "[1/" not in err  # refused before the first tensor
    assert not (tmp_path / "o.lowbit").exists()


def test_quantize_names_tensors_without_calibration_rows_before_starting(tmp_path, weights, capsys):
    src, cal = tmp_path / "a.npz", tmp_path / "cal.npz"
    np.savez(src, **weights)
    np.savez(cal, **{"fc1.weight": np.ones((8, 128), F32)})
    err = quantize_fails([src, tmp_path / "o.lowbit", "--method", "gptq", "--calibration", cal],
                         capsys, "no input rows for tensor 'fc2.weight'")
    assert "[1/" not in err


def test_quantize_progress_is_plain_lines_unless_a_terminal(tmp_path, weights, capsys, monkeypatch):
    """The progress line used carriage returns, one long line in a log: now one line per tensor
    when stderr is not a terminal, and a bar redrawn in place when it is."""
    src = tmp_path / "a.npz"
    np.savez(src, **weights)
    cli.main(["quantize", str(src), str(tmp_path / "o.lowbit")])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [f"[{i + 1}/4] {name}" for i, name in enumerate(weights)]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    cli.main(["quantize", str(src), str(tmp_path / "o2.lowbit")])
    shown = term.getvalue()
    assert shown.count("\r") == 4 and shown.endswith("\n") and "4/4" in shown and "#" * 30 in shown
