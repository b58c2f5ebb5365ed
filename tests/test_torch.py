"""lowbit.torch: nn.Linear swapped for lowbit kernels (skipped without PyTorch)."""
import io
import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import lowbit as lb

torch = pytest.importorskip("torch")
import lowbit.torch as lbt  # noqa: E402
from test_block_formats import weight as block_weight  # noqa: E402


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(96, 128, bias=False), torch.nn.GELU()),
        torch.nn.Linear(128, 10))


def numpy_path(model, x, **fmt):
    """The same network on lb.Linear directly."""
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h = x
    for i, m in enumerate(lin):
        b = None if m.bias is None else m.bias.detach().numpy()
        h = lb.Linear(m.weight.detach().numpy(), b, **fmt)(h)
        if i == 0:
            h = np.maximum(h, 0)
        elif i == 1:
            h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
    return h


@pytest.mark.parametrize("fmt", [{}, {"bits": 4, "group_size": 32, "symmetric": False},
                                 {"bits": 4, "group_size": 32, "activations": "float"}])
def test_quantize_model_matches_the_numpy_path(fmt, rng):
    model = small_model()
    x = rng.normal(size=(5, 64)).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    out = lbt.quantize_model(model, **fmt)
    assert out is model
    assert sum(isinstance(m, lbt.LowbitLinear) for m in model.modules()) == 3
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    assert y.dtype == torch.float32 and y.shape == (5, 10)
    np.testing.assert_array_equal(y.numpy(), numpy_path(small_model(), x, **fmt))
    assert np.abs(y.numpy() - ref).max() < 0.1 * np.abs(ref).max()


def test_inputs_of_any_rank_and_layout(rng):
    model = lbt.quantize_model(torch.nn.Linear(64, 32))  # a bare Linear comes back replaced
    assert isinstance(model, lbt.LowbitLinear)
    x = torch.from_numpy(rng.normal(size=(2, 3, 64)).astype(np.float32))
    y = model(x)
    assert y.shape == (2, 3, 32)
    np.testing.assert_array_equal(model(x.transpose(0, 1).contiguous().transpose(0, 1)).numpy(),
                                  y.numpy())  # a strided view gives the same result
    for dtype in (torch.float16, torch.bfloat16):  # the kernels read the exact float32 values
        y = model(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y, model(x.to(dtype).float()).to(dtype), rtol=0, atol=0)
    with pytest.raises(TypeError, match="float32"):
        model(x.double())


def test_include_min_features_and_errors():
    model = small_model()
    lbt.quantize_model(model, include=lambda name: name != "3", bits=4, group_size=32)
    assert isinstance(model[3], torch.nn.Linear) and isinstance(model[0], lbt.LowbitLinear)
    assert "bits=4" in repr(model[0])
    model = lbt.quantize_model(small_model(), min_features=65)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2][0], lbt.LowbitLinear)
    with pytest.raises(ValueError, match="^0: group_size"):
        lbt.quantize_model(torch.nn.Sequential(torch.nn.Linear(48, 8)), bits=4, group_size=32)


def test_calibrated_methods_pass_through(rng):
    lin = torch.nn.Linear(64, 16)
    cal = rng.normal(size=(128, 64)).astype(np.float32)
    m = lbt.LowbitLinear.from_linear(lin, bits=4, group_size=32, method="gptq", calibration=cal,
                                     act_order=True)
    assert m.layer.weight.perm is not None


FORMATS = {"int8": {}, "int4": {"bits": 4, "group_size": 32, "symmetric": False},
           "static": {"activations": lb.StaticActivations(0.05)},
           "float": {"bits": 4, "group_size": 32, "activations": "float"}}


FORMATS["gptq"] = {"bits": 4, "group_size": 32, "method": "gptq", "act_order": True}
FORMATS["observer"] = {"activations": lb.MinMaxObserver}


def calibration_batches(n=4, rows=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 64, generator=g) for _ in range(n)]


def quantized(fmt, dtype=torch.float32, seed=0):
    options = dict(FORMATS[fmt])
    if fmt in ("gptq", "observer"):
        options["calibration"] = [x.to(dtype) for x in calibration_batches()]
    return lbt.quantize_model(small_model(seed).to(dtype), **options)


