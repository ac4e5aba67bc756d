"""Configs as data: the defaults, loading a study file, overrides, validation, run ids.

A study file (`experiments/*.py`) exposes `get_config(arg=None)`, which
starts from `base_config()` and changes what the study needs, and
`get_sweep(arg=None)`, a list of override dicts, one per member. Overrides
from the command line use the `--config.path.to.key=value` convention and
are typed by the key they replace. Validation happens here, once, and every
error names the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import ml_collections

from launch.backends.settings import launch_defaults, validate_launch
from launch.data import default_data_config
from launch.preemption import signal_of
from models.sizes import ModelShape
from models.transformer import ModelConfig
from scaling.errors import UserError
from scaling.store import DEFAULT_STORE, check_sweep_name

# Keys that say where results go, how they are shown, where and how fast the
# work runs, or what is measured on the side, not what is trained: they are
# left out of the run id, so moving a store, turning off progress bars,
# unrolling the layer loop or recomputing activations (model.remat) does not
# make a finished run look new. (train.noise_scale only measures: its two
# half-batch gradients average to the same update, as train.microbatches'
# parts do; train.nan_check_every only changes how soon a diverging run
# stops; train.preemption_signal only when it stops to be resumed;
# data.read_threads only how many of the same reads are in flight.)
NON_IDENTITY_KEYS = (
    "store",
    "workdir",
    "sweep_name",
    "progress",
    "data.cache_dir",
    "data.read_threads",
    "mesh",
    "launch",
    "train.nan_check_every",
    "train.noise_scale",
    "train.noise_scale_every",
    "train.preemption_signal",
    "train.microbatches",
    "model.scan_unroll",
    "model.remat",
)


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds parameter init and the data order
    c.sweep_name = ""  # "" = the study file's name
    c.store = DEFAULT_STORE  # path of the SQLite results store
    c.workdir = "results/runs"  # checkpoints and run files, one folder per run id
    c.progress = True  # progress bars and lines on stderr

    c.model = ml_collections.ConfigDict()
    c.model.n_layer = 2
    c.model.d_model = 64
    c.model.n_heads = 2
    c.model.n_ctx = 128  # context length, tokens
    c.model.vocab_size = 256  # 256 for the byte tokenizer
    c.model.d_ff = 0  # MLP width; 0 = 4 * d_model
    c.model.param_dtype = "float32"  # float32 | bfloat16
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (use bfloat16 on TPU/GPU)
    # auto | none | full | dots | dots_no_batch: what the scanned blocks keep for
    # the backward pass (auto: matmul outputs while the layer loop is rolled, else all).
    c.model.remat = "auto"
    # auto: cuDNN's fused attention on a GPU in half precision, else XLA's.
    c.model.attention_impl = "auto"  # auto | xla | cudnn (jax.nn.dot_product_attention)
    # Layers per iteration of the scanned layer loop: 0 unrolls models of up
    # to 4 layers (faster steps) and keeps deeper ones rolled (flat compile time).
    c.model.scan_unroll = 0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200  # optimizer steps
    c.train.batch_size = 16  # sequences per step (global, over all devices)
    c.train.learning_rate = 3e-3  # peak learning rate
    c.train.warmup_steps = 20  # linear warmup from 0, then cosine decay
    c.train.final_lr_fraction = 0.1  # cosine decays to this fraction of the peak
    c.train.weight_decay = 0.1  # AdamW, on kernels and embeddings only
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.grad_clip = 1.0  # global-norm clipping; 0 = off
    # Every this many steps, the train losses of the previous this many steps
    # are fetched (computed by then, so no stall) and a NaN/inf stops the run:
    # divergence is caught within 2 x this many steps.
    c.train.nan_check_every = 10
    # Measure the gradient noise scale (metric noise_scale, tokens) from two half-batches,
    # on every noise_scale_every-th step (the others skip the split: it costs ~5% a step).
    c.train.noise_scale = True
    c.train.noise_scale_every = 4
    # Take each device's rows in this many microbatches, one after another, and
    # average their gradients: the same update in less memory. 0 = by shape: on
    # one CPU core (a parallel sweep's member) as many as keep a narrow model's
    # activations in the core's caches (launch/steps.auto_microbatches), else 1.
    c.train.microbatches = 0
    # SIGTERM is always a preemption notice (save at the next step, exit 143, resume
    # later; launch/preemption.py); this names one more, e.g. "SIGUSR1" for Slurm's
    # --signal=B:USR1@120.
    c.train.preemption_signal = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.batches = 4  # held-out batches (of train.batch_size sequences) per eval
    # Held-out batches of the last eval, which the fits of final and per-token
    # losses read; 0 = eval.batches. The evals before it use the first
    # eval.batches of them (each batch spans the whole held-out text).
    c.eval.final_batches = 0
    c.eval.points = 16  # log-spaced eval steps (plus the last step)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # save every this many steps, and at the end
    c.checkpoint.max_to_keep = 2

    c.data = default_data_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices along the data-parallel axis; -1 = the rest
    c.mesh.fsdp = 1  # parameter (ZeRO-3) sharding
    c.mesh.tensor = 1  # tensor (model) parallelism
    c.mesh.rules = ""  # JSON overrides of models/sharding.RULES, e.g. '{"embed": null}'
    # A CPU run in one process as one device per core, data parallel
    # (launch/host_devices.py); off: one device that splits each op over the cores.
    c.mesh.cpu_per_core = False

    c.launch = launch_defaults()  # where runs go: local, Cloud TPU (gcloud), GKE (xpk)
    return c


def load_study(path: str):
    """Import a study file; `path[:arg]` passes arg to get_config/get_sweep."""
    file, _, arg = str(path).partition(":")
    file_path = Path(file)
    if not file_path.is_file():
        raise UserError(
            f"config file {file!r} does not exist; give a path like experiments/local_cpu.py"
        )
    spec = importlib.util.spec_from_file_location(f"study_{file_path.stem}", file_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the study file's own error, said in one line
        raise UserError(f"study file {file!r} failed to load: {_where(e, file_path)}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {file!r} has no get_config(); see experiments/local_cpu.py")
    return module, (arg or None), file_path.stem


def _call(fn, arg):
    """A study function's result; its own exception becomes one line naming it."""
    try:
        return fn(arg) if arg is not None else fn()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the study file's own error, said in one line
        file = Path(fn.__code__.co_filename)
        raise UserError(
            f"{fn.__name__}({'' if arg is None else repr(arg)}) of {str(file)!r} "
            f"failed: {_where(e, file)}"
        ) from None


