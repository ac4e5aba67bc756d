import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import sharding
from models.sizes import ModelShape
from models.transformer import REMAT_POLICIES, LayerNorm, ModelConfig, Transformer

SHAPE = ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=256)


def _init(config):
    model = Transformer(config)
    tokens = jax.random.randint(jax.random.key(1), (2, SHAPE.n_ctx), 0, 256)
    return model, model.init(jax.random.key(0), tokens), tokens


def test_attention_is_causal():
    model, variables, tokens = _init(ModelConfig(SHAPE))
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 256)
    a, b = model.apply(variables, tokens), model.apply(variables, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_every_parameter_has_logical_names_the_rules_know():
    _, variables, _ = _init(ModelConfig(SHAPE))
    known = {name for name, _ in sharding.RULES}
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= known
    # Scanned blocks are stacked along the layer axis.
    qkv = variables["params"]["blocks"]["qkv_kernel"]
    assert qkv.names[0] == "layers" and qkv.value.shape[0] == SHAPE.n_layer


@pytest.fixture(scope="module")
def reference_gradients():
    model, variables, tokens = _init(ModelConfig(SHAPE))
    params = nn.unbox(variables)["params"]
    return params, tokens, jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)


@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_give_the_same_finite_gradients(remat, reference_gradients):
    params, tokens, reference = reference_gradients
    model = Transformer(ModelConfig(SHAPE, remat=remat))
    grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_auto_remat_keeps_only_matmul_outputs_while_the_loop_is_rolled(reference_gradients):
    deep = ModelShape(n_layer=12, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    wide = ModelShape(n_layer=2, d_model=128, n_heads=2, n_ctx=16, vocab_size=64)
    assert ModelConfig(deep).unroll == 1
    assert ModelConfig(deep, attention_impl="xla").remat_policy == "dots"
    # The chunked kernel recomputes its scores: only the projections are kept.
    assert ModelConfig(deep, attention_impl="chunked").remat_policy == "dots_no_batch"
    assert ModelConfig(wide).unroll == 2
    assert ModelConfig(wide).remat_policy == "none"  # unrolled: nothing is stacked
    # On a CPU a narrow model keeps the loop (an unrolled residual stream is
    # recomputed in every fusion that reads it).
    assert jax.default_backend() != "cpu" or ModelConfig(SHAPE).unroll == 1
    assert ModelConfig(SHAPE, scan_unroll=2).remat_policy == "none"
    assert ModelConfig(SHAPE, scan_unroll=1, attention_impl="xla").remat_policy == "dots"
    assert ModelConfig(SHAPE, scan_unroll=1, remat="full").remat_policy == "full"
    params, tokens, reference = reference_gradients
    model = Transformer(ModelConfig(SHAPE, scan_unroll=1))
    grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_auto_attention_takes_cudnn_only_on_a_gpu_in_half_precision(monkeypatch):
    import models.transformer as transformer

    monkeypatch.setattr(transformer.jax, "default_backend", lambda: "gpu")
    for no_cudnn in ((0, 0), (7, 5)):  # not a CUDA GPU; a CUDA GPU before Ampere
        monkeypatch.setattr(transformer, "cuda_compute_capability", lambda c=no_cudnn: c)
        assert ModelConfig(SHAPE, compute_dtype="bfloat16").attention_kernel == "xla"
    monkeypatch.setattr(transformer, "cuda_compute_capability", lambda: (9, 0))
    assert ModelConfig(SHAPE, compute_dtype="bfloat16").attention_kernel == "cudnn"
    assert ModelConfig(SHAPE, compute_dtype="float16").attention_kernel == "cudnn"
    assert ModelConfig(SHAPE).attention_kernel == "xla"  # cuDNN's fused attention is half-only
    assert (
        ModelConfig(SHAPE, compute_dtype="bfloat16", attention_impl="xla").attention_kernel == "xla"
    )
    wide_heads = ModelShape(n_layer=1, d_model=256, n_heads=1, n_ctx=8, vocab_size=32)
    assert ModelConfig(wide_heads, compute_dtype="bfloat16").attention_kernel == "xla"


def test_auto_attention_takes_the_chunked_kernel_on_one_cpu_device(monkeypatch):
    import models.transformer as transformer

    monkeypatch.setattr(transformer.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(transformer.jax, "device_count", lambda: 1)
    assert ModelConfig(SHAPE).attention_kernel == "chunked"
    assert ModelConfig(SHAPE, attention_impl="xla").attention_kernel == "xla"
    # A batch split over several devices would be cut across by the chunk loop.
    monkeypatch.setattr(transformer.jax, "device_count", lambda: 8)
    assert ModelConfig(SHAPE).attention_kernel == "xla"


@pytest.mark.parametrize("kernel", ["xla", "chunked"])
def test_both_cpu_attention_kernels_train_the_same_model(kernel, reference_gradients):
    params, tokens, reference = reference_gradients
    model = Transformer(ModelConfig(SHAPE, attention_impl=kernel))
    grads = jax.grad(lambda p: model.apply({"params": p}, tokens).mean())(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_this_machine_reports_its_cuda_compute_capability():
    import models.transformer as transformer

    capability = transformer.cuda_compute_capability()
    assert capability == (0, 0) if jax.default_backend() != "gpu" else capability >= (3, 0)


def test_bfloat16_compute_gives_finite_float32_logits():
    model, variables, tokens = _init(ModelConfig(SHAPE, compute_dtype="bfloat16"))
    logits = model.apply(variables, tokens)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="model.compute_dtype='fp8'"):
        ModelConfig(SHAPE, compute_dtype="fp8")


@pytest.mark.slow  # compiles the model rolled and unrolled
def test_unrolled_layer_loop_computes_the_same_model():
    shape = ModelShape(n_layer=3, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    rolled, unrolled = (Transformer(ModelConfig(shape, scan_unroll=k)) for k in (1, 3))
    wide = ModelShape(n_layer=3, d_model=192, n_heads=2, n_ctx=16, vocab_size=64)
    assert ModelConfig(wide).unroll == 3 and ModelConfig(shape, scan_unroll=1).unroll == 1
    deep = ModelShape(n_layer=12, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
    assert ModelConfig(deep).unroll == 1  # deep models keep the loop: flat compile time
    params = rolled.init(jax.random.key(0), tokens)["params"]
    # Same parameter tree, same logits: unrolling only changes how XLA runs it.
    assert jax.tree.structure(params) == jax.tree.structure(
        unrolled.init(jax.random.key(0), tokens)["params"]
    )
    np.testing.assert_allclose(
        unrolled.apply({"params": params}, tokens),
        rolled.apply({"params": params}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="scan_unroll"):
        ModelConfig(shape, scan_unroll=-1)


def test_layernorm_means_as_products_is_the_same_function():
    kx, kc = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3, 5, 24)) * 2.0 + 0.5  # a mean away from zero
    cotangent = jax.random.normal(kc, (3, 5, 24))
    norms = [LayerNorm(means_as_products=p) for p in (False, True)]
    params = nn.unbox(norms[0].init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size).reshape(p.shape), params)

    def value_and_grads(norm):
        def loss(params, x):
            return jnp.sum(norm.apply(params, x) * cotangent)

        return loss(params, x), jax.grad(loss, argnums=(0, 1))(params, x)

    reduced, products = (value_and_grads(norm) for norm in norms)
    for a, b in zip(jax.tree.leaves(reduced), jax.tree.leaves(products), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_layernorm_takes_the_products_on_one_cpu_device_only(monkeypatch):
    import models.transformer as transformer

    calls = []
    normalize = transformer.normalize_by_products
    monkeypatch.setattr(
        transformer,
        "normalize_by_products",
        lambda x, eps: calls.append(x.shape) or normalize(x, eps),
    )
    for single_cpu in (True, False):
        monkeypatch.setattr(ModelConfig, "single_cpu", property(lambda self, s=single_cpu: s))
        calls.clear()
        _init(ModelConfig(SHAPE, attention_impl="xla"))
        # Traced once per LayerNorm of the scanned block, and the final one.
        assert len(calls) >= 3 if single_cpu else not calls

    # Activations past about an L2 cache are normalised by reductions.
    norm = LayerNorm(means_as_products=True)
    rows = transformer.NORM_PRODUCTS_MAX_BYTES // (4 * 64)
    for n, takes_products in ((rows, True), (rows + 1, False)):
        calls.clear()
        norm.init(jax.random.key(0), jnp.ones((1, n, 64)))
        assert bool(calls) == takes_products
