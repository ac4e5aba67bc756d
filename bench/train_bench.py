"""How close the trainer runs to this machine's limit, measured side by side in one run.

In one process it measures
  (a) the matmul peak: a jitted square matmul big enough to saturate the
      machine, float32 (and bfloat16 on an accelerator), in FLOP/s;
  (b) for each size of a ladder at one aspect ratio and context, the
      trainer's own jitted train step (launch/steps.py, the same function a
      sweep runs) after compile: step time, tokens/s, and MFU = achieved
      model FLOP/s / measured peak, with model FLOPs per token
      6 N + 6 n_layer n_ctx d_model (Kaplan's count, what the store logs),
      and `microbatches`, the parts it takes a batch in (--microbatches;
      0 chooses as `scaling run` would in this process);
  (c) the compile time of each size's train steps (with and without the
      noise scale: a run compiles both), with the persistent compilation
      cache off so the figure is a real compile;
  (d) the per-token eval: its step time against a plain mean-loss eval of
      the same batch (`eval_overhead` = per-token / plain) and against a
      train step (`eval_vs_train`);
  (e) what measuring the gradient noise scale costs: the train step as a
      sweep runs it (measuring on every train.noise_scale_every-th step)
      against the same step without (`noise_scale_cost`, a fraction), and a
      step that measures against one that does not (`noise_step_cost`);
  (f) where PyTorch is installed (`pip install -e '.[bench]'`, or another
      interpreter given by --torch-python), a PyTorch train step of the same
      shape (bench/torch_peer.py), run right after ours: `torch_tokens_per_s`
      and `vs_torch` (ours / PyTorch's);
  (g) with --pair, both cores busy as a sweep keeps them (launch.parallel):
      two copies of our step at once, each pinned to a core, against two
      PyTorch steps pinned likewise, in --pair-rounds alternated rounds
      (`pair_tokens_per_s` and `torch_pair_tokens_per_s`, together, the
      median round; `pair_vs_torch_pair`, the median of the rounds' ratios,
      and its range; `pair_vs_torch`, our pair against PyTorch's one process;
      `pair_microbatches`, the microbatches a worker on one core takes its batch in);
  (h) the trainer end to end (`scaling run`, --e2e-steps steps on the real
      corpus, its logged tokens/s over the last eval window) beside the bare
      step, so the loop's own cost shows (`e2e_tokens_per_s`, `e2e_vs_step`).

    python bench/train_bench.py                       # CPU ladder 128, 256, 512
    python bench/train_bench.py --study experiments/local_cpu.py --pair   # the local sweep's sizes
    python bench/train_bench.py --out bench.json      # also write the rows as JSON
    python bench/train_bench.py --dtype bfloat16 --d-models 512,1024,2048 --batch 64 --n-ctx 1024

Everything is measured in the same run, so the ratios hold on this machine
whatever its CPU; absolute figures differ between machines of one type.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from launch import steps  # noqa: E402
from launch.config import base_config, load_study, study_sweep  # noqa: E402
from launch.host_devices import one_device_per_core  # noqa: E402
from launch.host_memory import keep_freed_memory  # noqa: E402
from launch.peak import matmul_peak_flops  # noqa: E402
from models import sharding  # noqa: E402
from models.sizes import ModelShape  # noqa: E402
from models.transformer import ModelConfig  # noqa: E402
from scaling.store import Store  # noqa: E402


def _optimizer_config(total_steps: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=total_steps,
            learning_rate=1e-3,
            warmup_steps=2,
            final_lr_fraction=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
        )
    )


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(dtype: str, size: int) -> float:
    return matmul_peak_flops.__wrapped__(dtype, size)  # measured afresh, not the cached value


def plain_eval_step(params, tokens_BxL1, apply_fn, spread=None):
    """The mean loss of the batch only: what an eval that logs no per-token vector costs
    (spread over the devices as the per-token eval is: `steps.on_each_device`)."""

    def mean_loss(params, tokens_BxL1):
        return steps.per_token_loss(params, apply_fn, tokens_BxL1).mean()

    return steps.on_each_device(mean_loss, spread)(params, tokens_BxL1)


def _steady_step_times(steps_to_time, state, batches, repeats: int):
    """Median seconds per step of each step(state, batch, i) -> (state,
    metrics), over blocks of donated steps run back to back as the loop runs
    them (dispatch overlaps compute); i is the step's index in its block.

    The steps take turns, block by block, so a slowdown of a shared machine
    falls on all of them alike and their ratio holds.  Returns (seconds per
    step, one per step function; state).
    """
    # 8 steps a block: a whole number of noise-scale periods at the default 4.
    per_block, block_times = 8, [[] for _ in steps_to_time]
    for step in steps_to_time:
        for i in range(per_block):  # compiles whatever a step calls
            state, _ = step(state, batches[0], i)
    jax.block_until_ready(state)
    for r in range(repeats):
        for step, times in zip(steps_to_time, block_times, strict=True):
            start = time.perf_counter()
            for i in range(per_block):
                state, metrics = step(state, batches[(r + i) % len(batches)], i)
            jax.block_until_ready((state, metrics))
            times.append((time.perf_counter() - start) / per_block)
    return [statistics.median(times) for times in block_times], state


def _trainer_model_and_mesh(model_cfg: ModelConfig, batch: int):
    """The model and mesh as `scaling run` builds them in this process (launch/train.py):
    on a CPU, data parallel over the devices the batch splits into, one per core."""
    mesh = sharding.run_mesh(-1, 1, 1, batch, even_rows=True)
    return steps.model_for_mesh(model_cfg, mesh), mesh


def _microbatches(model_cfg: ModelConfig, mesh, batch: int, requested: int) -> int:
    """train.microbatches as `scaling run` resolves it in this process (0: by shape)."""
    return steps.microbatches_for(requested, model_cfg, batch // mesh.size, noise_scale=True)


def _batches(shape: ModelShape, batch: int, mesh, rules) -> list:
    """Four fixed batches of random tokens, placed as the trainer places its batches."""
    rng = np.random.default_rng(0)
    return [
        jax.device_put(
            rng.integers(1, shape.vocab_size, (batch, shape.n_ctx + 1)).astype(np.int32),
            sharding.batch_sharding(mesh, rules),
        )
        for _ in range(4)
    ]


def bench_size(
    shape: ModelShape,
    dtype: str,
    batch: int,
    repeats: int,
    remat: str,
    scan_unroll: int,
    attention: str,
    peak: float,
    microbatches: int = 0,
) -> dict:
    model_cfg, mesh = _trainer_model_and_mesh(
        ModelConfig(
            shape,
            compute_dtype=dtype,
            remat=remat,
            scan_unroll=scan_unroll,
            attention_impl=attention,
        ),
        batch,
    )
    rules = sharding.rules_with_overrides({})
    tx = steps.make_optimizer(_optimizer_config(1000))
    per_device = model_cfg.per_device
    microbatches = _microbatches(model_cfg, mesh, batch, microbatches)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = steps.init_state(model_cfg, tx, mesh, rules, seed=0)
        train_step, eval_step = steps.compile_steps(
            shardings, mesh, rules, state.apply_fn, True, per_device, microbatches
        )
        spread = steps.spread_for(mesh, rules, per_device)
        plain_eval = jax.jit(
            functools.partial(plain_eval_step, apply_fn=state.apply_fn, spread=spread)
        )
        batches = _batches(shape, batch, mesh, rules)

        # The step that measures the gradient noise scale, the same step
        # without it (train.noise_scale=false), and the two as the loop runs
        # them: measuring on every k-th step.  A run compiles both.
        start = time.perf_counter()
        compiled = train_step.lower(state, batches[0]).compile()
        plain = (
            steps.compile_train_step(shardings, mesh, rules, False, per_device, microbatches)
            .lower(state, batches[0])
            .compile()
        )
        compile_s = time.perf_counter() - start
        every = base_config().train.noise_scale_every
        (noise_step_s, plain_step_s, step_s), state = _steady_step_times(
            [
                lambda s, b, i: compiled(s, b),
                lambda s, b, i: plain(s, b),
                lambda s, b, i: (compiled if i % every == 0 else plain)(s, b),
            ],
            state,
            batches,
            repeats,
        )

        eval_step(state.params, batches[0]).block_until_ready()
        plain_eval(state.params, batches[0]).block_until_ready()
        per_token_s = _median_time(lambda: eval_step(state.params, batches[1]), 3 * repeats)
        plain_s = _median_time(lambda: plain_eval(state.params, batches[1]), 3 * repeats)

    tokens_per_s = batch * shape.n_ctx / step_s
    flops_per_token = shape.train_flops_per_token
    return {
        "d_model": shape.d_model,
        "n_layer": shape.n_layer,
        "n_heads": shape.n_heads,
        "params": shape.n_params_kaplan,
        "params_total": shape.n_params,
        "remat": model_cfg.remat_policy,
        "attention": model_cfg.attention_kernel,
        "microbatches": microbatches,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak,
        "compile_s": compile_s,
        "noise_scale_cost": step_s / plain_step_s - 1,
        "noise_step_cost": noise_step_s / plain_step_s - 1,
        "eval_overhead": per_token_s / plain_s,
        "eval_vs_train": per_token_s / step_s,
    }


def study_shapes(study: str) -> tuple[list[ModelShape], int]:
    """The model shapes of a study's sweep members, and its batch size."""
    load_study(study)  # a missing file is one line, not a traceback
    members = study_sweep(study, {})
    shapes = [
        ModelShape(
            n_layer=c.model.n_layer,
            d_model=c.model.d_model,
            n_heads=c.model.n_heads,
            n_ctx=c.model.n_ctx,
            vocab_size=c.model.vocab_size,
        )
        for c in members
    ]
    return shapes, members[0].train.batch_size


