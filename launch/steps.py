"""The pure, jitted pieces of training: optimizer, state init, train and eval steps.

`train_step(state, batch) -> (state, metrics)` and
`eval_step(params, batch) -> summed per-token losses` are pure functions;
`launch/train.py` owns the loop around them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from launch.host_devices import usable_cores
from models import sharding
from models.transformer import ModelConfig, Transformer


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to final_lr_fraction of it."""
    peak = train_cfg.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=train_cfg.warmup_steps,
        decay_steps=train_cfg.steps,
        end_value=peak * train_cfg.final_lr_fraction,
    )


def _decay_mask(params):
    # Weight decay on matrices only (kernels and embeddings), not on biases
    # or norm parameters, as in GPT-2 and nanoGPT. Chosen by name because
    # scan stacks biases into 2-D arrays.
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("kernel") or name.endswith("embed")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW with the schedule above, after global-norm gradient clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(train_cfg),
        b1=train_cfg.b1,
        b2=train_cfg.b2,
        weight_decay=train_cfg.weight_decay,
        mask=_decay_mask,
    )
    if train_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
    return adamw


# Smoothing of the noise scale's numerator and denominator: about the last
# 1/(1 - 0.98) = 50 steps. Both EMAs start at zero and share one bias
# factor, which cancels in their ratio.
NOISE_EMA_DECAY = 0.98


# The init program runs once, and on a CPU it is mostly threefry for every
# parameter: LLVM's first optimisation level compiles it much faster than the
# default (README, Performance) and gives the same bits (tests/test_steps.py
# checks). Level 0 gives different bits (no fused multiply-adds), so not that.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


class TrainState(train_state.TrainState):
    """params, opt_state and step; `apply_fn` and `tx` are static.

    `noise_ema` is {"g2": ..., "trace": ...}, the moving averages of the
    gradient noise scale's two estimates. It is there (zeros) also when the
    noise scale is off, so one checkpoint layout serves both settings.
    """

    noise_ema: dict | None = None


def init_state(model_cfg: ModelConfig, tx, mesh, rules, seed: int):
    """Create the train state already sharded over `mesh` (never whole on one device).

    Returns (state, state_shardings).
    """
    model = Transformer(model_cfg)
    dummy_BxL = jnp.zeros((1, model_cfg.shape.n_ctx), jnp.int32)

    def boxed_init(rng):
        params = model.init(rng, dummy_BxL)["params"]
        # optax mirrors the parameters' logical boxes into its moments, so the
        # optimizer state is sharded exactly like the parameters.
        noise_ema = {"g2": jnp.zeros(()), "trace": jnp.zeros(())}
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx, noise_ema=noise_ema)

    rng = jax.random.key(seed)
    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(boxed_init, rng)
        shardings = sharding.logical_shardings(abstract, mesh, rules)
        state = jax.jit(
            lambda r: nn.unbox(boxed_init(r)),
            out_shardings=shardings,
            compiler_options=init_compiler_options(),
        )(rng)
    return state, shardings


def _on_cpu(options: dict) -> dict | None:
    """`options` on a CPU; elsewhere None, the backend's defaults (they are XLA:CPU's)."""
    return options if jax.default_backend() == "cpu" else None


def init_compiler_options() -> dict | None:
    """`INIT_COMPILER_OPTIONS` on a CPU; elsewhere the backend's defaults."""
    return _on_cpu(INIT_COMPILER_OPTIONS)


# XLA:CPU vectorises the loops it emits itself (the elementwise fusions: GELU,
# LayerNorm's arithmetic, the attention kernel's exp, the optimizer's update)
# for 256-bit registers unless told otherwise, so on a CPU with AVX-512 they run
# at half width (README, Performance). A preference only: CPUs without AVX-512
# ignore it. The init keeps its own options: its bits are checked against them.
STEP_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": "512"}


def step_compiler_options() -> dict | None:
    """`STEP_COMPILER_OPTIONS` on a CPU; elsewhere the backend's defaults."""
    return _on_cpu(STEP_COMPILER_OPTIONS)


