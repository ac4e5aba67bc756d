"""One training run, from a validated config to finished rows in the store.

`train_and_evaluate(config)` prepares the data, builds the mesh and the
sharded state, resumes from the run's last checkpoint if there is one, and
runs the loop: train steps, evals at log-spaced steps (mean eval loss and
the per-token loss vector), checkpoints every `checkpoint.every` steps.
The loop only schedules, logs and checkpoints; the math is in
`launch/steps.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from launch import (
    checkpoints,
    data,
    distributed,
    environment,
    preemption,
    preflight,
    remote_records,
    steps,
)
from launch import config as config_lib
from launch.claims import Claim, RunBusy, run_lock
from launch.corpus import resolve_cache_dir
from launch.peak import matmul_peak_flops
from models import sharding
from models.sizes import DEFAULT_FLOP_CONVENTION, FLOP_CONVENTIONS
from scaling import faults
from scaling.errors import Preempted, UserError, first_line
from scaling.store import RunRecord, Store, check_writable


class DivergedError(Exception):
    """The loss became NaN or inf; the run is marked failed, the sweep goes on."""


def eval_schedule(total_steps: int, points: int) -> list[int]:
    """About `points` log-spaced steps in [1, total_steps], always ending with the last."""
    # Past ten points a step every step is already taken: more would cost memory only.
    raw = np.logspace(0, math.log10(total_steps), min(points, 10 * total_steps))
    return sorted({int(round(s)) for s in raw} | {total_steps})


def run_record(config, run_id: str) -> RunRecord:
    shape = config_lib.model_config(config).shape
    tokens = config.train.steps * config.train.batch_size * shape.n_ctx
    return RunRecord(
        run_id=run_id,
        config=config.to_dict(),
        n_params=shape.n_params_kaplan,
        n_params_total=shape.n_params,
        n_layer=shape.n_layer,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        n_ctx=shape.n_ctx,
        tokens=tokens,
        flops=float(shape.train_flops_per_token) * tokens,
        flops_by_convention={c: float(shape.flops_per_token(c)) * tokens for c in FLOP_CONVENTIONS},
        flop_convention=DEFAULT_FLOP_CONVENTION,
    )


def train_and_evaluate(config, store: Store | None = None) -> str:
    """Train one run to `train.steps` (resuming if it was interrupted); returns its run id."""
    run_id = config_lib.run_id(config)
    is_writer = jax.process_index() == 0  # only process 0 writes the store and prints
    own_store = store is None and is_writer  # the other processes never open the store
    if own_store:
        check_writable(config.store)  # before the data is prepared
    corpus = preflight.check_run(config)  # before the store: a refused run writes nothing
    if own_store:
        store = Store(config.store)
    # With a bucket, process 0 also writes the run's records there (launch/remote_records.py).
    records = remote_records.for_config(config, run_id) if is_writer else None

    def mark(status, step=None, reason=None):
        store.set_status(run_id, status, step=step, reason=reason)
        if not records:
            return
        try:
            records.status(status, step, reason)
        except OSError as e:
            if status == "finished":
                raise
            # Already failing (often because the bucket is unreachable): the store has the
            # status, and the bucket's last record ("running") still reads as resumable.
            print(f"could not record status {status} in the bucket ({e})", file=sys.stderr)

    try:
        if is_writer:
            store.register_run(run_record(config, run_id), sweep=config.sweep_name)
            if records:
                records.start(dataclasses.asdict(run_record(config, run_id)))
        # A busy run (RunBusy) is left as its other trainer has it: nothing is marked.
        # The lock settles two trainers on this machine, the claim two on different ones.
        with (
            run_lock(config.workdir, run_id) if is_writer else contextlib.nullcontext(),
            Claim(store.path, run_id) if is_writer else contextlib.nullcontext() as claim,
        ):
            # A finished run stays finished, whatever this launch would change; process 0
            # knows (from its store or the bucket's records), and tells the others. Asked
            # under the lock, so a run another sweep finished a moment ago is not retrained.
            finished = is_writer and (
                store.run(run_id).status == "finished" or bool(records and records.finished())
            )
            if jax.process_count() > 1:
                finished = bool(multihost_utils.broadcast_one_to_all(np.int32(finished)))
            if finished:
                if is_writer:
                    print(f"run {run_id} finished earlier; nothing to train", file=sys.stderr)
                return run_id
            if is_writer:
                mark("running")
                ran_on = environment.current()
                store.add_environment(run_id, ran_on)
                if records:
                    records.environment(ran_on)
            try:
                _train(config, run_id, store, is_writer, corpus, records, claim)
            except DivergedError as e:
                if is_writer:
                    mark("failed", reason=str(e))
                raise
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                # Out of device or host memory: the run cannot go on at this size, so it is
                # failed (not left running) and the reason says what to change.
                reason = (
                    f"out of memory at this size ({first_line(e)}); "
                    "lower train.batch_size, use model.remat=full, or add devices"
                )
                if is_writer:
                    mark("failed", reason=reason)
                raise UserError(f"run {run_id} failed: {reason}") from None
            except Preempted as e:
                if is_writer:
                    mark("preempted", step=e.step, reason=str(e))
                raise
            except RunBusy:
                raise  # its claim was taken over: the run is the other trainer's to mark
            except (KeyboardInterrupt, UserError) as e:
                # Not the run's fault: it stays pending and trains on the next launch.
                if is_writer:
                    mark("pending", reason=str(e) or "interrupted")
                raise
            if is_writer:
                mark("finished", step=config.train.steps)
    finally:
        if own_store:
            store.close()
    return run_id


def _use_compilation_cache(cache_dir: str):
    # Relaunching a sweep, or a sweep of same-shaped runs, then reuses XLA
    # programs instead of compiling them again.
    path = resolve_cache_dir(cache_dir) / "jax"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _tensorboard_writer(run_dir: Path, start_step: int):
    """Event files in <workdir>/<run_id>/tensorboard with every eval row's scalars (tags as
    in the store). A resumed run purges the events past its checkpoint, which it logs again.
    They stay on the local disk also when checkpoints go to a bucket."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once: the compiled steps, the state and where it goes."""

    config: object
    shape: object
    mesh: object
    rules: object
    put: Callable  # a process's rows of a global batch -> a sharded device array
    batch: Callable  # step -> this process's rows of that step's global training batch
    train_step: Callable
    noise_step: Callable | None  # the same update, also measuring the noise scale
    evaluate: Callable  # (params, n_batches) -> (per-token mean, stderr, n_sequences)
    eval_batches: tuple[int, int]  # (during training, at the last step)
    schedule: Callable  # step -> learning rate, for the eval rows
    state: object
    start_step: int
    ckpt: checkpoints.Checkpointer
    run_dir: Path  # config.json and checkpoints (in the bucket when there is one)
    local_dir: Path  # TensorBoard's events (always on this disk)


