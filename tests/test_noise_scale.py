"""The gradient noise scale: McCandlish's estimators on a problem with known answers, and
the trainer logging it without changing what is trained."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_tensorboard import read_scalars

from launch import config as config_lib
from launch import steps, train
from models import sharding
from models.sizes import ModelShape
from models.transformer import ModelConfig
from scaling.store import Store


def test_estimator_recovers_the_noise_scale_of_a_linear_regression():
    # y = x.w* + eps, x ~ N(0, I_d), eps ~ N(0, s^2); per-example loss (x.w - y)^2 / 2.
    # At w = w* + delta the per-example gradient is x (x.delta - eps), so
    # |G|^2 = |delta|^2 and tr(Sigma) = E|g|^2 - |G|^2 = (d + 1)|delta|^2 + d s^2.
    d, sigma, batch = 8, 1.5, 64
    delta = jnp.linspace(-0.5, 0.5, d)
    w_star = jnp.ones(d)
    params = {"w": w_star + delta}
    true_g2 = float(jnp.sum(delta**2))
    true_trace = (d + 1) * true_g2 + d * sigma**2

    def loss_fn(p, xy_Bx):
        x_BxD, y_B = xy_Bx[:, :d], xy_Bx[:, d]
        return 0.5 * jnp.mean((x_BxD @ p["w"] - y_B) ** 2)

    def one_batch(ema, key):
        kx, ke = jax.random.split(key)
        x_BxD = jax.random.normal(kx, (batch, d))
        y_B = x_BxD @ w_star + sigma * jax.random.normal(ke, (batch,))
        xy_Bx = jnp.concatenate([x_BxD, y_B[:, None]], axis=1)
        _, grads, g2_small, g2_big = steps.two_microbatch_grads(loss_fn, params, xy_Bx)
        # The update uses the full-batch gradient.
        full = jax.grad(loss_fn)(params, xy_Bx)
        g2, trace = steps.noise_estimates(g2_small, g2_big, batch // 2, batch)
        return steps.update_noise_ema(ema, g2, trace, decay=0.999), (grads["w"] - full["w"])

    zero = {"g2": jnp.zeros(()), "trace": jnp.zeros(())}
    ema, grad_gap = jax.lax.scan(one_batch, zero, jax.random.split(jax.random.key(0), 5000))
    assert float(jnp.abs(grad_gap).max()) < 1e-5
    estimate = float(ema["trace"] / ema["g2"])
    truth = true_trace / true_g2
    assert abs(estimate / truth - 1) < 0.10, (estimate, truth)
    # Each estimate alone is unbiased, not only their ratio.
    assert abs(float(ema["g2"]) / (1 - 0.999**5000) / true_g2 - 1) < 0.15


def test_two_halves_take_alternate_rows():
    rows = jnp.arange(12.0).reshape(6, 2)
    _, _, g2_small, g2_big = steps.two_microbatch_grads(
        lambda p, xy: p * xy[:, 0].mean(), jnp.float32(1.0), rows
    )
    # Halves are rows {0, 2, 4} and {1, 3, 5}: means of column 0 are 4 and 6.
    np.testing.assert_allclose(float(g2_small), (4.0**2 + 6.0**2) / 2)
    np.testing.assert_allclose(float(g2_big), 5.0**2)


@pytest.mark.slow  # two full training runs
def test_trainer_logs_noise_scale_without_changing_the_run(tiny_config, tmp_path):
    on = train.train_and_evaluate(tiny_config)
    off_config = config_lib.base_config()
    off_config.update(tiny_config)
    off_config.train.noise_scale = False
    off_config.store = str(tmp_path / "off.sqlite")
    off_config.workdir = str(tmp_path / "off_runs")
    assert config_lib.run_id(off_config) == on  # the switch only measures
    train.train_and_evaluate(off_config)
    with Store(tiny_config.store) as store:
        steps_on, noise = store.scalars(on, "noise_scale")
        _, loss_on = store.scalars(on, "eval_loss")
        assert len(steps_on) == len(store.scalars(on, "eval_loss")[0])
        assert np.isfinite(noise).all() and noise[-1] > 0
    board = read_scalars(Path(tiny_config.workdir) / on / "tensorboard")
    np.testing.assert_allclose([v for _, v in board["noise_scale"]], noise, rtol=1e-6)
    with Store(off_config.store) as store:
        assert "noise_scale" not in store.metric_names(on)
        _, loss_off = store.scalars(on, "eval_loss")
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-4)


@pytest.mark.slow
def test_a_step_that_does_not_measure_leaves_the_averages_and_takes_the_same_update():
    # The loop measures on every train.noise_scale_every-th step only.
    model = ModelConfig(ModelShape(n_layer=1, d_model=32, n_heads=2, n_ctx=16, vocab_size=64))
    mesh, rules = sharding.make_mesh(1, 1, 1), sharding.RULES
    tokens = np.random.default_rng(0).integers(0, 64, (4, 8, 17)).astype(np.int32)

    def run(schedule):
        tx = steps.make_optimizer(config_lib.base_config().train)
        state, shardings = steps.init_state(model, tx, mesh, rules, seed=0)
        step = {
            m: steps.compile_train_step(shardings, mesh, rules, noise_scale=m)
            for m in (False, True)
        }
        traces = []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for measure, batch in zip(schedule, tokens, strict=True):
                state, _ = step[measure](state, batch)
                traces.append(float(state.noise_ema["trace"]))
        return state, traces

    every, traces_every = run([True] * 4)
    alternate, traces = run([True, False, True, False])
    never, traces_never = run([False] * 4)
    assert traces_never == [0.0] * 4
    assert traces[0] == traces_every[0] != 0 and traces[1] == traces[0]
    assert traces[2] != traces[1] and traces[3] == traces[2]
    for a, b, c in zip(
        *(jax.tree.leaves(s.params) for s in (every, alternate, never)), strict=True
    ):
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(b, c, rtol=2e-4, atol=1e-6)