def per_token_loss(params, apply_fn, tokens_BxL1):
    """Next-token cross-entropy at every position: [B, L] float32, in nats."""
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    logits_BxLxV = apply_fn({"params": params}, inputs_BxL)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def noise_estimates(g2_small, g2_big, b_small, b_big):
    """Unbiased |G|^2 and tr(Sigma) from squared gradient norms at two batch sizes.

    McCandlish et al. 2018, appendix A (equations A.2 and A.3): E|G_B|^2 =
    |G|^2 + tr(Sigma)/B, solved for the two unknowns from B_small and B_big.
    """
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return g2, trace


def update_noise_ema(ema: dict, g2, trace, decay: float = NOISE_EMA_DECAY) -> dict:
    """Move both averages; B_simple = ema["trace"] / ema["g2"] (the bias factors cancel)."""
    return {
        "g2": decay * ema["g2"] + (1 - decay) * g2,
        "trace": decay * ema["trace"] + (1 - decay) * trace,
    }


def on_each_device(fn, spread, reduce=jax.lax.pmean):
    """`fn(params, tokens) -> tree` as the steps call it; with `spread`, per device.

    `spread` is None (the step is one program over the mesh, XLA's to
    partition) or `(mesh, batch_spec)`, as for a CPU data-parallel mesh
    (`sharding.cpu_data_parallel`): then each device runs `fn` on its own rows
    with the parameters whole, one core's program like a single device's
    (and with its kernels, `ModelConfig.per_device`), and `reduce` combines
    the devices' results. Every device holds the same number of rows, so the
    mean of their mean losses and gradients is the whole batch's.
    """
    if spread is None:
        return fn
    mesh, batch_spec = spread

    def local(params, tokens):
        # A device's own program: no mesh to place its activations on, so the
        # model's sharding constraints (by logical axis rules) are off inside.
        with nn.logical_axis_rules(()):
            flat, unflatten = jax.flatten_util.ravel_pytree(fn(params, tokens))
        # One collective for the whole tree: XLA:CPU runs a collective on a worker
        # thread that waits there for every device, so separate ones could occupy
        # all of the threads at once (launch/host_devices.py sizes the pool).
        return unflatten(reduce(flat, mesh.axis_names))

    # The CPU kernels' custom backward passes return gradients that vary over the
    # devices for parameters that do not; the reduction above makes them equal, so
    # the check for that is off.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(), batch_spec), out_specs=P(), check_vma=False
    )


# On one CPU core, a narrow model's step takes a device's rows in microbatches
# whose residual stream ([tokens, d_model], float32) is at most this many
# bytes: a layer's dozen-odd activations of about that size then stay in the
# core's caches from one pass over them to the next, where a whole batch's
# go out to memory and back (README, Performance, (17))...
MICROBATCH_MAX_BYTES = 192 << 10
# ...and of at least this many tokens: shorter, the products run slower than
# the caches save (d_model 256 in microbatches of 128 tokens: 0.87 of the whole).
MICROBATCH_MIN_TOKENS = 256


def auto_microbatches(model_cfg: ModelConfig, rows: int, noise_scale: bool, cores=None) -> int:
    """train.microbatches=0: how many microbatches the step takes a device's `rows` in.

    More than one only for one CPU device's program (`ModelConfig.single_cpu`)
    in a process on one core, as a parallel sweep pins each member: with two
    cores, XLA splits each op over both, and microbatches' smaller ops
    measured slower there. Then the fewest microbatches (even ones, with
    `noise_scale`: see `two_microbatch_grads`) within MICROBATCH_MAX_BYTES,
    if they keep MICROBATCH_MIN_TOKENS; else one.
    """
    cores = len(usable_cores()) if cores is None else cores
    if not model_cfg.single_cpu or cores != 1:
        return 1
    n_ctx, d_model = model_cfg.shape.n_ctx, model_cfg.shape.d_model
    for n in range(1, rows + 1):
        if _microbatch_problem(n, rows, noise_scale):
            continue
        tokens = rows // n * n_ctx
        if tokens * d_model * 4 <= MICROBATCH_MAX_BYTES:
            return n if tokens >= MICROBATCH_MIN_TOKENS else 1
    return 1