def run(model, x, dtype=torch.float32):
    with torch.inference_mode():
        return model(torch.from_numpy(x).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_state_dict_round_trips_bit_for_bit(fmt, dtype, rng):
    model = quantized(fmt, dtype)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    sd = model.state_dict()
    for name in ("0", "2.0", "3"):  # every Linear's packed weight, bias and settings are state
        assert any(k.startswith(name + ".weight_") for k in sd) and name + "._extra_state" in sd
    assert ("2.0.bias" in sd) is False and "0.bias" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = quantized(fmt, dtype, seed=1)  # other weights, same format
    assert not torch.equal(run(other, x, dtype), run(model, x, dtype))
    other.load_state_dict(torch.load(buf))  # weights_only: the settings are plain data
    y = run(other, x, dtype)
    assert y.dtype == dtype
    assert torch.equal(y, run(model, x, dtype))
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(run(copy, x, dtype), y)
    model.to(torch.float16)  # casts the bias only: the packed parts keep their bits
    assert torch.equal(model[0].weight_scales, copy[0].weight_scales)


def test_loading_quantized_state_into_a_float_model_raises():
    with pytest.raises(RuntimeError, match="weight_packed"):
        small_model().load_state_dict(quantized("int8").state_dict())
    with pytest.raises(ValueError, match="cannot load"):
        quantized("int8").load_state_dict(quantized("int4").state_dict(), strict=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_lowbit_file_round_trips_into_a_float_model(fmt, dtype, rng, tmp_path):
    model = quantized(fmt, dtype)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    lbt.save(model, tmp_path / "m.lowbit")
    assert isinstance(lb.load(tmp_path / "m.lowbit")["2.0.weight"], lb.QuantizedWeight)
    fresh = lbt.load(tmp_path / "m.lowbit", small_model(seed=1).to(dtype))
    assert isinstance(fresh[2][0], lbt.LowbitLinear)
    assert torch.equal(run(fresh, x, dtype), run(model, x, dtype))
    with pytest.raises(ValueError, match="missing"):
        lbt.load(tmp_path / "m.lowbit", torch.nn.Sequential(small_model(), torch.nn.Linear(2, 2)))


def save_shards(state, folder, n=2):
    """`state` as save_pretrained shards it: model-0000i-of-0000n.safetensors and their index."""
    st = pytest.importorskip("safetensors.torch")
    folder.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i * len(keys) // n:(i + 1) * len(keys) // n]
        st.save_file({k: state[k].contiguous() for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_safetensors_state_loads_into_a_float_model(fmt, dtype, rng, tmp_path):
    """The state as state_dict() holds it, every value a tensor (the settings too), so that
    safetensors' save_model and Hugging Face's save_pretrained store it; lbt.load reads it into
    a float model from a file, or from a folder of shards with their index."""
    st = pytest.importorskip("safetensors.torch")
    model = quantized(fmt, dtype)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    st.save_model(model, tmp_path / "m.safetensors")
    fresh = lbt.load(tmp_path / "m.safetensors", small_model(seed=1).to(dtype))
    assert isinstance(fresh[2][0], lbt.LowbitLinear) and repr(fresh) == repr(model)
    assert torch.equal(run(fresh, x, dtype), run(model, x, dtype))
    save_shards(model.state_dict(), tmp_path / "saved")
    fresh = lbt.load(tmp_path / "saved", small_model(seed=2).to(dtype))
    assert torch.equal(run(fresh, x, dtype), run(model, x, dtype))
    same = quantized(fmt, dtype, seed=3)  # another model of the same structure: safetensors' own
    st.load_model(same, tmp_path / "m.safetensors")
    assert torch.equal(run(same, x, dtype), run(model, x, dtype))


def test_a_module_under_two_names_saves_once_in_safetensors(rng, tmp_path):
    """save_model writes shared tensors once: the settings tensor is shared as the buffers are."""
    st = pytest.importorskip("safetensors.torch")
    lin = torch.nn.Linear(64, 64)
    model = lbt.quantize_model(torch.nn.Sequential(lin, torch.nn.ReLU(), lin), bits=4,
                               group_size=32)
    st.save_model(model, tmp_path / "m.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    fresh.append(fresh[0])
    fresh = lbt.load(tmp_path / "m.safetensors", fresh)
    assert fresh[0] is fresh[2]
    x = rng.normal(size=(2, 64)).astype(np.float32)
    assert torch.equal(run(fresh, x), run(model, x))


def test_corrupt_safetensors_state_raises(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    state = quantized("int4").state_dict()
    cases = {"settings": {"0._extra_state": torch.tensor(list(b"{not json"), dtype=torch.uint8)},
             "width": {"0.weight_scales": state["0.weight_scales"].view(torch.uint8)},
             "shape": {"0.weight_packed": state["0.weight_packed"][:-16]},
             "missing": {"0.weight_scales": None},
             "unlisted": {"0.weight_in_scale": torch.ones(64)},
             "no settings": {"0._extra_state": None}}  # (never a float layer left random)
    for case, change in cases.items():
        bad = {k: v for k, v in {**state, **change}.items() if v is not None}
        st.save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / f"{case}.safetensors")
        with pytest.raises(lb.FormatError, match="0._extra_state|0.weight"):
            lbt.load(tmp_path / f"{case}.safetensors", small_model())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        lbt.load(tmp_path, small_model())
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(lb.FormatError, match="not a safetensors or lowbit file.*torch.load"):
        lbt.load(tmp_path / "state.pt", small_model())
    save_shards(state, tmp_path / "saved")
    index = tmp_path / "saved" / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-00001", "../model-00001"))
    with pytest.raises(lb.FormatError, match="not a file name"):
        lbt.load(tmp_path / "saved", small_model())


def test_hugging_face_save_pretrained_and_from_pretrained(rng, tmp_path):
    """A transformers model quantized by lowbit.torch: save_pretrained writes its layers' state
    and quant_method "lowbit" in config.json; from_pretrained (lowbit.torch imported) rebuilds
    the LowbitLinears, bit for bit, and so does lbt.load into a float model. A tied lm_head,
    quantized while the embedding stays float, saves and loads too."""
    transformers = pytest.importorskip("transformers", minversion="5")
    ids = torch.from_numpy(rng.integers(0, 64, size=(2, 12)))
    bert = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=128, tie_word_embeddings=True)
    for config, cls, out in [(bert, transformers.BertModel, "last_hidden_state"),
                             (llama, transformers.LlamaForCausalLM, "logits")]:
        folder = tmp_path / config.model_type
        torch.manual_seed(0)
        model = lbt.quantize_model(cls(config).eval(), bits=4, group_size=32)
        assert model.config.quantization_config == {"quant_method": "lowbit"}
        model.save_pretrained(folder, max_shard_size="100KB")
        assert json.loads((folder / "config.json").read_text())["quantization_config"] == {
            "quant_method": "lowbit"}
        with torch.inference_mode():
            expected = getattr(model(input_ids=ids), out)
        torch.manual_seed(1)
        loaded = [cls.from_pretrained(folder).eval(), lbt.load(folder, cls(config).eval())]
        loaded[0].save_pretrained(tmp_path / "again")  # (a loaded model saves as it came)
        loaded.append(cls.from_pretrained(tmp_path / "again").eval())
        for m in loaded:
            assert isinstance(m.get_submodule("lm_head" if out == "logits" else
                                              "encoder.layer.1.output.dense"), lbt.LowbitLinear)
            with torch.inference_mode():
                assert torch.equal(getattr(m(input_ids=ids), out), expected)
        shutil.rmtree(tmp_path / "again")


def test_from_pretrained_beyond_the_plain_case(rng, tmp_path):
    """T5 (whose weight init reaches into child layers' weights), a block-format layer (no packed
    part), a head class's checkpoint loaded as the base model (its head layer left to
    transformers' report), GPT-2's Conv1D layers, a wrapper's inner model (its config marked),
    and the loaded model pickles (the registered classes are module-level)."""
    transformers = pytest.importorskip("transformers", minversion="5")
    ids = torch.from_numpy(rng.integers(0, 64, size=(1, 7)))
    t5 = transformers.T5Config(vocab_size=64, d_model=64, d_kv=32, d_ff=128, num_layers=1,
                               num_heads=2, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = lbt.quantize_model(transformers.T5ForConditionalGeneration(t5).eval(), bits=8)
    model.save_pretrained(tmp_path / "t5")
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids, decoder_input_ids=ids).logits,
                           model(input_ids=ids, decoder_input_ids=ids).logits)
    pickle.loads(pickle.dumps(loaded))

    bert = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=256)
    torch.manual_seed(1)
    mlm = lbt.quantize_model(transformers.BertForMaskedLM(bert).eval(), bits=4, group_size=32)
    q4_k = block_weight("Q4_K", 64, 1, rng)  # 64 x 256, as a GGUF file's layer would come
    mlm.bert.encoder.layer[0].output.dense = lbt.LowbitLinear(lb.Linear(q4_k, np.zeros(64, "f4")))
    mlm.save_pretrained(tmp_path / "mlm")
    base = transformers.BertModel.from_pretrained(tmp_path / "mlm").eval()
    with torch.inference_mode():
        assert torch.equal(base(input_ids=ids).last_hidden_state,
                           mlm.bert(input_ids=ids).last_hidden_state)

    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(gpt2).eval()  # Conv1D layers: x @ W + b, W (in, out)
    c_fc = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    expected = lbt.LowbitLinear(lb.Linear(c_fc.weight.detach().numpy().T.copy(),
                                          c_fc.bias.detach().numpy()))(x)
    with torch.inference_mode():
        y = model(input_ids=ids).logits
    lbt.quantize_model(model, bits=8)
    assert isinstance(model.transformer.h[0].mlp.c_fc, lbt.LowbitLinear)
    assert torch.equal(model.transformer.h[0].mlp.c_fc(x), expected)
    with torch.inference_mode():
        q = model(input_ids=ids).logits
    assert (q - y).norm() / y.norm() < 0.05
    model.save_pretrained(tmp_path / "gpt2")
    with torch.inference_mode():
        assert torch.equal(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")(
            input_ids=ids).logits, q)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.BertModel(bert)
    wrapped = lbt.quantize_model(Wrapper(), bits=8)
    assert wrapped.lm.config.quantization_config == {"quant_method": "lowbit"}


def test_lowbit_registers_with_transformers_imported_first(tmp_path):
    """Imported before transformers, lowbit.torch registers its method when transformers loads
    its quantizer table, without importing transformers; imported after, at once."""
    pytest.importorskip("transformers", minversion="5")
    after = ("import transformers.quantizers.auto as auto\n"
             "assert 'lowbit' not in auto.AUTO_QUANTIZER_MAPPING\n"
             "import lowbit.torch\n"
             "assert 'lowbit' in auto.AUTO_QUANTIZER_MAPPING\n")
    before = ("import sys, lowbit.torch\n"
              "assert 'transformers' not in sys.modules\n"
              "import transformers.quantizers.auto as auto\n"
              "assert 'lowbit' in auto.AUTO_QUANTIZER_MAPPING\n")
    for code in (after, before):
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_a_numpy_lowbit_file_loads_into_the_torch_model(rng, tmp_path):
    float_model = small_model()
    tensors = {}
    for name, m in float_model.named_modules():
        if isinstance(m, torch.nn.Linear):
            tensors[name + ".weight"] = lb.quantize(m.weight.detach().numpy(), bits=4, group_size=32)
            if m.bias is not None:
                tensors[name + ".bias"] = m.bias.detach().numpy()
    lb.save(tmp_path / "q.lowbit", tensors)
    model = lbt.load(tmp_path / "q.lowbit", small_model(seed=3))
    x = rng.normal(size=(4, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x).numpy(),
                                  numpy_path(float_model, x, bits=4, group_size=32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_models_of_every_float_dtype(dtype, rng):
    x = rng.normal(size=(4, 64)).astype(np.float32)
    ref = run(small_model(), x)
    y = run(quantized("int4", dtype), x, dtype)
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_traced_and_exported_graphs_hold_the_op(rng):
    model = quantized("int4")
    x = torch.from_numpy(rng.normal(size=(4, 64)).astype(np.float32))
    traced = torch.jit.trace(model, x)
    assert "lowbit::linear" in str(traced.inlined_graph)
    x2 = torch.from_numpy(rng.normal(size=(4, 64)).astype(np.float32))
    assert torch.equal(traced(x2), model(x2))  # not the first output recorded as a constant
    exported = torch.export.export(model, (x,))
    assert "lowbit.linear" in str(exported.graph)
    assert torch.equal(exported.module()(x2), model(x2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_fullgraph_bit_identical_to_eager(dtype, rng):
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    model = quantized("int8", dtype)
    x = torch.from_numpy(rng.normal(size=(2, 5, 64)).astype(np.float32)).to(dtype)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # no C++ toolchain needed
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_gptq_int4_through_quantize_model_uses_each_layers_inputs_in_order(rng):
    batches = calibration_batches(8)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    ref = run(small_model(), x)
    seen = []
    model = small_model()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__name__))
    lbt.quantize_model(model, bits=4, group_size=32, method="gptq", calibration=batches)
    # a first capture of the float model, then one run per later layer: the layers before it quantized
    assert seen[:3 * 8] == ["Linear"] * (3 * 8)
    gptq = run(model, x)
    rtn = run(lbt.quantize_model(small_model(), bits=4, group_size=32), x)
    err = lambda y: float(((y - ref) ** 2).mean() / (ref ** 2).mean())  # noqa: E731
    assert err(gptq) < 0.02 and err(gptq) < 1.5 * err(rtn)
    inputs = lbt.capture_inputs(small_model(), batches)
    assert list(inputs) == ["0", "2.0", "3"] and inputs["2.0"].shape == (8 * 32, 96)
    with pytest.raises(ValueError, match="need calibration"):
        lbt.quantize_model(small_model(), bits=4, group_size=32, method="gptq")
    partly_used = small_model()
    partly_used.forward = lambda x: partly_used[0](x)  # the other layers never run
    with pytest.raises(ValueError, match="never ran"):
        lbt.quantize_model(partly_used, method="mse", calibration=batches[:1])


@pytest.mark.parametrize("choose, expected", [("", "1"), ("lb.set_num_threads(3); ", "3")])
def test_lowbit_layers_follow_torchs_thread_count_unless_chosen(choose, expected):
    import os
    import subprocess
    import sys

    code = ("import torch, lowbit as lb, lowbit.torch as lbt; " + choose +
            "torch.set_num_threads(1); m = lbt.quantize_model(torch.nn.Linear(64, 8)); "
            "m(torch.ones(2, 64)); print(lb.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.stdout.split()[-1:] == [expected], out.stderr


def test_inductor_compiles_the_op_bit_identical_to_eager(rng):
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    # ReLU, not GELU: inductor's own GELU code rounds differently from eager's
    model = lbt.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(),
                                                   torch.nn.Linear(96, 10)), bits=4, group_size=32)
    x = torch.from_numpy(rng.normal(size=(3, 5, 64)).astype(np.float32))
    try:
        with torch.no_grad():
            y = torch.compile(model, fullgraph=True)(x)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ toolchain for inductor here
        pytest.skip(f"inductor unavailable: {e}")
    assert torch.equal(y, model(x))


def _torch_openmp():
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP here")
    path = lb.cpu_info()["threads"]
    assert path != "lowbit" and "omp" in path, path  # import lowbit.torch chose torch's runtime
    return path


def _parallel_layers(rng):
    """Layers big enough to split over threads: int8, int4, a block format."""
    from test_processes import block_weight

    w = rng.normal(size=(1024, 512)).astype(np.float32)
    return [lb.Linear(w), lb.Linear(w, bits=4, group_size=32, symmetric=False),
            lb.Linear(block_weight("Q4_K", 1024, 512, rng))]


def test_kernels_run_on_torchs_openmp_threads_bit_identical_to_lowbits_pool(rng):
    path = _torch_openmp()
    x = rng.normal(size=(64, 512)).astype(np.float32)
    layers = _parallel_layers(rng)
    previous = lb.get_num_threads()
    try:
        want = [layer(x) for layer in layers]
        assert lb.runtime.use_openmp(None) == path  # back to lowbit's pool
        assert lb.cpu_info()["threads"] == "lowbit"
        for threads in (1, 2, 3):
            lb.set_num_threads(threads)
            for layer, y in zip(layers, want):
                np.testing.assert_array_equal(layer(x), y)
        assert lb.runtime.use_openmp(path) is None
        for threads in (1, 2, 3):
            lb.set_num_threads(threads)
            for layer, y in zip(layers, want):
                np.testing.assert_array_equal(layer(x), y)
    finally:
        lb.runtime.use_openmp(path)
        lb.set_num_threads(previous)


def test_python_threads_share_the_openmp_runtime(rng):
    from concurrent.futures import ThreadPoolExecutor

    _torch_openmp()
    x = rng.normal(size=(32, 512)).astype(np.float32)
    layers = _parallel_layers(rng)
    want = [layer(x) for layer in layers]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: layers[i % 3](x), range(24)))
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y, want[i % 3])


