"""Causal self-attention for the CPU: a few sequences at a time, with a hand-written backward.

XLA:CPU computes attention as separate passes over the [B, H, L, L] scores (two
batched products, the mask, the softmax and their gradients). Over a whole
batch each pass streams the scores through main memory, and XLA's own
backward takes two products in a transposed form that its fast matmul path
does not cover. `chunked_attention` runs `chunk_rows` sequences per loop
iteration, so one chunk's scores stay in the core's cache across the passes,
and its custom VJP (i) saves only the output and the log-sum-exp of each row,
recomputing the probabilities, as flash attention does, and (ii) writes every
product with the contracted axis minor in its left operand: the two products
that contract over the query axis (dV and dK) take the transposed probabilities,
computed directly from K Q^T, instead of a transposed [L, L] matrix.

Tensor names carry their shape: R rows (sequences) of a chunk, C chunks, H
heads, L query positions, M key positions, K head_dim. The einsum subscripts
keep their first letters (n heads, h head_dim), as in transformer.py: new
letters would reorder the contractions and change the rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bytes of one chunk's [R, H, L, L] float32 scores: about a core's L2 cache.
CHUNK_SCORE_BYTES = 2 << 20
_MASKED = -1e30  # a causal mask value that exp() sends to exactly 0


def chunk_rows(batch: int, n_heads: int, length: int) -> int:
    """Sequences per chunk: the most whose scores fit CHUNK_SCORE_BYTES, dividing the batch."""
    rows = max(1, min(batch, CHUNK_SCORE_BYTES // (4 * n_heads * length * length)))
    while batch % rows:
        rows -= 1
    return rows


def reference_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    """softmax(q k^T / sqrt(H), causal) v, as XLA computes it: the function the kernel matches."""
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation="xla"
    )


def chunked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    """Causal attention, `chunk_rows` sequences at a time; [B, L, H, K] in and out."""
    b, length, n, _ = q_BxLxHxK.shape
    rows = chunk_rows(b, n, length)
    heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, H, L, K]
    out_BxHxLxK = _attention(
        heads_major(q_BxLxHxK), heads_major(k_BxLxHxK), heads_major(v_BxLxHxK), rows
    )
    return heads_major(out_BxHxLxK)


def _causal(length: int):
    return jnp.tril(jnp.ones((length, length), bool))


def _scores(a_RxHxLxK, b_RxHxMxK):
    """a b^T / sqrt(K) in float32: [R, H, L, M]."""
    scale = a_RxHxLxK.shape[-1] ** -0.5
    return (
        jnp.einsum("rnlh,rnmh->rnlm", a_RxHxLxK, b_RxHxMxK, preferred_element_type=jnp.float32)
        * scale
    )


def _forward_chunk(q_RxHxLxK, k_RxHxLxK, v_RxHxLxK):
    s_RxHxLxM = jnp.where(_causal(q_RxHxLxK.shape[2]), _scores(q_RxHxLxK, k_RxHxLxK), _MASKED)
    max_RxHxLx1 = s_RxHxLxM.max(-1, keepdims=True)
    e_RxHxLxM = jnp.exp(s_RxHxLxM - max_RxHxLx1)
    sum_RxHxLx1 = e_RxHxLxM.sum(-1, keepdims=True)
    p_RxHxLxM = (e_RxHxLxM / sum_RxHxLx1).astype(v_RxHxLxK.dtype)
    out_RxHxLxK = jnp.einsum("rnlm,rnmh->rnlh", p_RxHxLxM, v_RxHxLxK)
    return out_RxHxLxK, (max_RxHxLx1 + jnp.log(sum_RxHxLx1))[..., 0]


def _backward_chunk(q_RxHxLxK, k_RxHxLxK, v_RxHxLxK, out_RxHxLxK, lse_RxHxL, dout_RxHxLxK):
    length = q_RxHxLxK.shape[2]
    scale = q_RxHxLxK.shape[-1] ** -0.5
    causal_LxM = _causal(length)
    dtype = q_RxHxLxK.dtype
    # Probabilities (rows: queries) and their transpose (rows: keys), each from its own product.
    p_RxHxLxM = jnp.where(
        causal_LxM, jnp.exp(_scores(q_RxHxLxK, k_RxHxLxK) - lse_RxHxL[..., None]), 0.0
    )
    p_RxHxMxL = jnp.where(
        causal_LxM.T, jnp.exp(_scores(k_RxHxLxK, q_RxHxLxK) - lse_RxHxL[:, :, None, :]), 0.0
    )
    # d softmax: dS = P * (dP - rowsum(dO * O)).
    delta_RxHxL = jnp.sum(dout_RxHxLxK.astype(jnp.float32) * out_RxHxLxK, -1)
    dp_RxHxLxM = jnp.einsum(
        "rnlh,rnmh->rnlm", dout_RxHxLxK, v_RxHxLxK, preferred_element_type=jnp.float32
    )
    dp_RxHxMxL = jnp.einsum(
        "rnmh,rnlh->rnml", v_RxHxLxK, dout_RxHxLxK, preferred_element_type=jnp.float32
    )
    ds_RxHxLxM = (p_RxHxLxM * (dp_RxHxLxM - delta_RxHxL[..., None]) * scale).astype(dtype)
    ds_RxHxMxL = (p_RxHxMxL * (dp_RxHxMxL - delta_RxHxL[:, :, None, :]) * scale).astype(dtype)
    dq_RxHxLxK = jnp.einsum("rnlm,rnmh->rnlh", ds_RxHxLxM, k_RxHxLxK)
    dk_RxHxMxK = jnp.einsum("rnml,rnlh->rnmh", ds_RxHxMxL, q_RxHxLxK)
    dv_RxHxMxK = jnp.einsum("rnml,rnlh->rnmh", p_RxHxMxL.astype(dtype), dout_RxHxLxK)
    return dq_RxHxLxK, dk_RxHxMxK, dv_RxHxMxK


def _chunks(x_Bx, rows: int):
    return x_Bx.reshape(x_Bx.shape[0] // rows, rows, *x_Bx.shape[1:])


def _unchunk(x_CxRx):
    return x_CxRx.reshape(x_CxRx.shape[0] * x_CxRx.shape[1], *x_CxRx.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows: int):
    return _attention_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows)[0]


def _attention_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows: int):
    out, lse = jax.lax.map(
        lambda qkv: _forward_chunk(*qkv),
        tuple(_chunks(x, rows) for x in (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)),
    )
    out_BxHxLxK, lse_BxHxL = _unchunk(out), _unchunk(lse)
    return out_BxHxLxK, (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out_BxHxLxK, lse_BxHxL)


def _attention_backward(rows: int, saved, dout_BxHxLxK):
    grads = jax.lax.map(
        lambda args: _backward_chunk(*args), tuple(_chunks(x, rows) for x in (*saved, dout_BxHxLxK))
    )
    return tuple(_unchunk(g) for g in grads)


_attention.defvjp(_attention_forward, _attention_backward)