def _microbatch_problem(n: int, rows: int, noise_scale: bool) -> str | None:
    """Why the steps cannot take a device's `rows` in `n` microbatches; None if they can."""
    if n < 1 or rows % n:
        return (
            f"train.microbatches={n} must divide the {rows} rows each device takes a step "
            "(train.batch_size over the data-parallel devices); use a divisor, or 0 to choose"
        )
    if noise_scale and n > 1 and n % 2:
        return (
            f"train.microbatches={n} must be even with train.noise_scale (each half-batch "
            "takes half of them); use an even number, or 0 to choose"
        )
    return None


def microbatches_for(requested: int, model_cfg: ModelConfig, rows: int, noise_scale: bool) -> int:
    """train.microbatches as the steps take it: `requested`, or 0 by `auto_microbatches`.

    Raises ValueError, naming the fix, for a count the rows do not split into.
    """
    n = requested or auto_microbatches(model_cfg, rows, noise_scale)
    problem = _microbatch_problem(n, rows, noise_scale)
    if problem:
        raise ValueError(problem)
    return n


def microbatched(grad_fn, n: int):
    """`grad_fn(params, tokens) -> (loss, grads)` over `n` microbatches of the rows, in turn.

    Microbatch i takes rows i, i + n, i + 2n, ...; the mean of the
    equal-sized microbatches' mean losses and gradients is the rows' own,
    summed in float32 whatever the parameters' dtype. A loop, so that only
    one microbatch's activations are live at a time (`auto_microbatches`
    says when that is faster, and it always takes less memory).
    """
    if n == 1:
        return grad_fn

    def accumulated(params, tokens_BxL1):
        micro_NxMxL1 = tokens_BxL1.reshape(-1, n, tokens_BxL1.shape[-1]).swapaxes(0, 1)

        def add(sums, micro_MxL1):
            parts = grad_fn(params, micro_MxL1)
            return jax.tree.map(lambda s, x: s + x.astype(jnp.float32), sums, parts), None

        zeros = jax.tree.map(
            lambda p: jnp.zeros_like(p, jnp.float32), (jnp.zeros((), jnp.float32), params)
        )
        (loss, grads), _ = jax.lax.scan(add, zeros, micro_NxMxL1)
        return loss / n, jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)

    return accumulated


