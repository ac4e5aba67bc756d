"""The CPU compiler options: the init's cheaper compile gives the same parameters as the
default compile, and the steps' wider vectors the same losses."""

import flax.linen as nn
import jax
import numpy as np

from launch import config as config_lib
from launch import steps
from models import sharding
from models.sizes import ModelShape
from models.transformer import ModelConfig


def _init_leaves(monkeypatch, options):
    monkeypatch.setattr(steps, "INIT_COMPILER_OPTIONS", options)
    model = ModelConfig(ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64))
    tx = steps.make_optimizer(config_lib.base_config().train)
    state, _ = steps.init_state(model, tx, sharding.make_mesh(1, 1, 1), sharding.RULES, seed=3)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_init_compiled_at_level_one_gives_the_default_compiles_bits(monkeypatch):
    assert steps.init_compiler_options() == {"xla_backend_optimization_level": 1}  # on a CPU
    cheap = _init_leaves(monkeypatch, steps.INIT_COMPILER_OPTIONS)
    default = _init_leaves(monkeypatch, None)
    assert all(np.array_equal(a, b) for a, b in zip(cheap, default, strict=True))
    # The options reach the compiler: level 0 (no fused multiply-adds) rounds differently.
    level0 = _init_leaves(monkeypatch, {"xla_backend_optimization_level": 0})
    assert not all(np.array_equal(a, b) for a, b in zip(level0, default, strict=True))


def _losses(monkeypatch, options, n_steps=4):
    monkeypatch.setattr(steps, "STEP_COMPILER_OPTIONS", options)
    model = ModelConfig(ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64))
    mesh, rules = sharding.make_mesh(1, 1, 1), sharding.RULES
    tx = steps.make_optimizer(config_lib.base_config().train)
    state, shardings = steps.init_state(model, tx, mesh, rules, seed=0)
    train_step = steps.compile_train_step(shardings, mesh, rules)
    tokens = np.random.default_rng(0).integers(0, 64, (n_steps, 8, 17)).astype(np.int32)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for batch in tokens:
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["train_loss"]))
    return np.array(losses)


def test_steps_compiled_for_wider_vectors_train_to_the_same_losses(monkeypatch):
    assert steps.step_compiler_options() == {"xla_cpu_prefer_vector_width": "512"}  # on a CPU
    wide = _losses(monkeypatch, steps.STEP_COMPILER_OPTIONS)
    default = _losses(monkeypatch, None)
    assert wide[-1] < wide[0]  # it trains
    np.testing.assert_allclose(wide, default, rtol=1e-5)
