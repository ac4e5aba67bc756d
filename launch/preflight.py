"""The checks a run needs the data and the disk for, made before anything is written.

`validate` (launch/config.py) checks a config on its own; these find what
only the files can tell: text that cannot be read, documents shorter than
the context, an eval set larger than the held-out text, a disk too full for
one checkpoint, a model that cannot fit in the machine's memory; and they say
when a run would take more than a day here. They run before the store is
opened or a run folder made, so a refused run leaves no trace. Preparing a
cached corpus takes a few tens of milliseconds, so a sweep checks every
member first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from launch import checkpoints, data, peak
from launch import config as config_lib
from launch.plan import DEFAULT_MFU
from scaling.errors import UserError
from scaling.fitting import inputs as fitting_inputs

GIB = 2**30
DAY_S = 86_400
# No machine this runs on trains slower than this (FLOP/s); below DAY_S times it, a run
# cannot take a day, so the peak is not measured for it.
SLOWEST_FLOPS = 1e8


def check_run(config) -> data.Corpus:
    """The run's prepared corpus; UserError for the first input that cannot work."""
    shape = config_lib.model_config(config).shape
    corpus = data.prepare_corpus(config.data, shape.vocab_size, progress=config.progress)
    if config.seed < 0:
        raise UserError(f"config.seed={config.seed} must be >= 0")
    if data.windows_per_epoch(len(corpus.train), shape.n_ctx) < 1:
        raise UserError(
            f"the training text has {len(corpus.train)} tokens, fewer than the 2 x "
            f"model.n_ctx = {2 * shape.n_ctx} that training windows need; use a shorter "
            "model.n_ctx or more training text"
        )
    # Building the eval set raises the one-line error that names what is too short.
    data.eval_batches(
        corpus.val, config_lib.eval_batch_counts(config)[1], config.train.batch_size, shape.n_ctx
    )
    check_memory(config, available_memory())
    say_if_slow(config)
    # Checkpoints go to the bucket when there is one (launch/train.py); a gs://
    # bucket has no fixed size to check.
    root = Path(config.launch.bucket) / "runs" if config.launch.bucket else Path(config.workdir)
    if not config.launch.bucket.startswith("gs://"):
        checkpoints.check_disk_space(
            root / config_lib.run_id(config) / "checkpoints", shape.n_params
        )
    return corpus


def memory_floor(config) -> dict[str, int]:
    """A lower bound, in bytes by part, of what one training step holds over all devices.

    Every remat policy keeps each layer's input for the backward pass and works through
    one layer at a time, so the activations counted are those inputs plus one layer's
    working set: its [B, H, L, L] attention scores (XLA's attention; a fused GPU kernel
    keeps none) and MLP hidden layer, and the float32 logits. Weights, gradients and
    AdamW's two moments are in the parameter dtype.
    """
    shape = config_lib.model_config(config).shape
    p = jnp.dtype(config.model.param_dtype).itemsize
    c = jnp.dtype(config.model.compute_dtype).itemsize
    b, n, d, layers = config.train.batch_size, shape.n_ctx, shape.d_model, shape.n_layer
    d_ff = shape.d_ff or 4 * d
    fused = config.model.attention_impl == "cudnn"
    return {
        "weights, gradients, AdamW": 4 * shape.n_params * p,
        "layer inputs": layers * b * n * d * c,
        "one layer's work": (0 if fused else b * shape.n_heads * n * n * c) + b * n * d_ff * c,
        "logits": b * n * shape.vocab_size * 4,
    }


def available_memory() -> int | None:
    """Bytes for training on all devices together: host RAM on CPU, else the devices' limit."""
    one = fitting_inputs.available_memory()  # this host's RAM, or one device's limit
    if one is None:
        return None
    cpu = jax.local_devices()[0].platform == "cpu"
    return one * (jax.process_count() if cpu else jax.device_count())


def check_memory(config, available: int | None) -> None:
    """UserError, in one line, when even the floor of memory_floor exceeds `available`."""
    parts = memory_floor(config)
    need = sum(parts.values())
    if available is None or need <= available:
        return
    largest = max(parts, key=parts.get)
    raise UserError(
        f"this run needs at least {need / GIB:.1f} GiB ({largest} {parts[largest] / GIB:.1f} GiB) "
        f"and the machine has {available / GIB:.1f} GiB; lower model.d_model or model.n_layer, "
        "train.batch_size or model.n_ctx, or train on more devices"
    )


# Runs already warned about in this process: a sweep checks each run before training any,
# and the run checks itself again when it starts.
_SAID_SLOW: set[str] = set()


def say_if_slow(config) -> None:
    """One line on stderr when the run would take more than a day on this machine (once
    per run and process)."""
    if config_lib.run_id(config) in _SAID_SLOW:
        return
    shape = config_lib.model_config(config).shape
    tokens = config.train.steps * config.train.batch_size * shape.n_ctx
    flops = shape.train_flops_per_token * tokens
    if flops < DAY_S * SLOWEST_FLOPS:
        return
    rate = DEFAULT_MFU * peak.matmul_peak_flops(config.model.compute_dtype) * jax.device_count()
    seconds = flops / rate
    if seconds > DAY_S:
        _SAID_SLOW.add(config_lib.run_id(config))
        print(
            f"warning: run {config_lib.run_id(config)} would take about "
            f"{seconds / DAY_S:,.1f} days here ({flops:.2e} FLOPs at {DEFAULT_MFU:.0%} of this "
            f"machine's measured peak, {rate / DEFAULT_MFU / 1e12:.2f} TFLOP/s); "
            "`scaling plan --accelerator` prices it on others",
            file=sys.stderr,
            flush=True,
        )