def two_microbatch_grads(loss_fn, params, batch_Bx, spread=None, microbatches=1):
    """Loss and gradient of the full batch, from two halves, and the squared norms.

    Rows 0, 2, 4, ... form one half and 1, 3, 5, ... the other: each device
    splits its own (even number of) rows, so no row moves between devices.
    The full-batch gradient is the mean of the halves' (equal-sized means).
    With `microbatches` (even) each half is taken in half of them, one half after the other.
    Returns (loss, grads, |G_small|^2 (mean over the halves), |G_big|^2).
    """

    def halves(params, batch_Bx):
        halves_Hx2 = batch_Bx.reshape(batch_Bx.shape[0] // 2, 2, *batch_Bx.shape[1:])
        if microbatches == 1:
            return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 1))(params, halves_Hx2)
        half_grads = microbatched(jax.value_and_grad(loss_fn), microbatches // 2)
        return jax.lax.map(lambda half: half_grads(params, half), halves_Hx2.swapaxes(0, 1))

    losses_2, grads_2 = on_each_device(halves, spread)(params, batch_Bx)
    grads = jax.tree.map(lambda g: g.mean(axis=0), grads_2)
    squares_2 = sum(
        jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
        for g in jax.tree.leaves(grads_2)
    )
    return losses_2.mean(), grads, squares_2.mean(), optax.tree.norm(grads, squared=True)


def train_step(
    state: TrainState, tokens_BxL1, noise_scale: bool = True, spread=None, microbatches: int = 1
):
    """One optimizer step on a batch of B sequences of L+1 tokens.

    With `noise_scale` (static), the step also measures the gradient noise
    scale B_simple = tr(Sigma) / |G|^2, in tokens, from the batch's two halves.
    `spread` (static): how the gradients are taken over the devices (`on_each_device`).
    `microbatches` (static): how many parts each device's rows are taken in (`microbatched`).
    """

    def loss_fn(params, tokens):
        return per_token_loss(params, state.apply_fn, tokens).mean()

    if not noise_scale:
        loss_and_grads = on_each_device(
            microbatched(jax.value_and_grad(loss_fn), microbatches), spread
        )
        loss, grads = loss_and_grads(state.params, tokens_BxL1)
        state = state.apply_gradients(grads=grads)
        return state, {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}

    loss, grads, g2_small, g2_big = two_microbatch_grads(
        loss_fn, state.params, tokens_BxL1, spread, microbatches
    )
    batch, length = tokens_BxL1.shape[0], tokens_BxL1.shape[1] - 1
    # Batch sizes in tokens, so the noise scale is in tokens too.
    g2, trace = noise_estimates(g2_small, g2_big, batch // 2 * length, batch * length)
    ema = update_noise_ema(state.noise_ema, g2, trace)
    state = state.apply_gradients(grads=grads, noise_ema=ema)
    return state, {
        "train_loss": loss,
        "grad_norm": jnp.sqrt(g2_big),
        "noise_scale": ema["trace"] / ema["g2"],
    }


def eval_step(params, tokens_BxL1, apply_fn, spread=None):
    """Per-token losses and their squares, summed over the batch: [2, L] float32.

    Divided by the sequence count they are each position's mean loss and mean
    square, from which its standard error follows (`per_token_mean_and_stderr`).
    """

    def sums(params, tokens_BxL1):
        losses_BxL = per_token_loss(params, apply_fn, tokens_BxL1)
        return jnp.stack([losses_BxL.sum(axis=0), jnp.square(losses_BxL).sum(axis=0)])

    return on_each_device(sums, spread, reduce=jax.lax.psum)(params, tokens_BxL1)


def per_token_mean_and_stderr(sums_2xL, n_sequences: int):
    """Each position's mean loss over `n_sequences` and the standard error of that mean."""
    sums_2xL = np.asarray(sums_2xL, np.float64)
    mean_L = sums_2xL[0] / n_sequences
    variance_L = np.maximum(sums_2xL[1] / n_sequences - mean_L**2, 0.0)
    if n_sequences < 2:
        return mean_L, np.full_like(mean_L, np.nan)
    return mean_L, np.sqrt(variance_L / (n_sequences - 1))


def model_for_mesh(model_cfg: ModelConfig, mesh) -> ModelConfig:
    """`model_cfg` as the steps run it on `mesh`: per device on a CPU data-parallel one
    (`sharding.cpu_data_parallel`), as it is elsewhere."""
    if sharding.cpu_data_parallel(mesh):
        return dataclasses.replace(model_cfg, per_device=True)
    return model_cfg


def spread_for(mesh, rules, per_device: bool):
    """`on_each_device`'s `spread`: with `per_device` over several devices, the mesh and
    the batch's spec; None (nothing to spread) on one device."""
    if not per_device or mesh.size == 1:
        return None
    return mesh, sharding.batch_sharding(mesh, rules).spec


def compile_train_step(
    state_shardings,
    mesh,
    rules,
    noise_scale: bool = True,
    per_device: bool = False,
    microbatches: int = 1,
):
    """jit the train step with its shardings; the train state is donated (updated in place).

    `per_device`: each device takes the gradient of its own rows (`on_each_device`),
    for a model built to run that way (`ModelConfig.per_device`). `microbatches`:
    how many parts each device's rows are taken in (`microbatched`).
    """
    return jax.jit(
        functools.partial(
            train_step,
            noise_scale=noise_scale,
            spread=spread_for(mesh, rules, per_device),
            microbatches=microbatches,
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, rules)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )


def compile_steps(
    state_shardings,
    mesh,
    rules,
    apply_fn,
    noise_scale: bool = True,
    per_device: bool = False,
    microbatches: int = 1,
):
    """jit the train step (`compile_train_step`) and the per-token eval step."""
    batch = sharding.batch_sharding(mesh, rules)
    replicated = sharding.replicated(mesh)
    jitted_train = compile_train_step(
        state_shardings, mesh, rules, noise_scale, per_device, microbatches
    )
    jitted_eval = jax.jit(
        functools.partial(eval_step, apply_fn=apply_fn, spread=spread_for(mesh, rules, per_device)),
        in_shardings=(state_shardings.params, batch),
        out_shardings=replicated,
        compiler_options=step_compiler_options(),
    )
    return jitted_train, jitted_eval
