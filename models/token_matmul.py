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
XLA:CPU leaves to Eigen, and Eigen runs it several times slower with the
output's long side as rows (README, Performance, (12)). So each weight
gradient is taken with its short side as rows and transposed where needed:
the MLP's second product ([4d, d]; bit for bit the sums XLA took before) and
the tied output head (`token_matmul_nt`, whose [V, D] gradient is taken as
[D, V] where the vocabulary is the wider; XLA took that one as a plain
product of a transposed copy, so the sums agree to float32 rounding).
"""

from __future__ import annotations

import jax


@jax.custom_vjp
def token_matmul(x_BxLxD, w_DxF):
    """x @ w: [B, L, D] x [D, F] -> [B, L, F]."""
    return x_BxLxD @ w_DxF


def _forward(x_BxLxD, w_DxF):
    return x_BxLxD @ w_DxF, (x_BxLxD, w_DxF)


def short_rows_product(a_TxP, b_TxQ):
    """a^T b, [P, Q], contracted over the tokens, in the orientation Eigen runs fast.

    Where P > Q this takes (b^T a)^T; the barrier keeps the transpose out of
    the product, since XLA would fold transpose(b^T a) back into a^T b.
    """
    if a_TxP.shape[1] > b_TxQ.shape[1]:
        return jax.lax.optimization_barrier(b_TxQ.T @ a_TxP).T
    return a_TxP.T @ b_TxQ


def _tokens(a_BxLxD):
    return a_BxLxD.reshape(-1, a_BxLxD.shape[-1])


def _backward(saved, dy_BxLxF):
    x_BxLxD, w_DxF = saved
    dw_DxF = short_rows_product(_tokens(x_BxLxD), _tokens(dy_BxLxF))
    return dy_BxLxF @ w_DxF.T, dw_DxF.astype(w_DxF.dtype)


token_matmul.defvjp(_forward, _backward)


@jax.custom_vjp
def token_matmul_nt(x_BxLxD, w_FxD):
    """x @ w^T: [B, L, D] x [F, D] -> [B, L, F], as the tied output head takes its logits
    from the token embedding; its weight gradient dy^T x is [F, D], taken as above."""
    return x_BxLxD @ w_FxD.T


def _forward_nt(x_BxLxD, w_FxD):
    return x_BxLxD @ w_FxD.T, (x_BxLxD, w_FxD)


def _backward_nt(saved, dy_BxLxF):
    x_BxLxD, w_FxD = saved
    dw_FxD = short_rows_product(_tokens(dy_BxLxF), _tokens(x_BxLxD))
    return dy_BxLxF @ w_FxD, dw_FxD.astype(w_FxD.dtype)


token_matmul_nt.defvjp(_forward_nt, _backward_nt)
