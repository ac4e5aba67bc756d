"""How close the trainer runs to this machine's limit, measured side by side in one run.

In one process it measures
  (a) the matmul peak: a jitted square matmul big enough to saturate the
      machine, float32 (and bfloat16 on an accelerator), in FLOP/s;
  (b) for each size of a ladder at one aspect ratio and context, the
      trainer's own jitted train step (launch/steps.py, the same function a
      sweep runs) after compile: step time, tokens/s, and MFU = achieved
      model FLOP/s / measured peak, with model FLOPs per token
      6 N + 6 n_layer n_ctx d_model (Kaplan's count, what the store logs);
  (c) the compile time of each size's train steps (with and without the
      noise scale: a run compiles both), with the persistent compilation
      cache off so the figure is a real compile;
  (d) the per-token eval: its step time against a plain mean-loss eval of
      the same batch (`eval_overhead` = per-token / plain) and against a
      train step (`eval_vs_train`);
  (e) what measuring the gradient noise scale costs: the train step as a
      sweep runs it (measuring on every train.noise_scale_every-th step)
      against the same step without (`noise_scale_cost`, a fraction), and a
      step that measures against one that does not (`noise_step_cost`).

    python bench/train_bench.py                       # CPU ladder 128, 256, 512
    python bench/train_bench.py --out bench.json      # also write the rows as JSON
    python bench/train_bench.py --dtype bfloat16 --d-models 512,1024,2048 --batch 64 --n-ctx 1024

Everything is measured in the same run, so the ratios hold on this machine
whatever its CPU; absolute figures differ between machines of one type.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from launch import steps  # noqa: E402
from launch.config import base_config  # noqa: E402
from launch.peak import matmul_peak_flops  # noqa: E402
from models import sharding  # noqa: E402
from models.sizes import ModelShape  # noqa: E402
from models.transformer import ModelConfig  # noqa: E402


def _optimizer_config(total_steps: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=total_steps, learning_rate=1e-3, warmup_steps=2, final_lr_fraction=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(dtype: str, size: int) -> float:
    return matmul_peak_flops.__wrapped__(dtype, size)  # measured afresh, not the cached value


def plain_eval_step(params, tokens_BxL1, apply_fn):
    """The mean loss of the batch only: what an eval that logs no per-token vector costs."""
    return steps.per_token_loss(params, apply_fn, tokens_BxL1).mean()


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


def bench_size(shape: ModelShape, dtype: str, batch: int, repeats: int, remat: str,
               scan_unroll: int, attention: str, peak: float) -> dict:
    model_cfg = ModelConfig(shape, compute_dtype=dtype, remat=remat, scan_unroll=scan_unroll,
                            attention_impl=attention)
    mesh = sharding.make_mesh(1, 1, 1)
    rules = sharding.rules_with_overrides({})
    tx = steps.make_optimizer(_optimizer_config(1000))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = steps.init_state(model_cfg, tx, mesh, rules, seed=0)
        train_step, eval_step = steps.compile_steps(shardings, mesh, rules, state.apply_fn)
        plain_eval = jax.jit(functools.partial(plain_eval_step, apply_fn=state.apply_fn))
        rng = np.random.default_rng(0)
        batches = [jnp.asarray(rng.integers(1, shape.vocab_size, (batch, shape.n_ctx + 1)),
                               jnp.int32) for _ in range(4)]

        # The step that measures the gradient noise scale, the same step
        # without it (train.noise_scale=false), and the two as the loop runs
        # them: measuring on every k-th step.  A run compiles both.
        start = time.perf_counter()
        compiled = train_step.lower(state, batches[0]).compile()
        plain = steps.compile_train_step(shardings, mesh, rules, noise_scale=False).lower(
            state, batches[0]).compile()
        compile_s = time.perf_counter() - start
        every = base_config().train.noise_scale_every
        (noise_step_s, plain_step_s, step_s), state = _steady_step_times(
            [lambda s, b, i: compiled(s, b), lambda s, b, i: plain(s, b),
             lambda s, b, i: (compiled if i % every == 0 else plain)(s, b)],
            state, batches, repeats)

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
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak,
        "compile_s": compile_s,
        "noise_scale_cost": step_s / plain_step_s - 1,
        "noise_step_cost": noise_step_s / plain_step_s - 1,
        "eval_overhead": per_token_s / plain_s,
        "eval_vs_train": per_token_s / step_s,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-models", default="128,256,512", help="the ladder's widths")
    parser.add_argument("--aspect", type=int, default=64, help="d_model / n_layer")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the model (parameters stay float32)")
    parser.add_argument("--remat", default="auto", help="model.remat")
    parser.add_argument("--attention", default="auto", help="model.attention_impl")
    parser.add_argument("--scan-unroll", type=int, default=0,
                        help="model.scan_unroll: 0 unrolls up to 4 layers, 1 keeps the loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-size", type=int, default=0,
                        help="side of the peak matmul (0: 2048 on CPU, 8192 on an accelerator)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    # A real compile time each size, not a read from the persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    device = jax.devices()[0]
    dtypes = ["float32"] + (["bfloat16"] if jax.default_backend() != "cpu" else [])
    if args.dtype not in dtypes:
        dtypes.append(args.dtype)
    # The peak is measured before and after the ladder and the higher kept: a
    # shared machine's momentary slowdown then lowers neither the peak nor,
    # by that, inflates the MFU.
    peaks = {d: _peak(d, args.peak_size) for d in dtypes}
    peak = peaks[args.dtype]
    print(f"device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
          f"device(s)); matmul peak " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s"
                                                 for k, v in peaks.items()), flush=True)
    print(f"{'d_model':>7} {'layers':>6} {'N':>11} {'step ms':>8} {'tokens/s':>10} "
          f"{'MFU':>6} {'compile s':>9} {'noise cost':>10} {'per meas.':>10} {'eval/plain':>10} "
          f"{'eval/train':>10} {'remat':>5} {'attention':>9}",
          flush=True)
    rows = []
    for d_model in (int(d) for d in args.d_models.split(",")):
        shape = ModelShape(n_layer=max(1, d_model // args.aspect), d_model=d_model,
                           n_heads=max(1, d_model // args.head_dim), n_ctx=args.n_ctx,
                           vocab_size=args.vocab)
        row = bench_size(shape, args.dtype, args.batch, args.repeats, args.remat,
                         args.scan_unroll, args.attention, peak)
        rows.append(row)
        print(f"{row['d_model']:>7} {row['n_layer']:>6} {row['params']:>11,} "
              f"{row['step_s'] * 1e3:>8.1f} {row['tokens_per_s']:>10,.0f} {row['mfu']:>6.1%} "
              f"{row['compile_s']:>9.2f} {row['noise_scale_cost']:>+10.1%} "
              f"{row['noise_step_cost']:>+10.1%} "
              f"{row['eval_overhead']:>10.2f} {row['eval_vs_train']:>10.2f} "
              f"{row['remat']:>5} {row['attention']:>9}", flush=True)
    peaks = {d: max(peaks[d], _peak(d, args.peak_size)) for d in dtypes}
    if peaks[args.dtype] > peak:
        print(f"the peak measured after the ladder was higher ({peaks[args.dtype] / 1e9:,.0f} "
              "GFLOP/s): MFU below is against it")
        for row in rows:
            row["mfu"] *= peak / peaks[args.dtype]
        peak = peaks[args.dtype]
        for row in rows:
            print(f"{row['d_model']:>7} MFU {row['mfu']:.1%}")
    if args.out:
        result = {"peak_flops": peak, "peaks": peaks, "dtype": args.dtype,
                  "device": f"{device.device_kind} ({jax.default_backend()})",
                  "batch": args.batch, "n_ctx": args.n_ctx, "rows": rows}
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
