"""The lowbit command: info, bench --json, quantize."""
import json

import numpy as np
import pytest

import lowbit as lb
from lowbit import cli

F32 = np.float32


def test_info_json(capsys):
    cli.main(["info", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["isa"] == lb.cpu_info()["isa"] and "cpu" in info


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


def test_bf16_safetensors_load_as_float32(tmp_path):
    x = np.array([1.5, -2.25, 3.0], F32)
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bits.tobytes())
    np.testing.assert_array_equal(lb.load(tmp_path / "b.safetensors")["x"], x)


def test_bench_plot(tmp_path, monkeypatch, capsys):
    """lowbit bench --plot writes a picture of throughput against batch size (quick_table is
    replaced by fixed rows: the timing itself belongs to the benchmarks)."""
    pytest.importorskip("matplotlib")
    from lowbit import bench
    rows = [dict(M=m, N=256, K=512, format=f, us=us * m, speedup=1.0, rel_error=0.0, weight_mb=1.0)
            for f, us in (("numpy float32", 50.0), ("int8 (W8A8)", 10.0)) for m in (1, 16, 128)]
    monkeypatch.setattr(bench, "quick_table", lambda threads=None: rows)
    out = tmp_path / "bench.png"
    cli.main(["bench", "--json", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["rows"] == rows