def _build(
    config, run_id: str, store: Store, is_writer: bool, corpus: data.Corpus, eval_at: set
) -> _Run:
    """Mesh, shardings, compiled steps, the fixed eval set on the devices, and the state,
    restored from the run's last checkpoint; refuses layouts and histories that cannot work."""
    _use_compilation_cache(config.data.cache_dir)
    model_cfg = config_lib.model_config(config)
    shape = model_cfg.shape
    # The mesh first: a layout that cannot work fails before any data is prepared.
    try:
        mesh = sharding.run_mesh(
            config.mesh.data,
            config.mesh.fsdp,
            config.mesh.tensor,
            config.train.batch_size,
            even_rows=config.train.noise_scale,
        )
        rules = sharding.rules_with_overrides(json.loads(config.mesh.rules or "{}"))
    except json.JSONDecodeError as e:
        raise UserError(f"config.mesh.rules={config.mesh.rules!r} is not JSON ({e})") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    model_cfg = steps.model_for_mesh(model_cfg, mesh)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    distributed.check_batch_layout(batch_sharding, (config.train.batch_size, shape.n_ctx + 1))
    rows_per_device = batch_sharding.shard_shape((config.train.batch_size, shape.n_ctx + 1))[0]
    if config.train.noise_scale and rows_per_device % 2:
        raise UserError(
            f"train.noise_scale splits each device's rows in two, but "
            f"train.batch_size={config.train.batch_size} puts {rows_per_device} on "
            "each; use an even number per device or --config.train.noise_scale=false"
        )
    try:
        microbatches = steps.microbatches_for(
            config.train.microbatches, model_cfg, rows_per_device, config.train.noise_scale
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    eval_every_n, eval_last_n = config_lib.eval_batch_counts(config)
    eval_set = data.eval_batches(corpus.val, eval_last_n, config.train.batch_size, shape.n_ctx)

    tx = steps.make_optimizer(config.train)
    state, state_shardings = steps.init_state(model_cfg, tx, mesh, rules, config.seed)
    train_step, eval_step = steps.compile_steps(
        state_shardings, mesh, rules, state.apply_fn, False, model_cfg.per_device, microbatches
    )
    # Every noise_scale_every-th step also measures the gradient noise scale
    # (same update, a little dearer); the others leave its moving averages as they are.
    noise_step = (
        steps.compile_train_step(
            state_shardings, mesh, rules, True, model_cfg.per_device, microbatches
        )
        if config.train.noise_scale
        else None
    )

    local_dir = Path(config.workdir) / run_id
    # With a bucket, checkpoints live there so a new slice resumes from them.
    run_dir = (
        remote_records.run_dir(config.launch.bucket, run_id) if config.launch.bucket else local_dir
    )
    ckpt = checkpoints.Checkpointer(run_dir / "checkpoints", config.checkpoint.max_to_keep)
    state, start_step = ckpt.restore_latest(state, state_shardings, corpus.fingerprint)
    try:
        _check_history(
            config,
            run_id,
            store if is_writer else None,
            start_step,
            eval_at,
            run_dir / "checkpoints",
        )
    except UserError:
        ckpt.close()
        raise

    rows = config.train.batch_size // jax.process_count()
    first_row = jax.process_index() * rows

    def put(batch_np):
        return jax.make_array_from_process_local_data(batch_sharding, batch_np)

    # The fixed eval set goes to the devices once; each process puts its own
    # rows of every global eval batch.
    eval_arrays = [put(b[first_row : first_row + rows]) for b in eval_set]

    def evaluate(params, n_batches):
        sums_2xL = sum(eval_step(params, batch) for batch in eval_arrays[:n_batches])
        n_sequences = n_batches * eval_set.shape[1]
        return (*steps.per_token_mean_and_stderr(sums_2xL, n_sequences), n_sequences)

    batch = data.train_batches(
        corpus.train,
        config.train.batch_size,
        shape.n_ctx,
        config.seed,
        jax.process_index(),
        jax.process_count(),
    )
    return _Run(
        config,
        shape,
        mesh,
        rules,
        put,
        batch,
        train_step,
        noise_step,
        evaluate,
        (eval_every_n, eval_last_n),
        steps.learning_rate_schedule(config.train),
        state,
        start_step,
        ckpt,
        run_dir,
        local_dir,
    )


class _Writers:
    """Where an eval's row goes: the store, the bucket's records and TensorBoard on
    process 0; nowhere on the others (decided here, once)."""

    def __init__(
        self,
        run: _Run,
        run_id: str,
        store: Store,
        is_writer: bool,
        records: remote_records.RunRecords | None,
        claim: Claim | None = None,
    ):
        self.run_id, self.store, self.records, self.claim = run_id, store, records, claim
        self.active = is_writer
        self.tensorboard = _tensorboard_writer(run.local_dir, run.start_step) if is_writer else None
        if is_writer:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "config.json").write_text(json.dumps(run.config.to_dict(), indent=2))

    def log(self, step: int, row: dict, per_token_L, stderr_L, n_sequences: int):
        if not self.active:
            return
        if self.claim is not None:
            self.claim.check()  # a trainer whose run was taken over writes nothing more
        self.store.log_eval(self.run_id, step, row, per_token_L, stderr_L, n_sequences)
        if self.records:
            self.records.eval(step, row, per_token_L, stderr_L, n_sequences)
        for name, value in row.items():
            self.tensorboard.add_scalar(name, value, step, walltime=row["wall_time"])
        self.tensorboard.flush()

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