def loop_step_timer(shape: ModelShape, batch: int, model_kw: dict, microbatches: int = 0):
    """The train steps compiled once: (timer, microbatches), where timer(repeats) is the
    median seconds a step as the loop runs it (measuring the noise scale every k-th step) and
    goes on training at each call, and microbatches is the count the steps take."""
    model_cfg, mesh = _trainer_model_and_mesh(ModelConfig(shape, **model_kw), batch)
    rules = sharding.rules_with_overrides({})
    tx = steps.make_optimizer(_optimizer_config(1000))
    microbatches = _microbatches(model_cfg, mesh, batch, microbatches)
    per_device = model_cfg.per_device
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = steps.init_state(model_cfg, tx, mesh, rules, seed=0)
        noise = steps.compile_train_step(shardings, mesh, rules, True, per_device, microbatches)
        plain = steps.compile_train_step(shardings, mesh, rules, False, per_device, microbatches)
    batches = _batches(shape, batch, mesh, rules)
    every = base_config().train.noise_scale_every
    trained = [state]

    def median_step_seconds(repeats: int) -> float:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            (step_s,), trained[0] = _steady_step_times(
                [lambda s, b, i: (noise if i % every == 0 else plain)(s, b)],
                trained[0],
                batches,
                repeats,
            )
        return step_s

    return median_step_seconds, microbatches


