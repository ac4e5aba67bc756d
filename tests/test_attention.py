"""The chunked CPU attention kernel against XLA's attention: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from models.sizes import ModelShape
from models.transformer import ModelConfig, Transformer


# Query blocks: one for the whole context, several, and several with a
# shorter last one (32 = 12 + 12 + 8; 16 = 12 + 4). The default suite runs
# the first and the last pair; the two between them run with the slow tests.
@pytest.mark.parametrize(
    "budget_rows, query_block",
    [
        (1, 64),
        pytest.param(3, 64, marks=pytest.mark.slow),
        pytest.param(1, 8, marks=pytest.mark.slow),
        (3, 12),
    ],
)
@pytest.mark.parametrize("b, length, n, h", [(6, 32, 3, 16), (8, 16, 2, 32), (5, 8, 1, 8)])
def test_chunked_attention_matches_xla_in_value_and_gradient(
    monkeypatch, budget_rows, query_block, b, length, n, h
):
    # A score budget of `budget_rows` sequences: chunks of that many rows, or
    # fewer where they do not divide the batch (5 rows in chunks of 2 -> 1).
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", budget_rows * 4 * n * length * length)
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    rows = attention.chunk_rows(b, n, length)
    assert b % rows == 0 and rows <= budget_rows
    q, k, v, cotangent = (
        jax.random.normal(key, (b, length, n, h))
        for key in jax.random.split(jax.random.key(b * length), 4)
    )
    np.testing.assert_allclose(
        attention.chunked_attention(q, k, v),
        attention.reference_attention(q, k, v),
        rtol=1e-5,
        atol=1e-6,
    )

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2))(
            q, k, v
        )

    for got, want in zip(
        grads(attention.chunked_attention), grads(attention.reference_attention), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_block", [64, 4])
def test_chunked_attention_is_causal(monkeypatch, query_block):
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 16, 2, 8)) for key in keys)
    changed_v = v.at[:, 9:].add(1.0)
    a, b = attention.chunked_attention(q, k, v), attention.chunked_attention(q, k, changed_v)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_chunk_rows_fit_the_budget_and_divide_the_batch():
    budget = attention.CHUNK_SCORE_BYTES
    for batch, n_heads, length in [(16, 6, 128), (32, 2, 128), (7, 4, 64), (16, 16, 1024)]:
        rows = attention.chunk_rows(batch, n_heads, length)
        assert batch % rows == 0
        assert rows == 1 or rows * 4 * n_heads * length * length <= budget


def _lowered_gradient(remat: str) -> str:
    """The StableHLO of a rolled two-layer model's gradient with the chunked kernel
    (batch 4, context 16, 2 heads of 16), under the remat policy `remat`."""
    shape = ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    tokens = jnp.zeros((4, shape.n_ctx), jnp.int32)
    model = Transformer(ModelConfig(shape, remat=remat, scan_unroll=1, attention_impl="chunked"))
    params = model.init(jax.random.key(0), tokens)
    return jax.jit(jax.grad(lambda p: model.apply(p, tokens).sum())).lower(params).as_text()


def test_a_rematerialised_block_keeps_the_kernels_forward_results():
    """Under the rolled loop's policy the backward pass must not run the
    kernel's forward again: its exps are those of the unrematerialised
    model (one per block forward, one per block backward), where
    recomputing everything adds the forward's again."""

    def exps(remat: str) -> int:
        return _lowered_gradient(remat).count("stablehlo.exponential")

    kept = exps("none")
    assert exps("dots_no_batch") == kept < exps("full")
    assert exps("dots") == kept


def test_a_rematerialised_block_keeps_the_kernels_inputs_and_output_in_the_layouts_read():
    """Under the rolled loop's policy the backward pass reads the kernel's
    heads-major q, k and v as kept, not transposed again from the kept QKV
    projection, and its output as kept token-major, not transposed again
    for the output projection's weight gradient: as many of either
    transpose as the unrematerialised model has, and the projection's
    [B, L, 3HK] output no longer among the kept activations."""
    # [B, L, H, K] -> [B, H, L, K]: q, k and v into the kernel (and the gradient of its output).
    heads_major = "dims = [0, 2, 1, 3] : (tensor<4x16x2x16xf32>"
    # [B, H, L, K] -> [B, L, H, K]: the output out of it (and the gradients of q, k and v).
    token_major = "dims = [0, 2, 1, 3] : (tensor<4x2x16x16xf32>"
    kept, rematerialised = _lowered_gradient("none"), _lowered_gradient("dots_no_batch")
    assert rematerialised.count(heads_major) == kept.count(heads_major) == 4
    assert rematerialised.count(token_major) == kept.count(token_major) == 4
    # The layer loop's stacked activations: [n_layer, B, L, 3 * d_model] is the projection's.
    assert "tensor<2x4x16x96xf32>" not in rematerialised
    assert "tensor<2x4x2x16x16xf32>" in rematerialised  # [n_layer, B, H, L, K]
