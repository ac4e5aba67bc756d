import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models.sizes import ModelShape, kaplan_nonembedding_params
from models.transformer import ModelConfig, Transformer


def _tree_size(shape: ModelShape) -> int:
    model = Transformer(ModelConfig(shape))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, shape.n_ctx), int))
    return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))


@pytest.mark.parametrize(
    "n_layer,d_model,n_heads,n_ctx,vocab,d_ff",
    [(1, 16, 1, 8, 256, 0), (3, 64, 4, 32, 300, 0), (2, 48, 3, 16, 256, 100)],
)
def test_exact_count_equals_initialised_tree(n_layer, d_model, n_heads, n_ctx, vocab, d_ff):
    shape = ModelShape(n_layer, d_model, n_heads, n_ctx, vocab, d_ff)
    assert shape.n_params == _tree_size(shape)
    assert shape.n_params_nonembedding == shape.n_params - (vocab + n_ctx) * d_model


def test_kaplan_count_is_twelve_layer_d_squared():
    assert kaplan_nonembedding_params(4, 128) == 12 * 4 * 128**2
    shape = ModelShape(4, 128, 8, 128, 256)
    assert shape.n_params_kaplan == 12 * 4 * 128**2
    # Kaplan's N leaves out biases and norms: within a few percent of the exact count.
    assert 0.95 < shape.n_params_kaplan / shape.n_params_nonembedding < 1.0


def test_training_flops_per_token():
    shape = ModelShape(4, 128, 8, 128, 256)
    assert shape.train_flops_per_token == 6 * shape.n_params_kaplan + 6 * 4 * 128 * 128


def test_bad_shapes_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"model.d_model=100 is not divisible by model.n_heads=3"):
        ModelShape(2, 100, 3, 16, 256)
    with pytest.raises(ValueError, match=r"model.n_layer=0"):
        ModelShape(0, 64, 2, 16, 256)


def test_flop_conventions_by_hand():
    shape = ModelShape(n_layer=2, d_model=64, n_heads=4, n_ctx=128, vocab_size=256)
    n = 2 * 2 * 64 * (2 * 64 + 256)
    attention = 6 * 2 * 128 * 64
    assert shape.flops_per_token("6N") == 6 * n
    assert shape.flops_per_token("6N_total") == 6 * shape.n_params
    assert shape.flops_per_token("6N+attention") == 6 * n + attention
    assert shape.flops_per_token() == shape.train_flops_per_token
    assert shape.flops_per_token("6N+causal_attention") == 6 * n + attention // 2
    with pytest.raises(ValueError, match="known: 6N"):
        shape.flops_per_token("5N")
