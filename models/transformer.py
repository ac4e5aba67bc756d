"""The decoder-only transformer family (Flax Linen).

Pre-LayerNorm blocks (causal self-attention through
`jax.nn.dot_product_attention`, GELU MLP), learned positions, and an output
head tied to the token embedding, as in GPT-2 and Kaplan et al. 2020.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...);
`models/sharding.py` maps them onto mesh axes. The blocks run under
`nn.scan`, so compile time does not grow with depth, and the stacked
parameters get the extra logical axis `layers`.

Tensor names carry their shape: B batch, L length, D d_model, H heads,
K head_dim, F d_ff, V vocab (N stays Kaplan's parameter count). The einsum
subscripts keep the letters they were first written with (n heads, h
head_dim, k the q/k/v index): XLA orders a contraction's dimensions by
them, so new letters would change the float rounding, and every run's
losses, in the last digits.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from models.attention import ATTENTION_RESIDUALS, chunked_attention
from models.sizes import ModelShape
from models.token_matmul import token_matmul, token_matmul_nt

# What the chunked attention kernel's backward reads. The policies that keep
# matmul outputs keep these too: recomputing the output and log-sum-exp would
# run the kernel's whole forward pass again in the backward pass, and the
# heads-major q, k and v, the same bytes as the QKV projection's output they
# replace among the kept activations, would be transposed again.
_KEEP_ATTENTION = jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS)
REMAT_POLICIES = {
    # "auto": "dots" while the layer loop stays rolled, else "none" (see `remat_policy`).
    "auto": None,
    "none": None,  # keep every activation: fewest FLOPs, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.save_from_both_policies(  # keep matmul outputs only
        jax.checkpoint_policies.checkpoint_dots, _KEEP_ATTENTION
    ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION
    ),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "auto": see `ModelConfig.attention_kernel`; "chunked" is models/attention.py's CPU kernel.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked")
# scan_unroll=0 unrolls the layer loop of models this shallow, and keeps it a
# loop beyond. Unrolled, XLA drops the loop's stacked activation buffers (their
# zero fill and dynamic slices); rolled, compile time stays flat in depth.
AUTO_UNROLL_MAX_LAYERS = 4
# ...except on CPU for narrow models (d_model / n_layer below this). Unrolled,
# XLA:CPU fuses the residual stream's chain of adds (and its gradient's) into
# every consumer, recomputing it from the first layer: elementwise work that
# grows as n_layer^2 against matmuls that grow as n_layer d_model. A loop
# boundary materialises the stream once per layer.
CPU_UNROLL_MIN_ASPECT = 48


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A shape plus how to compute it: dtypes, rematerialisation, attention kernel."""

    shape: ModelShape
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "auto"
    attention_impl: str = "auto"
    scan_unroll: int = 0  # layers per loop iteration; 0 = by depth and width (see `unroll`)
    # Applied by each device to its own rows (launch/steps.on_each_device), as
    # on a CPU data-parallel mesh: a CPU device's program, however many devices.
    per_device: bool = False

    def __post_init__(self):
        for name, allowed in (
            ("param_dtype", DTYPES),
            ("compute_dtype", DTYPES),
            ("remat", REMAT_POLICIES),
            ("attention_impl", ATTENTION_IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is not one of {sorted(allowed)}"
                )
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 0:
            raise ValueError(
                f"model.scan_unroll={self.scan_unroll!r} must be an integer >= 0 "
                "(0 picks by depth, 1 keeps the layer loop rolled)"
            )

    @property
    def unroll(self) -> int:
        """How many layers one iteration of the scanned layer loop runs."""
        n_layer = self.shape.n_layer
        if self.scan_unroll:
            return min(self.scan_unroll, n_layer)
        if n_layer > AUTO_UNROLL_MAX_LAYERS:
            return 1
        if jax.default_backend() == "cpu" and self.shape.d_model < CPU_UNROLL_MIN_ASPECT * n_layer:
            return 1
        return n_layer

    @property
    def attention_kernel(self) -> str:
        """The `jax.nn.dot_product_attention` implementation; "auto" resolved.

        cuDNN's fused (flash) attention on a GPU where it applies: half
        precision, head_dim a multiple of 8 up to 128. It never writes the
        [B, H, L, L] scores to memory, which XLA's attention does on a GPU.
        On a single CPU device, the chunked kernel of models/attention.py,
        which keeps a few sequences' scores in cache. Elsewhere
        (TPU, several CPU devices, a GPU in float32) XLA's.
        """
        if self.attention_impl != "auto":
            return self.attention_impl
        h = self.shape.head_dim
        if (
            self.compute_dtype in ("bfloat16", "float16")
            and h % 8 == 0
            and h <= 128
            and cuda_compute_capability() >= (8, 0)
        ):
            return "cudnn"
        if self.single_cpu:
            return "chunked"
        return "xla"

    @property
    def single_cpu(self) -> bool:
        """Whether the model runs as one CPU device's program, where the CPU's own kernels apply.

        So it does on a CPU with one device, and with several where each
        applies the model to its own rows (`per_device`: the data-parallel
        mesh of `models/sharding.cpu_data_parallel`). The kernels are the
        chunked attention, `token_matmul` for the four projections of a
        block (QKV, attention output, the MLP's two), whose weight gradients
        XLA:CPU otherwise takes in forms off its fast matmul path, or after
        writing a gradient out transposed (models/token_matmul.py), its
        `token_matmul_nt` for the tied head, and LayerNorm's
        `normalize_by_products`. In one program partitioned over
        several devices, the chunk loop would cut across them, and XLA's own
        forms (the einsums over named head axes) shard as they are.
        """
        return jax.default_backend() == "cpu" and (self.per_device or jax.device_count() == 1)

    @property
    def remat_policy(self) -> str:
        """The rematerialisation the blocks run with; "auto" resolved.

        A rolled layer loop stacks every activation the backward pass keeps
        into [n_layer, ...] buffers that XLA zero-fills, writes and reads
        slice by slice each step; keeping only the matmul outputs and
        recomputing the cheap elementwise rest costs less than that traffic
        and holds less memory. With the chunked attention kernel, which
        recomputes its own scores, only the projections' outputs (products
        without batch dimensions; the QKV projection's gives way to the
        kernel's heads-major q, k and v) and the kernel's output and
        log-sum-exp are kept. Unrolled, nothing is stacked.
        """
        if self.remat != "auto":
            return self.remat
        if self.unroll == self.shape.n_layer:
            return "none"
        return "dots_no_batch" if self.attention_kernel == "chunked" else "dots"


def cuda_compute_capability() -> tuple[int, int]:
    """(major, minor) of the default backend's first CUDA GPU; (0, 0) elsewhere.

    cuDNN's fused attention needs an NVIDIA GPU from Ampere (8.0) on; a ROCm
    GPU is also platform "gpu", so the platform alone does not tell.
    """
    backend = jax.extend.backend.get_backend()
    if backend.platform != "gpu" or "cuda" not in backend.platform_version.lower():
        return (0, 0)
    try:
        major, minor, *_ = (
            int(v) for v in backend.local_devices()[0].compute_capability.split(".")
        )
    except (AttributeError, ValueError):  # a runtime that does not say: XLA's attention
        return (0, 0)
    return (major, minor)


def _param(module, name, init, names, shape, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


# The most bytes of activations LayerNorm normalises with `normalize_by_products`:
# about a core's L2 cache. Beyond it the products' extra passes over the
# activations cost more than the reductions save (README, Performance).
NORM_PRODUCTS_MAX_BYTES = 2 << 20


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype, for stability.

    With `means_as_products` (on one CPU device: see `ModelConfig.single_cpu`)
    it normalises activations of up to NORM_PRODUCTS_MAX_BYTES with
    `normalize_by_products`, the same function to float32 rounding.
    """

    param_dtype: jnp.dtype = jnp.float32
    eps: float = 1e-5
    means_as_products: bool = False

    @nn.compact
    def __call__(self, x_BxLxD):
        d = x_BxLxD.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, ("norm",), (d,), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, ("norm",), (d,), self.param_dtype)
        x = x_BxLxD.astype(jnp.float32)
        if self.means_as_products and x.size * x.dtype.itemsize <= NORM_PRODUCTS_MAX_BYTES:
            y = normalize_by_products(x, self.eps)
        else:
            mean = x.mean(-1, keepdims=True)
            var = jnp.square(x - mean).mean(-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale[None, None] + bias[None, None]).astype(x_BxLxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize_by_products(x_BxLxD, eps: float):
    """(x - mean) / sqrt(var + eps) over the last axis, each mean a product with a column of 1/d.

    XLA:CPU runs these matrix-vector products, and the written-out backward's
    two, faster than its reductions over the last axis while a step's
    activations stay in cache; differentiated automatically, their backward
    would be outer products, slower than the reductions (README, Performance).
    """
    return _normalize_forward(x_BxLxD, eps)[0]


def _row_mean(a_BxLxD):
    d = a_BxLxD.shape[-1]
    return a_BxLxD @ jnp.full((d, 1), 1 / d, a_BxLxD.dtype)


def _normalize_forward(x_BxLxD, eps):
    centred_BxLxD = x_BxLxD - _row_mean(x_BxLxD)
    rstd_BxLx1 = jax.lax.rsqrt(_row_mean(jnp.square(centred_BxLxD)) + eps)
    y_BxLxD = centred_BxLxD * rstd_BxLx1
    return y_BxLxD, (y_BxLxD, rstd_BxLx1)


def _normalize_backward(eps, saved, dy_BxLxD):
    del eps
    y_BxLxD, rstd_BxLx1 = saved
    # d/dx of (x - mean) * rstd, with rstd's own dependence on x: the two row means
    # below are the projections out of dy along 1 and along y.
    dy_mean_BxLx1 = _row_mean(dy_BxLxD)
    dy_y_mean_BxLx1 = _row_mean(dy_BxLxD * y_BxLxD)
    return (rstd_BxLx1 * (dy_BxLxD - dy_mean_BxLx1 - y_BxLxD * dy_y_mean_BxLx1),)


normalize_by_products.defvjp(_normalize_forward, _normalize_backward)


class Block(nn.Module):
    """One pre-LN transformer block; scan-shaped: (x, None) -> (x, None)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, _):
        s = self.config.shape
        pdt, cdt = DTYPES[self.config.param_dtype], DTYPES[self.config.compute_dtype]
        d, n, h, f = s.d_model, s.n_heads, s.head_dim, s.d_ff
        w_init = nn.initializers.normal(0.02)
        # GPT-2: residual-branch outputs start smaller so the stream's variance
        # does not grow with depth.
        out_init = nn.initializers.normal(0.02 / (2 * s.n_layer) ** 0.5)
        zeros = nn.initializers.zeros

        # Attention.
        y_BxLxD = LayerNorm(pdt, means_as_products=self.config.single_cpu, name="ln_attn")(x_BxLxD)
        w_qkv = _param(
            self, "qkv_kernel", w_init, ("embed", "qkv", "heads", "head_dim"), (d, 3, n, h), pdt
        )
        b_qkv = _param(self, "qkv_bias", zeros, ("qkv", "heads", "head_dim"), (3, n, h), pdt)
        if self.config.single_cpu:  # as one [D, 3HK] product: see `single_cpu`
            qkv_BxLx3xHxK = token_matmul(y_BxLxD, w_qkv.astype(cdt).reshape(d, 3 * n * h))
            qkv_BxLx3xHxK = qkv_BxLx3xHxK.reshape(*y_BxLxD.shape[:2], 3, n, h)
        else:
            qkv_BxLx3xHxK = jnp.einsum("bld,dknh->blknh", y_BxLxD, w_qkv.astype(cdt))
        qkv_BxLx3xHxK = qkv_BxLx3xHxK + b_qkv.astype(cdt)[None, None]
        q, k, v = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        kernel = self.config.attention_kernel
        if kernel == "chunked":
            attn_BxLxHxK = chunked_attention(q, k, v)
        else:
            attn_BxLxHxK = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=kernel
            )
        w_out = _param(
            self, "attn_out_kernel", out_init, ("heads", "head_dim", "embed"), (n, h, d), pdt
        )
        b_out = _param(self, "attn_out_bias", zeros, ("embed",), (d,), pdt)
        if self.config.single_cpu:
            attn_BxLxHK = attn_BxLxHxK.reshape(*attn_BxLxHxK.shape[:2], n * h)
            attn_BxLxD = token_matmul(attn_BxLxHK, w_out.astype(cdt).reshape(n * h, d))
        else:
            attn_BxLxD = jnp.einsum("blnh,nhd->bld", attn_BxLxHxK, w_out.astype(cdt))
        x_BxLxD = x_BxLxD + attn_BxLxD + b_out.astype(cdt)[None, None]
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))

        # MLP.
        y_BxLxD = LayerNorm(pdt, means_as_products=self.config.single_cpu, name="ln_mlp")(x_BxLxD)
        w_in = _param(self, "mlp_in_kernel", w_init, ("embed", "mlp"), (d, f), pdt)
        b_in = _param(self, "mlp_in_bias", zeros, ("mlp",), (f,), pdt)
        w_mlp_out = _param(self, "mlp_out_kernel", out_init, ("mlp", "embed"), (f, d), pdt)
        b_mlp_out = _param(self, "mlp_out_bias", zeros, ("embed",), (d,), pdt)
        matmul = token_matmul if self.config.single_cpu else jnp.matmul
        h_BxLxF = jax.nn.gelu(matmul(y_BxLxD, w_in.astype(cdt)) + b_in.astype(cdt)[None, None])
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        x_BxLxD = (
            x_BxLxD + matmul(h_BxLxF, w_mlp_out.astype(cdt)) + b_mlp_out.astype(cdt)[None, None]
        )
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
        return x_BxLxD, None