def test_use_openmp_refuses_what_is_not_a_loaded_openmp_runtime(tmp_path):
    with pytest.raises(ValueError, match="no OpenMP runtime loaded"):
        lb.runtime.use_openmp(tmp_path / "libgomp.so.1")
    with pytest.raises(ValueError, match="lacks GOMP_parallel"):
        lb.runtime.use_openmp(lb._core.__file__)  # loaded, but not an OpenMP runtime
    with pytest.raises(TypeError, match="expected a path or None"):
        lb.runtime.use_openmp(3)
    assert lb.runtime.loaded_openmp(under=tmp_path) == []


def _forked_run(args):
    model, x = args
    lb.set_num_threads(2)
    with torch.inference_mode():
        return model(x).numpy(), lb.cpu_info()["threads"]  # numpy: torch tensors pickle by fd


def test_a_forked_child_goes_back_to_lowbits_pool(rng):
    import multiprocessing as mp

    _torch_openmp()
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork here")
    model = lbt.quantize_model(torch.nn.Sequential(torch.nn.Linear(512, 1024)), bits=8)
    x = torch.from_numpy(rng.normal(size=(64, 512)).astype(np.float32))
    with torch.inference_mode():
        want = model(x)  # the parent's OpenMP team has run: a child must not wait on it
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_forked_run, [(model, x)] * 2).get(timeout=120)
    for y, threads in got:
        assert threads == "lowbit"
        np.testing.assert_array_equal(y, want.numpy())