def loop_step_seconds(shape: ModelShape, batch: int, repeats: int, model_kw: dict) -> float:
    """Median seconds a step as the loop runs it (measuring the noise scale every k-th step)."""
    timer, _ = loop_step_timer(shape, batch, model_kw)
    return timer(repeats)


def _shape_flags(shape: ModelShape) -> list[str]:
    return [
        "--n-layer",
        str(shape.n_layer),
        "--d-model",
        str(shape.d_model),
        "--n-heads",
        str(shape.n_heads),
        "--n-ctx",
        str(shape.n_ctx),
    ]


def _run_json(args: list[str], cpu: int = -1) -> dict:
    """Run a measuring process (optionally pinned to a core); its last stdout line as JSON,
    or {"error": why} when it could not run."""
    try:
        result = subprocess.run(
            args + (["--cpu", str(cpu)] if cpu >= 0 else []),
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    except OSError as e:
        return {"error": f"{args[0]}: {e.strerror}"}
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


class _Pair:
    """Two serving workers (`--serve`), pinned to cores 0 and 1, timed a round at a time.

    Each builds and compiles once and answers every "go" line with one
    round's {"step_s", "tokens_per_s"}; both are told at once, so the round
    runs with both cores busy, as a sweep keeps them.
    """

    def __init__(self, args: list[str]):
        self.logs = [tempfile.TemporaryFile("w+") for _ in (0, 1)]
        self.procs = [
            subprocess.Popen(
                args + ["--serve", "--cpu", str(cpu)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,  # a file: warnings cannot fill a pipe nobody reads
                text=True,
                cwd=ROOT,
            )
            for cpu, log in zip((0, 1), self.logs, strict=True)
        ]
        self.error = None
        # {"ready": true, ...} from each: both compiled before any round.
        self.ready = self._replies()

    def _replies(self) -> list[dict]:
        replies = []
        for proc, log in zip(self.procs, self.logs, strict=True):
            line = proc.stdout.readline() if self.error is None else ""
            if line.strip():
                replies.append(json.loads(line))
                continue
            if self.error is None:
                proc.wait()
                log.seek(0)
                self.error = (log.read().strip().splitlines() or ["no output"])[-1]
        return replies

    def round(self) -> list[dict] | None:
        """One round on both cores at once; None once a worker has failed (see `error`)."""
        if self.error is None:
            for proc in self.procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
        replies = self._replies()
        return replies if self.error is None else None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.stdin.close()
        for proc, log in zip(self.procs, self.logs, strict=True):
            proc.wait()
            log.close()


def pair_rounds(ours_args: list[str], peer_args: list[str] | None, rounds: int) -> dict:
    """Our pair and PyTorch's (if `peer_args`) measured in alternate rounds.

    Both pairs of workers stay up and only one pair runs at a time: round r
    of ours, then round r of theirs, so a slowdown of a shared machine falls
    on neighbouring rounds of both and each round's ratio holds. Returns the
    median of the rounds' tokens/s for each pair, the median and the range of
    the per-round ratios, every round's figures, and in `errors` why a
    side's workers failed.
    """
    sides = {"ours": ours_args} | ({"torch": peer_args} if peer_args is not None else {})
    pairs = {}
    per_round = {name: [] for name in sides}
    try:
        for name, args in sides.items():
            pairs[name] = _Pair(args)
        for _ in range(rounds):
            for name, pair in pairs.items():
                replies = pair.round()
                if replies is not None:
                    per_round[name].append(sum(r["tokens_per_s"] for r in replies))
    finally:
        for pair in pairs.values():
            pair.close()
    result = {"errors": {name: pair.error for name, pair in pairs.items() if pair.error}}
    if "ours" in pairs and pairs["ours"].ready:
        result["ours_microbatches"] = pairs["ours"].ready[0].get("microbatches")
    for name, tokens in per_round.items():
        if tokens and name not in result["errors"]:
            result[name] = statistics.median(tokens)
            result[f"{name}_rounds"] = tokens
    if "ours" in result and "torch" in result:
        ratios = [o / t for o, t in zip(per_round["ours"], per_round["torch"], strict=True)]
        result["ratio"] = statistics.median(ratios)
        result["ratio_range"] = [min(ratios), max(ratios)]
    return result


def torch_args(python: str, shape: ModelShape, batch: int, repeats: int, threads: int = 0):
    """The command line of the PyTorch peer's step (bench/torch_peer.py); threads 0 = its own
    choice."""
    return [
        python,
        str(ROOT / "bench" / "torch_peer.py"),
        *_shape_flags(shape),
        "--batch",
        str(batch),
        "--vocab",
        str(shape.vocab_size),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ]


def torch_step(
    python: str, shape: ModelShape, batch: int, repeats: int, cpu: int = -1, threads: int = 0
) -> dict:
    """The PyTorch peer's step in its own process."""
    return _run_json(torch_args(python, shape, batch, repeats, threads), cpu)


def end_to_end(study: str, shape: ModelShape, batch: int, steps_: int) -> float:
    """tokens/s the trainer logs over its last eval window, `scaling run` on the real corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = {
            "model.n_layer": shape.n_layer,
            "model.d_model": shape.d_model,
            "model.n_heads": shape.n_heads,
            "model.n_ctx": shape.n_ctx,
            "model.vocab_size": shape.vocab_size,
            "train.batch_size": batch,
            "train.steps": steps_,
            "train.warmup_steps": 2,
            "eval.points": 3,
            "eval.batches": 1,
            "checkpoint.every": steps_,
            "progress": False,
            "store": f"{tmp}/store.sqlite",
            "workdir": f"{tmp}/runs",
        }
        result = subprocess.run(
            [sys.executable, "-m", "launch.cli", "run", study]
            + [f"--config.{k}={v}" for k, v in flags.items()],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if result.returncode != 0:
            raise SystemExit(f"scaling run failed: {result.stderr.strip().splitlines()[-1]}")
        with Store(f"{tmp}/store.sqlite") as store:
            (run,) = store.runs()
            _, tokens_per_s = store.scalars(run.run_id, "tokens_per_s")
    return float(tokens_per_s[-1])


def _worker(args) -> None:
    """--worker --serve: one shape's loop step in a process of its own (pinned by --cpu),
    compiled once, then one round timed per line of stdin (`_Pair`)."""
    shape = ModelShape(
        n_layer=args.n_layer,
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_ctx=args.n_ctx,
        vocab_size=args.vocab,
    )
    timer, microbatches = loop_step_timer(shape, args.batch, _model_kw(args), args.microbatches)
    print(json.dumps({"ready": True, "microbatches": microbatches}), flush=True)
    for _ in sys.stdin:
        step_s = timer(args.repeats)
        print(json.dumps({"step_s": step_s, "tokens_per_s": args.batch * args.n_ctx / step_s}))
        sys.stdout.flush()


def _model_kw(args) -> dict:
    return {
        "compute_dtype": args.dtype,
        "remat": args.remat,
        "scan_unroll": args.scan_unroll,
        "attention_impl": args.attention,
    }


def main(argv=None):
    keep_freed_memory()  # as the command line does (launch/host_memory.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--study",
        help="measure this study file's sweep members "
        "(its shapes, batch size and context) instead of the ladder",
    )
    parser.add_argument("--d-models", default="128,256,512", help="the ladder's widths")
    parser.add_argument("--aspect", type=int, default=64, help="d_model / n_layer")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of the model (parameters stay float32)",
    )
    parser.add_argument("--remat", default="auto", help="model.remat")
    parser.add_argument("--attention", default="auto", help="model.attention_impl")
    parser.add_argument(
        "--scan-unroll",
        type=int,
        default=0,
        help="model.scan_unroll: 0 picks by depth and width, 1 keeps the loop",
    )
    parser.add_argument(
        "--microbatches",
        type=int,
        default=0,
        help="train.microbatches: 0 picks by shape and cores, 1 takes the batch whole",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--peak-size",
        type=int,
        default=0,
        help="side of the peak matmul (0: 2048 on CPU, 8192 on an accelerator)",
    )
    parser.add_argument(
        "--torch-python",
        default=sys.executable,
        help="interpreter with PyTorch for the peer step ('' to skip it)",
    )
    parser.add_argument(
        "--pair",
        action="store_true",
        help="also two copies at once, one per core (ours and PyTorch's)",
    )
    parser.add_argument(
        "--pair-rounds",
        type=int,
        default=3,
        help="with --pair: rounds of each pair, alternated (ours, PyTorch's, ours, ...)",
    )
    parser.add_argument(
        "--e2e-steps",
        type=int,
        default=40,
        help="steps of the end-to-end `scaling run` per shape (0: skip)",
    )
    parser.add_argument(
        "--e2e-study",
        default="experiments/local_cpu.py",
        help="the study file the end-to-end run starts from",
    )
    parser.add_argument(
        "--cpu-per-core",
        action="store_true",
        help="one CPU device per core, data parallel, as with --config.mesh.cpu_per_core=true",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    for name in ("n-layer", "d-model", "n-heads"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # before JAX starts its threads
    if args.cpu_per_core:
        one_device_per_core()  # as `scaling run` with mesh.cpu_per_core (one when pinned)
    if args.worker:
        return _worker(args)

    # A real compile time each size, not a read from the persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    device = jax.devices()[0]
    dtypes = ["float32"] + (["bfloat16"] if jax.default_backend() != "cpu" else [])
    if args.dtype not in dtypes:
        dtypes.append(args.dtype)
    if args.study:
        shapes, batch = study_shapes(args.study)
    else:
        batch = args.batch
        shapes = [
            ModelShape(
                n_layer=max(1, d // args.aspect),
                d_model=d,
                n_heads=max(1, d // args.head_dim),
                n_ctx=args.n_ctx,
                vocab_size=args.vocab,
            )
            for d in (int(d) for d in args.d_models.split(","))
        ]
    pair = args.pair and len(os.sched_getaffinity(0)) >= 2
    # The peak is measured before and after the ladder and the higher kept: a
    # shared machine's momentary slowdown then lowers neither the peak nor,
    # by that, inflates the MFU.
    peaks = {d: _peak(d, args.peak_size) for d in dtypes}
    peak = peaks[args.dtype]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s)); matmul peak "
        + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()),
        flush=True,
    )
    print(
        f"{'d_model':>7} {'layers':>6} {'N':>11} {'step ms':>8} {'tokens/s':>10} "
        f"{'MFU':>6} {'compile s':>9} {'noise cost':>10} {'per meas.':>10} {'eval/plain':>10} "
        f"{'eval/train':>10} {'remat':>13} {'attention':>9} {'micro':>5}",
        flush=True,
    )
    rows = []
    torch_note = None
    for shape in shapes:
        row = bench_size(
            shape,
            args.dtype,
            batch,
            args.repeats,
            args.remat,
            args.scan_unroll,
            args.attention,
            peak,
            args.microbatches,
        )
        row["batch"], row["n_ctx"] = batch, shape.n_ctx
        print(
            f"{row['d_model']:>7} {row['n_layer']:>6} {row['params']:>11,} "
            f"{row['step_s'] * 1e3:>8.1f} {row['tokens_per_s']:>10,.0f} {row['mfu']:>6.1%} "
            f"{row['compile_s']:>9.2f} {row['noise_scale_cost']:>+10.1%} "
            f"{row['noise_step_cost']:>+10.1%} "
            f"{row['eval_overhead']:>10.2f} {row['eval_vs_train']:>10.2f} "
            f"{row['remat']:>13} {row['attention']:>9} {row['microbatches']:>5}",
            flush=True,
        )
        extra = []
        if args.torch_python and not torch_note:
            peer = torch_step(args.torch_python, shape, batch, args.repeats)
            if "error" in peer:
                torch_note = f"no PyTorch peer ({peer['error']})"
                print(f"        {torch_note}", flush=True)
            else:
                row["torch_tokens_per_s"] = peer["tokens_per_s"]
                row["vs_torch"] = row["tokens_per_s"] / peer["tokens_per_s"]
                row["torch_version"] = peer["torch"]
                extra.append(
                    f"PyTorch {peer['tokens_per_s']:,.0f} tokens/s "
                    f"({peer['threads']} threads): ours x{row['vs_torch']:.2f}"
                )
        if pair:
            ours_args = [
                sys.executable,
                str(ROOT / "bench" / "train_bench.py"),
                "--worker",
                *_shape_flags(shape),
                "--batch",
                str(batch),
                "--vocab",
                str(shape.vocab_size),
                "--repeats",
                str(args.repeats),
                "--dtype",
                args.dtype,
                "--remat",
                args.remat,
                "--attention",
                args.attention,
                "--scan-unroll",
                str(args.scan_unroll),
                "--microbatches",
                str(args.microbatches),
            ]
            peer_args = (
                torch_args(args.torch_python, shape, batch, args.repeats, threads=1)
                if "torch_tokens_per_s" in row
                else None
            )
            pairs = pair_rounds(ours_args, peer_args, args.pair_rounds)
            for name, why in pairs["errors"].items():
                print(f"        the {name} pair failed: {why}", flush=True)
            if "ours" in pairs:
                row["pair_tokens_per_s"] = pairs["ours"]
                row["pair_rounds"] = pairs["ours_rounds"]
                extra.append(f"two at once, a core each: {row['pair_tokens_per_s']:,.0f}")
            if "torch" in pairs:
                row["torch_pair_tokens_per_s"] = pairs["torch"]
                row["torch_pair_rounds"] = pairs["torch_rounds"]
                extra.append(f"PyTorch two at once {row['torch_pair_tokens_per_s']:,.0f}")
            if "ratio" in pairs:
                row["pair_vs_torch_pair"] = pairs["ratio"]
                row["pair_vs_torch_pair_range"] = pairs["ratio_range"]
                low, high = pairs["ratio_range"]
                extra.append(
                    f"pairs x{pairs['ratio']:.2f} (x{low:.2f}-{high:.2f} over "
                    f"{len(pairs['ours_rounds'])} alternated rounds)"
                )
            if pairs.get("ours_microbatches"):
                row["pair_microbatches"] = pairs["ours_microbatches"]
                extra.append(f"microbatches {row['pair_microbatches']} on a core")
            if "pair_tokens_per_s" in row and "torch_tokens_per_s" in row:
                row["pair_vs_torch"] = row["pair_tokens_per_s"] / row["torch_tokens_per_s"]
                extra.append(f"our pair / PyTorch's step x{row['pair_vs_torch']:.2f}")
        if args.e2e_steps:
            row["e2e_tokens_per_s"] = end_to_end(
                args.study or args.e2e_study, shape, batch, args.e2e_steps
            )
            row["e2e_vs_step"] = row["e2e_tokens_per_s"] / row["tokens_per_s"]
            extra.append(
                f"`scaling run` {row['e2e_tokens_per_s']:,.0f} tokens/s "
                f"(x{row['e2e_vs_step']:.2f} of the bare step)"
            )
        if extra:
            print("        " + "; ".join(extra), flush=True)
        rows.append(row)
    peaks = {d: max(peaks[d], _peak(d, args.peak_size)) for d in dtypes}
    if peaks[args.dtype] > peak:
        print(
            f"the peak measured after the ladder was higher ({peaks[args.dtype] / 1e9:,.0f} "
            "GFLOP/s): MFU below is against it"
        )
        for row in rows:
            row["mfu"] *= peak / peaks[args.dtype]
        peak = peaks[args.dtype]
        for row in rows:
            print(f"{row['d_model']:>7} MFU {row['mfu']:.1%}")
    if args.out:
        result = {
            "peak_flops": peak,
            "peaks": peaks,
            "dtype": args.dtype,
            "device": f"{device.device_kind} ({jax.default_backend()})",
            "batch": batch,
            "n_ctx": shapes[0].n_ctx,
            "study": args.study,
            "torch": torch_note or "measured" if args.torch_python else "skipped",
            "rows": rows,
        }
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
