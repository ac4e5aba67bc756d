"""The init program's cheaper compile gives the same parameters as the default compile."""

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