def test_models_made_under_inference_mode_run_as_made_outside_it(rng):
    """Inference tensors have no version counter: the layers' cache must not need one."""
    x = torch.from_numpy(rng.normal(size=(5, 64)).astype(np.float32))
    ref = run(quantized("int4"), x.numpy())
    ref_half = run(quantized("int4").half(), x.numpy(), torch.float16)
    with torch.inference_mode():
        model = quantized("int4")
        assert model[0].weight_packed.is_inference()
        assert torch.equal(model(x), ref)
        half = pickle.loads(pickle.dumps(model)).half()  # buffers made again: inference tensors
        assert torch.equal(half(x.half()), ref_half)
        other = quantized("int4", seed=1)
        model.load_state_dict(other.state_dict())  # copied into inference tensors: no version
        assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("fmt,dtype", [("observer", torch.float32), ("int8", torch.float16)])
def test_untracked_writes_to_a_bias_the_kernel_converts_show(fmt, dtype, rng):
    """A float16 bias (converted for the kernel) or one carrying a static zero point's term is
    made again each call: a write through .data (no version moves) shows."""
    if fmt == "observer":  # asymmetric: a zero point
        model = lbt.quantize_model(small_model(),
                                   activations=lambda: lb.MinMaxObserver(symmetric=False),
                                   calibration=calibration_batches())
        assert model[0].layer.activations.zero_point != 0
    else:
        model = quantized(fmt, dtype)
    x = torch.from_numpy(rng.normal(size=(4, 64)).astype(np.float32)).to(dtype)
    with torch.inference_mode():
        before = model(x)
        model[0].bias.data.zero_()
        after = model(x)
        assert not torch.equal(before, after)
        assert torch.equal(after, pickle.loads(pickle.dumps(model))(x))  # as made afresh


