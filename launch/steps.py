"""The pure, jitted pieces of training: optimizer, state init, train and eval steps.

`train_step(state, batch) -> (state, metrics)` and
`eval_step(params, batch) -> summed per-token losses` are pure functions;
`launch/train.py` owns the loop around them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

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


class TrainState(train_state.TrainState):
    """params, opt_state and step; `apply_fn` and `tx` are static."""


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
        return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    rng = jax.random.key(seed)
    with nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(boxed_init, rng)
        shardings = sharding.logical_shardings(abstract, mesh, rules)
        state = jax.jit(lambda r: nn.unbox(boxed_init(r)), out_shardings=shardings)(rng)
    return state, shardings


def per_token_loss(params, apply_fn, tokens_BxL1):
    """Next-token cross-entropy at every position: [B, L] float32, in nats."""
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    logits_BxLxV = apply_fn({"params": params}, inputs_BxL)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def train_step(state: TrainState, tokens_BxL1):
    """One optimizer step on a batch of B sequences of L+1 tokens."""

    def loss_fn(params):
        return per_token_loss(params, state.apply_fn, tokens_BxL1).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads=grads)
    return state, {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, tokens_BxL1, apply_fn):
    """Per-token losses summed over the batch: [L] float32 (divide by the sequence count)."""
    return per_token_loss(params, apply_fn, tokens_BxL1).sum(axis=0)


def compile_steps(state_shardings, mesh, rules, apply_fn):
    """jit the steps with their shardings; the train state is donated (updated in place)."""
    batch = sharding.batch_sharding(mesh, rules)
    replicated = sharding.replicated(mesh)
    jitted_train = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    jitted_eval = jax.jit(
        functools.partial(eval_step, apply_fn=apply_fn),
        in_shardings=(state_shardings.params, batch),
        out_shardings=replicated,
    )
    return jitted_train, jitted_eval
