"""x @ w over a batch of tokens, with its weight gradient as one plain 2-D product (for the CPU).

Differentiated by JAX, `x_BxLxD @ w_DxF` has the weight gradient
x^T dy contracted over both token axes. Inside the training step XLA:CPU's
layout assignment then transposes dy in memory and takes the product with
both operands transposed, a form its fast matmul path (YNNPACK) does not
cover, so the MLP's two weight gradients were the slowest products of a
small model's step. For the attention's projections, written as einsums
over head axes, it instead wrote the incoming gradient out a second time,
transposed, from the fusion that computes it. Here the backward flattens the
tokens and writes dW = x^T dy as one [T, D]^T [T, F] product, without the
extra transpose. The value and both gradients are those of `x @ w` (to
float32 rounding).
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def token_matmul(x_BxLxD, w_DxF):
    """x @ w: [B, L, D] x [D, F] -> [B, L, F]."""
    return x_BxLxD @ w_DxF


def _forward(x_BxLxD, w_DxF):
    return x_BxLxD @ w_DxF, (x_BxLxD, w_DxF)


def _backward(saved, dy_BxLxF):
    x_BxLxD, w_DxF = saved
    x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
    dy_TxF = dy_BxLxF.reshape(-1, dy_BxLxF.shape[-1])
    return dy_BxLxF @ w_DxF.T, (x_TxD.T @ dy_TxF).astype(w_DxF.dtype)


token_matmul.defvjp(_forward, _backward)