class _NanWatch:
    """Train losses not yet checked for NaN. Every `every` steps it checks those from
    before the last `every` steps, which the device has computed by then (no stall)."""

    def __init__(self, every: int):
        self.every, self.unchecked = every, []  # (step, device train loss)

    def add(self, step: int, loss):
        self.unchecked.append((step, loss))
        if step % self.every == 0:
            _check_finite(self.unchecked[: -self.every])
            del self.unchecked[: -self.every]

    def check_all(self):
        """Before an eval or a checkpoint: names the first bad step, if any."""
        _check_finite(self.unchecked)
        self.unchecked.clear()


class _EvalWindow:
    """The steps since the last eval: their metrics (device scalars, fetched only at the
    eval) and their wall time, for the eval's row."""

    def __init__(self, carried_losses: list):
        # Train losses from before the checkpoint this run resumed from, so the
        # first eval after a resume logs the same mean as without one.
        self.carried = list(carried_losses)
        self.metrics = []
        self.start, self.steps = time.perf_counter(), 0

    def add(self, metrics):
        self.metrics.append(metrics)
        self.steps += 1

    def train_losses(self) -> list[float]:
        """What a checkpoint saves, so a resumed run's next eval mean is unchanged."""
        return self.carried + [float(m["train_loss"]) for m in self.metrics]

    def close(self) -> tuple[float, float, int, float]:
        """(mean train loss, last grad norm, steps, seconds) of the window; starts a new one."""
        train_loss = float(np.mean(self.carried + [m["train_loss"] for m in self.metrics]))
        grad_norm = float(self.metrics[-1]["grad_norm"])
        window = (train_loss, grad_norm, self.steps, time.perf_counter() - self.start)
        self.carried, self.metrics = [], []
        return window

    def restart_clock(self):
        self.start, self.steps = time.perf_counter(), 0