def test_input_gradients_compile_as_they_run_eagerly(rng):
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    model = quantized("int8")
    x = torch.from_numpy(rng.normal(size=(3, 64)).astype(np.float32)).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    with torch.no_grad():
        assert torch.equal(y.detach(), model(x))
    y.sum().backward()
    eager = x.detach().clone().requires_grad_()
    model(eager).sum().backward()
    assert x.grad is not None and x.grad.any() and torch.equal(x.grad, eager.grad)


@pytest.mark.parametrize("fmt", [dict(bits=8), dict(bits=4, group_size=32),
                                 dict(bits=4, group_size=32, activations="float")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_the_input_and_a_bias_parameter(rng, fmt, dtype):
    """QLoRA's setting: what is trained before (or beside) a frozen quantized layer gets the
    gradient of x @ W.T + b with W as dequantize() gives it, straight through the activations'
    quantization; a bias made a Parameter gets its gradient; the weight's parts none."""
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(64, 16), **fmt)
    layer.bias = torch.nn.Parameter(layer.bias.clone())
    w = torch.from_numpy(layer.weight.dequantize())
    x = torch.from_numpy(rng.normal(size=(3, 5, 64)).astype(np.float32)).to(dtype).requires_grad_()
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same values as without autograd
    g = torch.from_numpy(rng.normal(size=y.shape).astype(np.float32)).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, (g.float() @ w).to(dtype))
    assert torch.equal(layer.bias.grad, g.reshape(-1, 16).sum(0).to(layer.bias.dtype))
    assert all(not t.requires_grad for t in layer._weights())
    adapter = torch.nn.Parameter(torch.zeros(64))  # trained before the frozen layer
    layer(torch.ones(2, 64) + adapter).sum().backward()
    assert torch.equal(adapter.grad, 2 * w.sum(0))


