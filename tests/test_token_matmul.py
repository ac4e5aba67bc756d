"""token_matmul (x @ w) and token_matmul_nt (x @ w^T, the tied head): each weight gradient one
2-D product in the orientation Eigen runs fast, the same functions as the plain products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.transformer as transformer
from models.sizes import ModelShape
from models.token_matmul import token_matmul, token_matmul_nt
from models.transformer import ModelConfig, Transformer


def _nt(x, w):
    return x @ w.T


@pytest.mark.parametrize(
    "fn, plain, transposed",
    [(token_matmul, jnp.matmul, False), (token_matmul_nt, _nt, True)],
    ids=["x@w", "x@w.T"],
)
@pytest.mark.parametrize("d, f", [(8, 12), (12, 8)])  # both orientations of the weight gradient
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_value_and_both_gradients_are_those_of_matmul(dtype, tol, d, f, fn, plain, transposed):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, d)).astype(dtype)
    w = jax.random.normal(kw, (f, d) if transposed else (d, f)).astype(dtype)
    cotangent = jax.random.normal(kc, (3, 5, f))

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * cotangent)

    np.testing.assert_allclose(
        fn(x, w).astype(jnp.float32), plain(x, w).astype(jnp.float32), rtol=tol, atol=tol
    )
    got = jax.grad(loss(fn), argnums=(0, 1))(x, w)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), rtol=tol, atol=tol)


def _weight_gradient_products(fn, x, w) -> set[str]:
    hlo = jax.jit(jax.grad(lambda w: fn(x, w).sum())).lower(w).compile().as_text()
    products = [line for line in hlo.splitlines() if " dot(" in line]
    return {line.split("=")[1].split()[0].split("{")[0] for line in products}


def test_a_weight_gradient_wider_than_its_input_keeps_the_short_side_as_rows():
    # x^T dy into [48, 12] is taken as dy^T x, [12, 48], then transposed: the
    # orientation Eigen runs fast (models/token_matmul.py). Without the barrier
    # XLA folds the transpose back and the product's output is [48, 12] again.
    x = jnp.ones((2, 64, 48))
    assert _weight_gradient_products(token_matmul, x, jnp.ones((48, 12))) == {"f32[12,48]"}


def test_the_tied_heads_weight_gradient_keeps_the_short_side_as_rows():
    # The head's dy^T x into [V, D] = [48, 12] (vocabulary wider than the model)
    # is taken as x^T dy, [12, 48]; a narrower vocabulary needs no transpose.
    x = jnp.ones((2, 64, 12))
    assert _weight_gradient_products(token_matmul_nt, x, jnp.ones((48, 12))) == {"f32[12,48]"}
    x = jnp.ones((2, 64, 48))
    assert _weight_gradient_products(token_matmul_nt, x, jnp.ones((12, 48))) == {"f32[12,48]"}


def test_projections_and_head_take_it_on_one_cpu_device_and_train_the_same_model(monkeypatch):
    shape = ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    tokens = jax.random.randint(jax.random.key(1), (2, shape.n_ctx), 0, 64)
    calls, head_calls = [], []
    monkeypatch.setattr(
        transformer, "token_matmul", lambda x, w: calls.append(x.shape) or token_matmul(x, w)
    )
    monkeypatch.setattr(
        transformer,
        "token_matmul_nt",
        lambda x, w: head_calls.append(w.shape) or token_matmul_nt(x, w),
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
    assert head_calls == [(64, 32)] * 2  # the tied head [V, D], in init and in the gradient
    monkeypatch.setattr(ModelConfig, "single_cpu", property(lambda self: False))
    calls.clear()
    head_calls.clear()
    without = grads()
    assert calls == [] and head_calls == []
    for g, r in zip(jax.tree.leaves(with_it), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_the_head_keeps_xlas_plan_where_the_vocabulary_is_no_wider_than_the_model(monkeypatch):
    shape = ModelShape(n_layer=1, d_model=32, n_heads=2, n_ctx=16, vocab_size=32)
    tokens = jax.random.randint(jax.random.key(1), (2, shape.n_ctx), 0, 32)
    head_calls = []
    monkeypatch.setattr(
        transformer, "token_matmul_nt", lambda x, w: head_calls.append(w.shape) or _nt(x, w)
    )
    monkeypatch.setattr(ModelConfig, "single_cpu", property(lambda self: True))
    model = Transformer(ModelConfig(shape, attention_impl="xla"))
    model.init(jax.random.key(0), tokens)
    assert head_calls == []  # nothing to turn: [V, D] already has its short side as rows