def _train(
    config,
    run_id: str,
    store: Store,
    is_writer: bool,
    corpus: data.Corpus,
    records: remote_records.RunRecords | None,
    claim: Claim | None = None,
):
    total = config.train.steps
    eval_at = set(eval_schedule(total, config.eval.points))
    run = _build(config, run_id, store, is_writer, corpus, eval_at)
    writers = _Writers(run, run_id, store, is_writer, records, claim)
    peak = matmul_peak_flops(config.model.compute_dtype) if is_writer else float("nan")
    nan_watch = _NanWatch(config.train.nan_check_every)
    window = _EvalWindow(run.ckpt.restored_loop.get("train_losses", []))
    bar = tqdm(
        total=total,
        initial=run.start_step,
        desc=f"{run_id} N={run.shape.n_params_kaplan:,}",
        disable=not (config.progress and is_writer),
        file=sys.stderr,
        leave=True,
    )
    state = run.state
    # Closing the checkpointer waits for an async save in flight, also when
    # the loop stops early (interrupt, divergence), so no save is cut short.
    with (
        jax.set_mesh(run.mesh),
        nn.logical_axis_rules(run.rules),
        contextlib.closing(bar),
        contextlib.closing(run.ckpt),
        contextlib.closing(writers),
        preemption.Notice(preemption.signal_of(config.train.preemption_signal)) as notice,
    ):
        for step in range(run.start_step, total):
            state, metrics = _do_step(run, state, step)
            done = step + 1
            window.add(metrics)
            nan_watch.add(done, metrics["train_loss"])
            bar.update(1)
            if done in eval_at:
                nan_watch.check_all()
                row, per_token = _eval_row(run, state, done, window, peak)
                writers.log(done, row, *per_token)
                bar.set_postfix(eval_loss=f"{row['eval_loss']:.3f}", mfu=f"{row['mfu']:.0%}")
                window.restart_clock()
            # Asked at every step: with several processes it is a sync point.
            preempted = notice.reached(done) and done < total
            if done % config.checkpoint.every == 0 or done == total or preempted:
                nan_watch.check_all()  # never save a diverged state
                run.ckpt.save(
                    done, state, corpus.fingerprint, {"train_losses": window.train_losses()}
                )
            if preempted:
                raise Preempted(done)  # closing the checkpointer waits for the save