class Transformer(nn.Module):
    """tokens [B, L] int -> logits [B, L, V] float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL):
        s = self.config.shape
        pdt, cdt = DTYPES[self.config.param_dtype], DTYPES[self.config.compute_dtype]
        length = tokens_BxL.shape[1]
        embed_VxD = _param(
            self,
            "token_embed",
            nn.initializers.normal(0.02),
            ("vocab", "embed"),
            (s.vocab_size, s.d_model),
            pdt,
        )
        pos_LxD = _param(
            self,
            "pos_embed",
            nn.initializers.normal(0.01),
            ("position", "embed"),
            (s.n_ctx, s.d_model),
            pdt,
        )
        x_BxLxD = (jnp.take(embed_VxD, tokens_BxL, axis=0) + pos_LxD[None, :length]).astype(cdt)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))

        block = Block
        if self.config.remat_policy != "none":
            block = nn.remat(
                Block, prevent_cse=False, policy=REMAT_POLICIES[self.config.remat_policy]
            )
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=s.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=self.config.unroll,
        )
        x_BxLxD, _ = stack(self.config, name="blocks")(x_BxLxD, None)
        x_BxLxD = LayerNorm(pdt, means_as_products=self.config.single_cpu, name="ln_final")(x_BxLxD)
        # Tied output head; logits in float32 so the loss is accurate under bf16.
        x_BxLxD, embed_VxD = x_BxLxD.astype(jnp.float32), embed_VxD.astype(jnp.float32)
        if self.config.single_cpu and s.d_model < s.vocab_size:
            # The embedding's gradient [V, D] taken as [D, V]; with V <= D there is
            # nothing to turn, and XLA's own plan (dy^T copied, then a plain
            # product) measured a little faster (README, Performance, (13)).
            logits_BxLxV = token_matmul_nt(x_BxLxD, embed_VxD)
        else:
            logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, embed_VxD)
        return nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
