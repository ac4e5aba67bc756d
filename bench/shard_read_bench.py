"""Does reading batches from a prepared corpus keep the train step busy? Measured in one run.

For a corpus `scaling prepare --out` wrote to a local folder, it measures
  (a) with --emulator: the upload of every shard into a bucket served by gcp-storage-emulator
      (GCS's JSON API on this machine), and then reads through that API, as a pod host does;
  (b) the loader (`launch.data.train_batch` over the manifest's shards, the trainer's own
      function) with 1 and 4 reader processes (--readers), each reading its rows of the same
      global batches, as the hosts of a slice do: tokens/s delivered, all readers together;
  (c) the trainer's own train step at the same batch shape (--d-model, n_layer by --aspect,
      the manifest's vocabulary), so the two rates stand side by side.

    python bench/shard_read_bench.py --manifest /data/kernel-shards --emulator
    python bench/shard_read_bench.py --manifest gs://bucket/corpus --readers 1,4,8

The emulator serves one request at a time, so its figures bound from below what GCS, which
serves many at once, gives the same readers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import socket
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # the emulator lacks gRPC


def _read(manifest: str, threads: int, p: int, readers: int, steps: int, batch: int, ctx: int):
    """One reader process: its rows of global batches 0..steps-1; (tokens, seconds)."""
    from launch import data

    cfg = data.default_data_config()
    cfg.manifest, cfg.read_threads = manifest, threads
    cfg.cache_dir = tempfile.mkdtemp()
    corpus = data.prepare_corpus(cfg, 1 << 20, progress=False)
    data.train_batch(corpus.train, steps, batch, ctx, 0, p, readers)  # connections warm
    started = time.perf_counter()
    tokens = 0
    for step in range(steps):
        tokens += data.train_batch(corpus.train, step, batch, ctx, 0, p, readers).size
    return tokens, time.perf_counter() - started


def loader_tokens_per_s(manifest, threads, readers, steps, batch, ctx) -> float:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(readers, mp_context=context) as pool:
        jobs = [
            pool.submit(_read, manifest, threads, p, readers, steps, batch, ctx)
            for p in range(readers)
        ]
        results = [j.result() for j in jobs]
    return sum(t for t, _ in results) / max(s for _, s in results)


def serve(folder: str):
    """An emulator over a fresh folder, the corpus at folder's name in it; (server, gs path)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, default_bucket="bench", data_dir=tempfile.mkdtemp())
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    import fsspec

    fs = fsspec.filesystem("gs")
    started = time.perf_counter()
    size = 0
    for path in sorted(pathlib.Path(folder).iterdir()):
        fs.put_file(str(path), f"bench/corpus/{path.name}")
        size += path.stat().st_size
    seconds = time.perf_counter() - started
    print(f"uploaded {size / 1e6:,.0f} MB in {seconds:.1f} s ({size / 1e6 / seconds:,.0f} MB/s)")
    return server, "gs://bench/corpus"


def trainer_tokens_per_s(d_model: int, aspect: int, vocab: int, ctx: int, batch: int) -> float:
    from train_bench import loop_step_seconds

    from models.sizes import ModelShape

    shape = ModelShape(
        n_layer=max(1, d_model // aspect),
        d_model=d_model,
        n_heads=max(1, d_model // 64),
        n_ctx=ctx,
        vocab_size=vocab,
    )
    return batch * ctx / loop_step_seconds(shape, batch, 3, {})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="a prepared corpus (folder or gs://)")
    parser.add_argument("--emulator", action="store_true", help="serve it through the emulator")
    parser.add_argument("--readers", default="1,4", help="reader processes, comma-separated")
    parser.add_argument("--threads", type=int, default=4, help="data.read_threads per reader")
    parser.add_argument("--batch", type=int, default=32, help="sequences per global batch")
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-model", type=int, default=128, help="the trainer's width (0: skip)")
    parser.add_argument("--aspect", type=int, default=64, help="d_model / n_layer")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    manifest, server = args.manifest, None
    info = json.loads(pathlib.Path(args.manifest, "manifest.json").read_text())
    if args.emulator:
        server, manifest = serve(args.manifest)
    results = {"manifest": args.manifest, "emulator": args.emulator, "batch": args.batch}
    results["n_ctx"], results["loader"] = args.n_ctx, {}
    try:
        for readers in [int(r) for r in args.readers.split(",")]:
            rate = loader_tokens_per_s(
                manifest, args.threads, readers, args.steps, args.batch, args.n_ctx
            )
            results["loader"][readers] = rate
            print(f"{readers} reader process(es): {rate:,.0f} tokens/s read")
    finally:
        if server:
            server.stop()
    if args.d_model:
        vocab = info["tokenizer"]["vocab_size"]
        rate = trainer_tokens_per_s(args.d_model, args.aspect, vocab, args.n_ctx, args.batch)
        results["trainer_tokens_per_s"] = rate
        print(f"trainer step, d_model {args.d_model}, vocab {vocab}: {rate:,.0f} tokens/s")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