def _do_step(run: _Run, state, step: int):
    """Step `step`'s batch (this process's rows of it) through the train step."""
    config = run.config
    local = run.batch(step)
    measure = run.noise_step is not None and step % config.train.noise_scale_every == 0
    state, metrics = (run.noise_step if measure else run.train_step)(state, run.put(local))
    faults.point("train_step")  # tests: a kill while the step runs
    return state, metrics


def _eval_row(run: _Run, state, done: int, window: _EvalWindow, peak: float):
    """The eval at step `done`: its row of scalars and (per-token mean, stderr, sequences)."""
    config, shape = run.config, run.shape
    train_loss, grad_norm, window_steps, elapsed = window.close()  # elapsed: compile too, first
    if not math.isfinite(train_loss):
        raise DivergedError(
            f"train loss became {train_loss} by step {done}; lower train.learning_rate"
        )
    every_n, last_n = run.eval_batches
    per_token_L, stderr_L, n_sequences = run.evaluate(
        state.params, last_n if done == config.train.steps else every_n
    )
    tokens_per_step = config.train.batch_size * shape.n_ctx
    tokens_per_s = window_steps * tokens_per_step / elapsed
    row = {
        "eval_loss": float(per_token_L.mean()),
        "train_loss": train_loss,
        "grad_norm": grad_norm,
        "learning_rate": float(run.schedule(done - 1)),
        "tokens": done * tokens_per_step,
        "flops": float(done * tokens_per_step * shape.train_flops_per_token),
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * shape.train_flops_per_token / peak,
        "wall_time": time.time(),
    }
    if config.train.noise_scale:  # B_simple in tokens, over ~50 measurements
        row["noise_scale"] = float(state.noise_ema["trace"] / state.noise_ema["g2"])
    if not math.isfinite(row["eval_loss"]):
        raise DivergedError(
            f"eval loss became {row['eval_loss']} at step {done}; lower train.learning_rate"
        )
    return row, (per_token_L, stderr_L, n_sequences)


def _check_history(
    config, run_id: str, store: Store | None, start_step: int, eval_at: set, checkpoints: Path
):
    """UserError if the run resumes past evals that its store does not hold.

    A checkpoint at step S is saved after the evals up to S were logged, so a
    store without them is not the one this run wrote to (a new --config.store
    over an old workdir): resuming would finish the run with a gap in its
    results, or none at all.  With a bucket the evals are in its records
    (`scaling sync` brings them), so a fresh local store is expected there.
    """
    if config.launch.bucket:
        return
    missing = 0
    if store is not None:
        needed = max((s for s in eval_at if s <= start_step), default=0)
        logged = store.last_eval(run_id)
        missing = needed if needed > (logged[0] if logged else 0) else 0
    if jax.process_count() > 1:
        missing = int(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    if missing:
        raise UserError(
            f"run {run_id} would resume from its checkpoint at step {start_step} in "
            f"{checkpoints}, but the store {config.store} lacks its eval at step {missing} "
            "(the checkpoint was written with another store): pass that store with "
            f"--config.store, or move {checkpoints.parent} away to train the run afresh"
        )


def _check_finite(losses: list):
    """DivergedError naming the first step whose train loss is NaN or inf."""
    values = jax.device_get([loss for _, loss in losses])
    for (step, _), value in zip(losses, values, strict=True):
        if not math.isfinite(float(value)):
            raise DivergedError(
                f"train loss became {float(value)} at step {step}; lower train.learning_rate"
            )
