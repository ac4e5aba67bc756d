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

That product still contracts over the major axis of both operands, a form
XLA:CPU leaves to Eigen, and Eigen runs it far slower with the output's long
side as rows: at 2048 tokens, x^T dy into [384, 96] took 2.0 ms and the
same numbers as (dy^T x)^T, [96, 384] then transposed, 1.2; into [64, 16]
4.6 times as long (README, Performance). So where D > F the backward takes
dy^T x and transposes it, bit for bit the same sums.
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
    if x_TxD.shape[1] > dy_TxF.shape[1]:
        # The barrier keeps the transpose out of the product: XLA would fold
        # transpose(dy^T x) back into x^T dy, the slow orientation.
        dw_DxF = jax.lax.optimization_barrier(dy_TxF.T @ x_TxD).T
    else:
        dw_DxF = x_TxD.T @ dy_TxF
    return dy_BxLxF @ w_DxF.T, dw_DxF.astype(w_DxF.dtype)


token_matmul.defvjp(_forward, _backward)