def test_a_fused_epilogue_refuses_to_pass_a_gradient(rng):
    qw = lb.quantize(rng.normal(size=(16, 64)).astype(np.float32))
    layer = lbt.LowbitLinear(lb.Linear(qw, np.zeros(16, np.float32), epilogue="gelu"))
    x = torch.ones(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="epilogue passes no gradient"):
        layer(x).sum().backward()
    layer.bias = torch.nn.Parameter(torch.zeros(16))  # the bias's gradient alone: GELU's too
    with pytest.raises(RuntimeError, match="epilogue passes no gradient"):
        layer(torch.ones(2, 64)).sum().backward()


def test_eval_mode_computes_without_autograd(tmp_path):
    """A Hugging Face model is in eval mode after from_pretrained and is often called without
    no_grad: its hidden states then need gradients (the float embeddings are Parameters), and the
    layers must keep inference's cached path, not build autograd nodes."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).eval()
    lbt.quantize_model(model, bits=8)
    assert not any(m.training for m in model)
    x = torch.randn(2, 64, requires_grad=True)
    y = model(x)
    assert not y.requires_grad
    model.train()
    assert model(x).requires_grad
    lbt.save(model, tmp_path / "m.lowbit")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8)).eval()
    assert not lbt.load(tmp_path / "m.lowbit", fresh)[0].training  # load keeps the module's mode


def test_the_op_keeps_prepared_weights_only_while_its_tensors_live(rng):
    """torch.ops.lowbit.linear (what compiled and exported graphs call) keeps each weight's
    prepared form, without holding the tensors: a part replaced, written in place or freed is
    seen, and a freed model leaves nothing behind."""
    import gc
    import weakref
    from lowbit.torch import _OP_CACHE

    def call(layer, x):
        return torch.ops.lowbit.linear(x, layer._weights(), layer.bias, layer._spec)
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=32,
                                         activations="float")
    x = torch.from_numpy(rng.normal(size=(3, 64)).astype(np.float32))
    key = id(layer._weights()[0])  # (entries are per first part tensor)
    with torch.no_grad():
        assert key not in _OP_CACHE
        y = call(layer, x)
        assert torch.equal(y, layer(x)) and key in _OP_CACHE
        assert torch.equal(call(layer, x), y)  # (from the cache)
        saved = layer.weight_scales.clone()
        layer.weight_scales.zero_()  # in place: the kernels read the scales where they are
        assert torch.equal(call(layer, x), layer.bias.expand(3, 8))
        layer.weight_scales = saved  # another tensor
        assert torch.equal(call(layer, x), y)
    head = weakref.ref(layer._weights()[0])
    del layer
    gc.collect()
    assert head() is None and key not in _OP_CACHE


def test_load_refuses_two_weights_for_one_module(rng, tmp_path):
    lin = torch.nn.Linear(64, 64)
    arrays = {f"{n}.{p}": v for n in "ab" for p, v in
              (("weight", lb.quantize(rng.normal(size=(64, 64)).astype(np.float32))),
               ("bias", np.zeros(64, np.float32)))}
    lb.save(tmp_path / "two.lowbit", arrays)
    model = torch.nn.Module()
    model.a = model.b = lin
    with pytest.raises(ValueError, match="also holds under another name"):
        lbt.load(tmp_path / "two.lowbit", model)
    assert model.a is lin and model.b is lin


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 64)
        self.b = self.a
        self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        h = self.b(self.a(x))
        return self.attn(h, h, h)[0]


def test_tied_linears_replaced_under_each_name_and_attention_projection_left_float(rng):
    model = lbt.quantize_model(Tied())
    assert isinstance(model.a, lbt.LowbitLinear) and model.a is model.b
    assert type(model.attn.out_proj) is not lbt.LowbitLinear  # MultiheadAttention reads it itself
    x = torch.from_numpy(rng.normal(size=(2, 3, 64)).astype(np.float32))
    with torch.no_grad():
        assert model(x).shape == (2, 3, 64)


def test_gptq_calibration_from_a_generator_and_inputs_by_keyword(rng):
    batches = calibration_batches()
    model = lbt.quantize_model(small_model(), bits=4, group_size=32, method="gptq",
                               calibration=(b for b in batches))  # runs more than once
    expected = lbt.quantize_model(small_model(), bits=4, group_size=32, method="gptq",
                                  calibration=batches)
    x = torch.from_numpy(rng.normal(size=(4, 64)).astype(np.float32))
    assert torch.equal(run(model, x.numpy()), run(expected, x.numpy()))

    class ByKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.lin(input=x)  # nn.Linear's own name for it
    m = lbt.quantize_model(ByKeyword(), method="mse", calibration=batches)
    assert m(x).shape == (4, 8)


def test_loading_settings_of_other_part_dtypes_raises():
    layer = quantized("int4")[0]
    state = layer.get_extra_state()
    assert state.dtype == torch.uint8 and state.dim() == 1  # (safetensors stores only tensors)
    layer.set_extra_state(state)  # the same settings load
    spec = json.loads(bytes(state.numpy()))
    layer.set_extra_state(spec)  # and as a dict, as lowbit wrote them before
    spec["parts"] = [[p, "<i2" if p == "mins" else dt] for p, dt in spec["parts"]]
    with pytest.raises(ValueError, match="cannot load"):
        layer.set_extra_state(spec)


def test_a_pickle_without_buffer_names_still_runs(rng):
    model = quantized("int8")
    del model[0].__dict__["_buffer_names"]  # as a model pickled by an earlier lowbit holds it
    copy = pickle.loads(pickle.dumps(model))
    x = rng.normal(size=(2, 64)).astype(np.float32)
    assert torch.equal(run(copy, x), run(quantized("int8"), x))


def test_load_fills_a_buffer_the_model_keeps_out_of_its_state(rng, tmp_path):
    class WithPositions(torch.nn.Module):  # as transformers' BERT keeps position_ids
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 8)
            self.register_buffer("pos", torch.zeros(5, dtype=torch.int64), persistent=False)

        def forward(self, x):
            return self.lin(x)
    m = WithPositions()
    lb.save(tmp_path / "m.lowbit", {"lin.weight": lb.quantize(m.lin.weight.detach().numpy()),
                                    "lin.bias": m.lin.bias.detach().numpy(),
                                    "pos": np.arange(5)})
    fresh = lbt.load(tmp_path / "m.lowbit", WithPositions())
    assert fresh.pos.tolist() == [0, 1, 2, 3, 4]
    lb.save(tmp_path / "bad.lowbit", {"lin.weight": lb.quantize(m.lin.weight.detach().numpy()),
                                      "lin.bias": m.lin.bias.detach().numpy(),
                                      "pos": np.arange(6)})
    with pytest.raises(ValueError, match="pos"):
        lbt.load(tmp_path / "bad.lowbit", WithPositions())


@pytest.mark.parametrize("bad", ["shape", "key", "norm"])
def test_a_file_that_does_not_fit_leaves_the_model_as_it_was(tmp_path, bad):
    """load checks everything before it replaces a module: an error half way left a model of
    LowbitLinears and float Linears."""
    def model(out=32):
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, out))
    lbt.save(lbt.quantize_model(model(), bits=4, group_size=32), tmp_path / "q.lowbit")
    if bad == "key":
        arrays = dict(lb.load(tmp_path / "q.lowbit"))
        arrays["extra"] = np.ones(2, np.float32)
        lb.save(tmp_path / "q.lowbit", arrays)
    target = model(16 if bad == "shape" else 32)
    if bad == "norm":
        target[1] = torch.nn.LayerNorm(32)  # a float parameter of another shape
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match={"shape": "does not fit", "key": "unexpected",
                                          "norm": "1.weight: shape"}[bad]):
        lbt.load(tmp_path / "q.lowbit", target)
    assert [type(m) for m in target] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_takes_one_name_of_a_tied_tensor(rng, tmp_path):
    """Hugging Face's tied embeddings: lm_head.weight is embed_tokens.weight, save_pretrained (and
    so `lowbit quantize`) writes one name, state_dict lists both: one name in the file loads it."""
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(96, 64)
            self.body = torch.nn.Linear(64, 64)
            self.head = torch.nn.Linear(64, 96, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))
    m = Tied()
    emb = lb.quantize(m.emb.weight.detach().numpy(), bits=8)
    lb.save(tmp_path / "q.lowbit", {"emb.weight": emb, "body.weight": lb.quantize(m.body.weight.detach().numpy()),
                                    "body.bias": m.body.bias.detach().numpy()})
    fresh = lbt.load(tmp_path / "q.lowbit", Tied())
    assert isinstance(fresh.body, lbt.LowbitLinear) and fresh.head.weight is fresh.emb.weight
    np.testing.assert_array_equal(fresh.emb.weight.detach().numpy(), emb.dequantize())
    assert fresh(torch.tensor([[1, 2, 3]])).shape == (1, 3, 96)
    lb.save(tmp_path / "none.lowbit", {"body.weight": lb.quantize(m.body.weight.detach().numpy()),
                                       "body.bias": m.body.bias.detach().numpy()})
    with pytest.raises(ValueError, match=r"missing \['emb.weight', 'head.weight'\]"):
        lbt.load(tmp_path / "none.lowbit", Tied())


def test_a_bias_made_a_parameter_is_used(rng):
    """BitFit-style tooling makes the bias a Parameter (nn.Module moves it out of the buffers)."""
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(64, 8))
    x = torch.from_numpy(rng.normal(size=(2, 64)).astype(np.float32))
    layer.bias = torch.nn.Parameter(torch.arange(8, dtype=torch.float32))
    expect = lb.Linear(layer.weight, np.arange(8, dtype=np.float32))(x.numpy())
    np.testing.assert_array_equal(layer(x).detach().numpy(), expect)
    with torch.no_grad():
        layer.bias.add_(1)
    expect = lb.Linear(layer.weight, np.arange(1, 9, dtype=np.float32))(x.numpy())
    np.testing.assert_array_equal(layer(x).detach().numpy(), expect)


def test_a_lazily_negated_input_is_read_negated(rng):
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(64, 8))
    z = torch.complex(torch.randn(2, 64), torch.randn(2, 64))
    x = z.conj().imag  # -z.imag, as a view with the negative bit set
    assert x.is_neg()
    assert torch.equal(layer(x), layer(-z.imag))


def test_vmap_over_the_input_rows():
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(64, 8))
    x = torch.randn(4, 3, 64)
    assert torch.equal(torch.func.vmap(layer)(x), layer(x))
    assert torch.equal(torch.func.vmap(layer, in_dims=1)(x), layer(x.transpose(0, 1)))
    assert torch.equal(torch.func.vmap(torch.func.vmap(layer))(x), layer(x))


def test_quantize_model_that_fails_leaves_the_model_float():
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8))
    with pytest.raises(ValueError, match="1: group_size"):  # the second layer's K = 48
        lbt.quantize_model(model, bits=4, group_size=32)
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Linear]


def test_a_linear_under_two_names_saves_once_and_loads_tied(tmp_path):
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 64)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))
    q = lbt.quantize_model(Shared(), bits=8)
    lbt.save(q, tmp_path / "q.lowbit")
    assert sorted(lb.load(tmp_path / "q.lowbit")) == ["a.bias", "a.weight"]
    fresh = lbt.load(tmp_path / "q.lowbit", Shared())
    assert isinstance(fresh.a, lbt.LowbitLinear) and fresh.b is fresh.a
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("mode", ["enable_grad", "no_grad", "inference_mode"])
def test_torch_transformer_encoders_take_their_general_path(mode):
    """nn.TransformerEncoderLayer / TransformerEncoder in eval mode gather their Linears'
    .weight for a fused fast path: with LowbitLinears there they must take the general path
    (which calls the layers), not read .device off a QuantizedWeight."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    stack = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True),
                                        2, enable_nested_tensor=True).eval()
    x = torch.randn(2, 5, 64)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expect = [layer(x), stack(x, src_key_padding_mask=pad)]
    lbt.quantize_model(layer, bits=8)
    lbt.quantize_model(stack, bits=8)
    with getattr(torch, mode)():
        got = [layer(x), stack(x, src_key_padding_mask=pad)]
    for g, e in zip(got, expect):
        assert not g.is_nested and g.shape == (2, 5, 64)
        g = g.detach()
        assert (g[0] - e[0]).abs().max() < 0.05  # int8 against float32
    assert (got[0].detach()[1] - expect[0][1]).abs().max() < 0.05


