"""Embed a corpus with all-MiniLM-L6-v2 on lowbit over a local Dask cluster of worker processes.

    pip install "dask[distributed]"
    python examples/embed_corpus.py [--sentences FILE] [--workers 2] [--mode int8] [--chunk 64]

The model (examples/minilm.py) is quantized once, in this process, and sent to every worker by
value (lowbit weights and layers pickle with their packed arrays; no worker re-quantizes). Each
worker process runs lowbit on one thread (``lb.set_num_threads(1)`` on every worker: processes,
not threads, share the cores), encodes chunks of the corpus, and the chunks come back in order.
The embeddings are bit for bit those of one process encoding the same chunks, which this script
checks (``--check``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402  (examples/minilm.py)

import lowbit as lb  # noqa: E402


def chunks(sentences, size):
    return [sentences[i:i + size] for i in range(0, len(sentences), size)]


def encode_chunk(model, sentences):
    return model.encode(sentences)


def embed(sentences, model, workers=2, chunk=64):
    """float32 (len(sentences), hidden): `model` (a minilm.MiniLM) run over `workers` local worker
    processes, `chunk` sentences per task."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lb.set_num_threads, 1)
        shared = client.scatter(model, broadcast=True)  # one pickled copy per worker
        futures = client.map(encode_chunk, [shared] * len(chunks(sentences, chunk)),
                             chunks(sentences, chunk), pure=False)
        return np.concatenate(client.gather(futures))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", default=str(minilm.DEFAULT_SENTENCES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", default="int8", choices=minilm.MODES)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="compare with one process")
    args = ap.parse_args(argv)
    sentences = minilm.read_sentences(args.sentences)
    model = minilm.MiniLM(mode=args.mode, threads=1)
    t0 = time.perf_counter()
    emb = embed(sentences, model, args.workers, args.chunk)
    print(f"{len(sentences)} sentences -> {emb.shape} on {args.workers} workers in "
          f"{time.perf_counter() - t0:.2f} s (cluster start included)")
    if args.check:
        lb.set_num_threads(1)
        one = np.concatenate([model.encode(c) for c in chunks(sentences, args.chunk)])
        print("identical to one process:", np.array_equal(emb, one))


if __name__ == "__main__":
    main()
