"""Causal self-attention for the CPU: a few sequences at a time, with a hand-written backward.

XLA:CPU computes attention as separate passes over the [B, N, L, L] scores (two
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

Tensor names carry their shape: R rows (sequences) of a chunk, C chunks, N
heads, L query positions, M key positions, H head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bytes of one chunk's [R, N, L, L] float32 scores: about a core's L2 cache.
CHUNK_SCORE_BYTES = 2 << 20
_MASKED = -1e30  # a causal mask value that exp() sends to exactly 0


def chunk_rows(batch: int, n_heads: int, length: int) -> int:
    """Sequences per chunk: the most whose scores fit CHUNK_SCORE_BYTES, dividing the batch."""
    rows = max(1, min(batch, CHUNK_SCORE_BYTES // (4 * n_heads * length * length)))
    while batch % rows:
        rows -= 1
    return rows


def reference_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH):
    """softmax(q k^T / sqrt(H), causal) v, as XLA computes it: the function the kernel matches."""
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True,
                                        implementation="xla")


def chunked_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH):
    """Causal attention, `chunk_rows` sequences at a time; [B, L, N, H] in and out."""
    b, length, n, _ = q_BxLxNxH.shape
    rows = chunk_rows(b, n, length)
    heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, N, L, H]
    out_BxNxLxH = _attention(heads_major(q_BxLxNxH), heads_major(k_BxLxNxH),
                             heads_major(v_BxLxNxH), rows)
    return heads_major(out_BxNxLxH)


def _causal(length: int):
    return jnp.tril(jnp.ones((length, length), bool))


def _scores(a_RxNxLxH, b_RxNxMxH):
    """a b^T / sqrt(H) in float32: [R, N, L, M]."""
    scale = a_RxNxLxH.shape[-1] ** -0.5
    return jnp.einsum("rnlh,rnmh->rnlm", a_RxNxLxH, b_RxNxMxH,
                      preferred_element_type=jnp.float32) * scale


def _forward_chunk(q_RxNxLxH, k_RxNxLxH, v_RxNxLxH):
    s_RxNxLxM = jnp.where(_causal(q_RxNxLxH.shape[2]), _scores(q_RxNxLxH, k_RxNxLxH), _MASKED)
    max_RxNxLx1 = s_RxNxLxM.max(-1, keepdims=True)
    e_RxNxLxM = jnp.exp(s_RxNxLxM - max_RxNxLx1)
    sum_RxNxLx1 = e_RxNxLxM.sum(-1, keepdims=True)
    p_RxNxLxM = (e_RxNxLxM / sum_RxNxLx1).astype(v_RxNxLxH.dtype)
    out_RxNxLxH = jnp.einsum("rnlm,rnmh->rnlh", p_RxNxLxM, v_RxNxLxH)
    return out_RxNxLxH, (max_RxNxLx1 + jnp.log(sum_RxNxLx1))[..., 0]


def _backward_chunk(q_RxNxLxH, k_RxNxLxH, v_RxNxLxH, out_RxNxLxH, lse_RxNxL, dout_RxNxLxH):
    length = q_RxNxLxH.shape[2]
    scale = q_RxNxLxH.shape[-1] ** -0.5
    causal_LxM = _causal(length)
    dtype = q_RxNxLxH.dtype
    # Probabilities (rows: queries) and their transpose (rows: keys), each from its own product.
    p_RxNxLxM = jnp.where(causal_LxM, jnp.exp(_scores(q_RxNxLxH, k_RxNxLxH)
                                              - lse_RxNxL[..., None]), 0.0)
    p_RxNxMxL = jnp.where(causal_LxM.T, jnp.exp(_scores(k_RxNxLxH, q_RxNxLxH)
                                                - lse_RxNxL[:, :, None, :]), 0.0)
    # d softmax: dS = P * (dP - rowsum(dO * O)).
    delta_RxNxL = jnp.sum(dout_RxNxLxH.astype(jnp.float32) * out_RxNxLxH, -1)
    dp_RxNxLxM = jnp.einsum("rnlh,rnmh->rnlm", dout_RxNxLxH, v_RxNxLxH,
                            preferred_element_type=jnp.float32)
    dp_RxNxMxL = jnp.einsum("rnmh,rnlh->rnml", v_RxNxLxH, dout_RxNxLxH,
                            preferred_element_type=jnp.float32)
    ds_RxNxLxM = (p_RxNxLxM * (dp_RxNxLxM - delta_RxNxL[..., None]) * scale).astype(dtype)
    ds_RxNxMxL = (p_RxNxMxL * (dp_RxNxMxL - delta_RxNxL[:, :, None, :]) * scale).astype(dtype)
    dq_RxNxLxH = jnp.einsum("rnlm,rnmh->rnlh", ds_RxNxLxM, k_RxNxLxH)
    dk_RxNxMxH = jnp.einsum("rnml,rnlh->rnmh", ds_RxNxMxL, q_RxNxLxH)
    dv_RxNxMxH = jnp.einsum("rnml,rnlh->rnmh", p_RxNxMxL.astype(dtype), dout_RxNxLxH)
    return dq_RxNxLxH, dk_RxNxMxH, dv_RxNxMxH


def _chunks(x_Bx, rows: int):
    return x_Bx.reshape(x_Bx.shape[0] // rows, rows, *x_Bx.shape[1:])


def _unchunk(x_CxRx):
    return x_CxRx.reshape(x_CxRx.shape[0] * x_CxRx.shape[1], *x_CxRx.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, rows: int):
    return _attention_forward(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, rows)[0]


def _attention_forward(q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, rows: int):
    out, lse = jax.lax.map(lambda qkv: _forward_chunk(*qkv),
                           tuple(_chunks(x, rows) for x in (q_BxNxLxH, k_BxNxLxH, v_BxNxLxH)))
    out_BxNxLxH, lse_BxNxL = _unchunk(out), _unchunk(lse)
    return out_BxNxLxH, (q_BxNxLxH, k_BxNxLxH, v_BxNxLxH, out_BxNxLxH, lse_BxNxL)


def _attention_backward(rows: int, saved, dout_BxNxLxH):
    grads = jax.lax.map(lambda args: _backward_chunk(*args),
                        tuple(_chunks(x, rows) for x in (*saved, dout_BxNxLxH)))
    return tuple(_unchunk(g) for g in grads)


_attention.defvjp(_attention_forward, _attention_backward)
