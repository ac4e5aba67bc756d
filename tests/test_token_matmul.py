"""token_matmul: x @ w with its weight gradient as one 2-D product, the same function as x @ w."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.transformer as transformer
from models.sizes import ModelShape
from models.token_matmul import token_matmul
from models.transformer import ModelConfig, Transformer


@pytest.mark.parametrize("d, f", [(8, 12), (12, 8)])  # both orientations of the weight gradient
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_value_and_both_gradients_are_those_of_matmul(dtype, tol, d, f):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, d)).astype(dtype)
    w = jax.random.normal(kw, (d, f)).astype(dtype)
    cotangent = jax.random.normal(kc, (3, 5, f))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * cotangent)

    np.testing.assert_allclose(
        token_matmul(x, w).astype(jnp.float32), (x @ w).astype(jnp.float32), rtol=tol, atol=tol
    )
    got = jax.grad(loss(token_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), rtol=tol, atol=tol)


def test_a_weight_gradient_wider_than_its_input_keeps_the_short_side_as_rows():
    # x^T dy into [48, 12] is taken as dy^T x, [12, 48], then transposed: the
    # orientation Eigen runs fast (models/token_matmul.py). Without the barrier
    # XLA folds the transpose back and the product's output is [48, 12] again.
    x = jnp.ones((2, 64, 48))
    w = jnp.ones((48, 12))
    hlo = jax.jit(jax.grad(lambda w: token_matmul(x, w).sum())).lower(w).compile().as_text()
    products = [line for line in hlo.splitlines() if " dot(" in line]
    shapes = {line.split("=")[1].split()[0].split("{")[0] for line in products}
    assert shapes == {"f32[12,48]"}, products


def test_every_projection_takes_it_on_one_cpu_device_and_trains_the_same_model(monkeypatch):
    shape = ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    tokens = jax.random.randint(jax.random.key(1), (2, shape.n_ctx), 0, 64)
    calls = []
    monkeypatch.setattr(
        transformer, "token_matmul", lambda x, w: calls.append(x.shape) or token_matmul(x, w)
    )

    def grads():
        model = Transformer(ModelConfig(shape, attention_impl="xla"))
        params = nn.unbox(model.init(jax.random.key(0), tokens))["params"]
        return jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)

    monkeypatch.setattr(ModelConfig, "single_cpu", property(lambda self: True))
    with_it = grads()
    # Each trace of a block: QKV and the MLP's first product take d in, the
    # attention output d (heads x head_dim), the MLP's second 4d.
    assert set(calls) == {(2, 16, 32), (2, 16, 128)}
    assert calls.count((2, 16, 32)) == 3 * calls.count((2, 16, 128))
    monkeypatch.setattr(ModelConfig, "single_cpu", property(lambda self: False))
    calls.clear()
    without = grads()
    assert calls == []
    for g, r in zip(jax.tree.leaves(with_it), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