def _where(error: Exception, file: Path) -> str:
    """`Type: message (line N)`, the line being the study file's last in the traceback."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    frame = error.__traceback__
    while frame is not None:
        if Path(frame.tb_frame.f_code.co_filename) == file:
            line = frame.tb_lineno
        frame = frame.tb_next
    return f"{type(error).__name__}: {error}" + (f" (line {line})" if line else "")


def _study_base(module, arg, stem: str):
    """get_config(arg), its sweep named after the study file unless it names one."""
    config = _call(module.get_config, arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(
            f"get_config() of {stem!r} returned a {type(config).__name__}; it must "
            "return a ConfigDict (start from launch.config.base_config())"
        )
    if not config.sweep_name:
        config.sweep_name = stem
    return config


def study_config(path: str, overrides: dict[str, str] | None = None) -> ml_collections.ConfigDict:
    """get_config() of a study file with command-line overrides applied and validated."""
    module, arg, stem = load_study(path)
    config = _study_base(module, arg, stem)
    apply_overrides(config, overrides or {})
    validate(config)
    return config


def study_sweep(path: str, overrides: dict[str, str] | None = None):
    """The members of a study's sweep: one validated config per get_sweep() entry.

    Command-line overrides apply to every member, after the member's own.
    """
    module, arg, stem = load_study(path)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"config file {path!r} has no get_sweep(); use `scaling run` for one run")
    sweep = _call(module.get_sweep, arg)
    if (
        not isinstance(sweep, list | tuple)
        or not sweep
        or not all(isinstance(m, dict) for m in sweep)
    ):
        raise UserError(
            f"get_sweep() of {path!r} returned {str(sweep)[:60]!r}; it must return "
            "a non-empty list of dicts of overrides, one per member"
        )
    members = []
    for i, member in enumerate(sweep):
        config = _study_base(module, arg, stem)
        apply_overrides(config, member, where=f"get_sweep() member {i}")
        apply_overrides(config, overrides or {})
        validate(config)
        members.append(config)
    ids = [run_id(c) for c in members]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(
            f"sweep members collide on run id {duplicates}: two members train the "
            "same config; make every member of get_sweep() differ"
        )
    return members


def apply_overrides(config, overrides: dict, where: str = "command line"):
    """Set dotted keys; a string value is parsed as the type of the key it replaces."""
    for key, value in overrides.items():
        parent, leaf = _lookup_parent(config, key, where)
        current = parent[leaf]
        try:
            parent[leaf] = _coerce(value, type(current))
        except (TypeError, ValueError):
            raise UserError(
                f"{where}: config.{key}={value!r} is not a valid {type(current).__name__}"
            ) from None


def _lookup_parent(config, key: str, where: str):
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(parts[:depth])
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise UserError(
                f"{where}: unknown config key {key!r}; keys under "
                f"{prefix or 'config'!r}: {', '.join(known)}"
            )
        if depth < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise UserError(f"{where}: config key {key!r} is a group; set one of its keys")
    return node, parts[-1]


def _coerce(value, kind):
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is bool and not isinstance(value, bool):
            raise TypeError
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError
        if kind is str and not isinstance(value, str):
            raise TypeError
        return value
    if kind is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError
    if kind is int:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    return kind(value)


# Step and eval counts beyond this are typos (Kaplan's longest runs took 2.5e5
# steps); far past it, eval schedules and eval sets would not fit in memory.
MAX_COUNT = 10_000_000


def validate(config):
    """Raise UserError for the first thing that is wrong, naming the key."""
    if config.sweep_name:  # "" = the study file's name, filled in when a study loads
        check_sweep_name(config.sweep_name)
    model_config(config)
    positive = (
        "train.steps",
        "train.batch_size",
        "train.nan_check_every",
        "train.noise_scale_every",
        "eval.batches",
        "eval.points",
        "checkpoint.every",
        "checkpoint.max_to_keep",
    )
    for key in positive:
        group, leaf = key.split(".")
        if config[group][leaf] <= 0:
            raise UserError(f"config.{key}={config[group][leaf]} must be positive")
    signal_of(config.train.preemption_signal)
    if config.train.microbatches < 0:
        raise UserError(
            f"config.train.microbatches={config.train.microbatches} must be 0 "
            "(chosen by shape) or more"
        )
    if config.eval.final_batches < 0:
        raise UserError(
            f"config.eval.final_batches={config.eval.final_batches} must be 0 "
            "(the same as eval.batches) or more"
        )
    if not (config.train.learning_rate > 0 and math.isfinite(config.train.learning_rate)):
        raise UserError(
            f"config.train.learning_rate={config.train.learning_rate} must be a finite number > 0"
        )
    for key in ("train.steps", "eval.points", "eval.batches", "eval.final_batches"):
        group, leaf = key.split(".")
        if config[group][leaf] > MAX_COUNT:
            raise UserError(
                f"config.{key}={config[group][leaf]:,} is more than "
                f"{MAX_COUNT:,}; no study here needs that many (a typo?)"
            )
    if not 0 <= config.train.warmup_steps < config.train.steps:
        raise UserError(
            f"config.train.warmup_steps={config.train.warmup_steps} must be in "
            f"[0, train.steps={config.train.steps})"
        )
    if not 0 <= config.train.final_lr_fraction <= 1:
        raise UserError("config.train.final_lr_fraction must be in [0, 1]")
    if config.data.tokenizer == "byte" and config.model.vocab_size < 256:
        raise UserError(
            f"config.model.vocab_size={config.model.vocab_size} is too small for "
            "the byte tokenizer; use 256 or more"
        )
    if not config.store:
        raise UserError("config.store is empty; give the path of the SQLite results store")
    validate_launch(config.launch)


def eval_batch_counts(config) -> tuple[int, int]:
    """(batches of every eval, batches of the last eval); the first are a prefix of the second."""
    final = max(config.eval.batches, config.eval.final_batches)
    return config.eval.batches, final


def model_config(config) -> ModelConfig:
    m = config.model
    try:
        shape = ModelShape(
            n_layer=m.n_layer,
            d_model=m.d_model,
            n_heads=m.n_heads,
            n_ctx=m.n_ctx,
            vocab_size=m.vocab_size,
            d_ff=m.d_ff,
        )
        return ModelConfig(
            shape,
            param_dtype=m.param_dtype,
            compute_dtype=m.compute_dtype,
            remat=m.remat,
            attention_impl=m.attention_impl,
            scan_unroll=m.scan_unroll,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def identity(config) -> dict:
    """The resolved config without the keys that do not change what is trained."""
    resolved = config.to_dict()
    for key in NON_IDENTITY_KEYS:
        node = resolved
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return resolved


def run_id(config) -> str:
    """A short hash of the resolved config: the same training gets the same id."""
    blob = json.dumps(identity(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
