"""The CPU compiler options: the init's cheaper compile gives the same parameters as the
default compile, and the steps' wider vectors the same losses. Microbatches: the same
update as the whole batch, and how many the step takes by shape and cores."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from launch import config as config_lib
from launch import steps, train
from models import sharding
from models.sizes import ModelShape
from models.transformer import ModelConfig
from scaling.errors import UserError


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


def _train(microbatches: int, noise_scale: bool, n_steps=3):
    """Params, losses, grad norms and noise-scale averages after a few steps on 8 rows."""
    model = ModelConfig(ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64))
    mesh, rules = sharding.make_mesh(1, 1, 1), sharding.RULES
    tx = steps.make_optimizer(config_lib.base_config().train)
    state, shardings = steps.init_state(model, tx, mesh, rules, seed=0)
    train_step = steps.compile_train_step(
        shardings, mesh, rules, noise_scale, microbatches=microbatches
    )
    tokens = np.random.default_rng(1).integers(0, 64, (n_steps, 8, 17)).astype(np.int32)
    metrics = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for batch in tokens:
            state, m = train_step(state, batch)
            metrics.append({k: float(v) for k, v in m.items()})
    return state, metrics


@pytest.mark.parametrize("noise_scale", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_microbatches_take_the_same_step_as_the_whole_batch(noise_scale):
    whole, whole_metrics = _train(1, noise_scale)
    for n in (2, 8):
        parts, parts_metrics = _train(n, noise_scale)
        for a, b in zip(whole_metrics, parts_metrics, strict=True):
            assert a.keys() == b.keys()
            for key in a:  # the noise scale is a difference of near-equal sums: looser
                np.testing.assert_allclose(
                    b[key], a[key], rtol=1e-3 if key == "noise_scale" else 1e-5
                )
        for a, b in zip(*(jax.tree.leaves(s.params) for s in (whole, parts)), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert whole_metrics[-1]["train_loss"] < whole_metrics[0]["train_loss"]  # it trains


def test_each_microbatch_takes_every_nth_row_and_the_mean_is_the_batchs():
    seen = []

    def loss_and_grad(p, rows):
        seen.append(rows.shape)
        return (p * rows).mean(), jax.numpy.mean(rows)

    rows = jax.numpy.arange(12.0).reshape(12, 1)
    loss, grad = steps.microbatched(loss_and_grad, 3)(jax.numpy.float32(2.0), rows)
    assert seen == [(4, 1)]  # traced once, for a loop over three microbatches of 4 rows
    np.testing.assert_allclose([float(loss), float(grad)], [2 * 5.5, 5.5])
    # Rows i, i + 3, i + 6, i + 9 form microbatch i, so its largest row is 9 + i
    # (in blocks of 4 rows, the largest would be 3, 7 and 11).
    _, largest = steps.microbatched(lambda p, r: (p, r[:, 0].max()), 3)(jax.numpy.float32(1), rows)
    np.testing.assert_allclose(float(largest), (9 + 10 + 11) / 3)

    # Sums in float32, returned in the parameters' dtype. Gradients 1, 2^-8 and 2^-8 in
    # bfloat16 (8 bits): summed in bfloat16, 1 + 2^-8 rounds back to 1 twice (a mean of
    # 171/512); in float32 the sum is 1 + 2^-7, a mean of 172/512.
    def bf16_grad(p, r):
        return r.sum(), jax.numpy.where(r[0, 0] == 0, 1.0, 2.0**-8).astype(p.dtype)

    _, mean = steps.microbatched(bf16_grad, 3)(jax.numpy.ones((), jax.numpy.bfloat16), rows)
    assert mean.dtype == jax.numpy.bfloat16 and float(mean) == 172 / 512


def _model(d_model, n_layer, n_ctx=128):
    shape = ModelShape(
        n_layer=n_layer, d_model=d_model, n_heads=d_model // 16, n_ctx=n_ctx, vocab_size=256
    )
    return ModelConfig(shape)


def test_microbatches_by_shape_on_one_core_and_never_on_two():
    # The local study's sizes, 16 rows of 128 tokens: residual streams up to 192 KiB.
    by_width = {
        d: steps.auto_microbatches(_model(d, 2), 16, True, cores=1) for d in (16, 32, 48, 64, 96)
    }
    assert by_width == {16: 1, 32: 2, 48: 2, 64: 4, 96: 4}
    for d, n in by_width.items():
        assert 16 // n * 128 * d * 4 <= steps.MICROBATCH_MAX_BYTES
    # Wider, microbatches of 2 rows (256 tokens) down to d_model 192; at 256 they would
    # be 1 row, shorter than MICROBATCH_MIN_TOKENS, so the batch stays whole.
    wide = [steps.auto_microbatches(_model(d, 2), 32, True, cores=1) for d in (128, 192, 256)]
    assert wide == [16, 16, 1]
    # Two cores share each op; an odd count would split the noise scale's halves.
    assert steps.auto_microbatches(_model(96, 4), 16, True, cores=2) == 1
    assert steps.auto_microbatches(_model(96, 4), 12, False, cores=1) == 3
    assert steps.auto_microbatches(_model(96, 4), 12, True, cores=1) == 4
    # A long context whose single row is over the budget: whole.
    assert steps.auto_microbatches(_model(96, 4, n_ctx=1024), 16, True, cores=1) == 1


def test_the_trainers_model_takes_microbatches_in_a_process_pinned_to_one_core(monkeypatch):
    mesh = sharding.run_mesh(-1, 1, 1, 16, even_rows=True)
    model = steps.model_for_mesh(_model(96, 4), mesh)  # as launch/train.py builds it
    monkeypatch.setattr(steps, "usable_cores", lambda: [1])
    assert steps.auto_microbatches(model, 16, noise_scale=True) == 4
    monkeypatch.setattr(steps, "usable_cores", lambda: [0, 1])
    assert steps.auto_microbatches(model, 16, noise_scale=True) == 1


@pytest.mark.parametrize(
    ("microbatches", "message"),
    [(3, "must divide the 8 rows"), (16, "must divide the 8 rows"), (1, None), (8, None)],
)
def test_microbatches_that_do_not_split_the_rows_are_refused(microbatches, message):
    model = _model(32, 2)
    if message is None:
        assert steps.microbatches_for(microbatches, model, 8, noise_scale=True) == microbatches
        return
    with pytest.raises(ValueError, match=message):
        steps.microbatches_for(microbatches, model, 8, noise_scale=False)


def test_an_odd_count_with_the_noise_scale_is_one_line_before_training(tiny_config):
    tiny_config.train.batch_size = 6
    tiny_config.train.microbatches = 3
    with pytest.raises(UserError, match="train.microbatches=3 must be even with train.noise_scale"):
        train.train_and_evaluate(tiny_config)