def test_writes_reach_layers_whose_buffers_the_kernels_cannot_read_in_place(rng):
    """A strided bias or a part of another layout is copied for the kernels: writes to it must
    still show (tracked by versions), as must writes into inference tensors a static zero
    point's term is derived from (made again every call)."""
    x = torch.from_numpy(rng.normal(size=(3, 64)).astype(np.float32))
    model = quantized("int8")
    with torch.no_grad():
        model[0].bias = torch.zeros(2 * 96)[::2]  # a strided view
        before = model[0](x)
        model[0].bias.add_(1)
        assert torch.allclose(model[0](x), before + 1, rtol=0, atol=1e-6)  # (fma(f, s, 1) rounds once)
        assert torch.equal(model(x), pickle.loads(pickle.dumps(model))(x))
        buf = torch.arange(2 * 96, dtype=torch.float32)
        model[0].bias = buf[:96]
        model[0](x)
        model[0].bias = buf[::2]  # the same address, another layout
        assert torch.equal(model[0](x), pickle.loads(pickle.dumps(model[0]))(x))
    with torch.inference_mode():
        zp = lbt.quantize_model(small_model(), activations=lambda: lb.MinMaxObserver(symmetric=False),
                                calibration=calibration_batches())
        assert zp[0].weight_scales.is_inference()
        zp(x)
        zp[0].weight_scales.view(torch.float32).mul_(2)  # in place, no version: the term follows
        assert torch.equal(zp(x), pickle.loads(pickle.dumps(zp))(x))


def test_a_state_of_another_group_size_is_refused_before_any_buffer_is_copied(rng):
    """torch copies the buffers whose shapes fit (the packed values here) before it calls
    set_extra_state: the weight's kind is checked first, so a refused state changes nothing."""
    layer = lbt.LowbitLinear.from_linear(torch.nn.Linear(128, 16), bits=4, group_size=32)
    other = lbt.LowbitLinear.from_linear(torch.nn.Linear(128, 16), bits=4, group_size=64)
    x = torch.from_numpy(rng.normal(size=(2, 128)).astype(np.float32))
    before = layer(x)
    with pytest.raises(ValueError, match="group_size=64"):
        layer.load_state_dict(other.state_dict())
    assert "group_size=32" in repr(layer)
    assert torch.equal(layer(x), before)
