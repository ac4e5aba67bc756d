"""Causal self-attention for the CPU: a few sequences at a time, with a hand-written backward.

XLA:CPU computes attention as separate passes over the [B, H, L, L] scores (two
batched products, the mask, the softmax and their gradients). Over a whole
batch each pass streams the scores through main memory, and XLA's own
backward takes two products in a transposed form that its fast matmul path
does not cover. `chunked_attention` runs `chunk_rows` sequences per loop
iteration, so one chunk's scores stay in the core's cache across the passes;
within a chunk it goes over blocks of QUERY_BLOCK queries, each against the
keys it may see, so the score blocks above the causal diagonal are never
computed (a quarter of the work at context 128); and its custom VJP (i)
saves only the output and the log-sum-exp of each row, recomputing the
probabilities, as flash attention does, and (ii) goes over the query blocks
once in the backward: each block's probabilities P and score gradient dS are
computed once and give its dQ = dS K and its share of dK = dS^T Q and
dV = P^T dO for the keys it sees. Those two products contract over the
query axis, the major one of P and dS, a transposed form XLA:CPU leaves to
Eigen; recomputing P^T and dP^T directly in the keys' orientation instead
costs two more products over the head dimension, and at head size 16 those
are the slowest kind (README, Performance: the local sweep's shapes).

Tensor names carry their shape: R rows (sequences) of a chunk, C chunks, H
heads, L query positions, M key positions, K head_dim. The einsum subscripts
keep their first letters (n heads, h head_dim), as in transformer.py: new
letters would reorder the contractions and change the rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Bytes of one chunk's [R, H, L, L] float32 scores: about a core's L2 cache.
CHUNK_SCORE_BYTES = 2 << 20
_MASKED = -1e30  # a causal mask value that exp() sends to exactly 0
# Queries per block of the causal loop: a block of queries [a, b) meets keys
# [0, b) only, so the score blocks above the diagonal are never computed.
# Smaller blocks skip more of them, but as more, smaller products.
QUERY_BLOCK = 64
# The forward results the backward reads, as checkpoint names.
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")


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


def _causal(rows: int, cols: int, offset: int = 0):
    """[rows, cols] mask: query offset + i may see key j <= offset + i."""
    return jnp.arange(cols)[None, :] <= offset + jnp.arange(rows)[:, None]


def _scores(a_RxHxLxK, b_RxHxMxK):
    """a b^T / sqrt(K) in float32: [R, H, L, M]."""
    scale = a_RxHxLxK.shape[-1] ** -0.5
    return (
        jnp.einsum("rnlh,rnmh->rnlm", a_RxHxLxK, b_RxHxMxK, preferred_element_type=jnp.float32)
        * scale
    )


def _blocks(length: int):
    """(start, stop) of each query (or key) block of the context."""
    size = min(length, QUERY_BLOCK)
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _forward_chunk(q_RxHxLxK, k_RxHxLxK, v_RxHxLxK):
    # Query block [a, b) sees keys [0, b): the blocks above the diagonal are never computed.
    outs, lses = [], []
    for a, b in _blocks(q_RxHxLxK.shape[2]):
        s_RxHxLxM = jnp.where(
            _causal(b - a, b, a), _scores(q_RxHxLxK[:, :, a:b], k_RxHxLxK[:, :, :b]), _MASKED
        )
        max_RxHxLx1 = s_RxHxLxM.max(-1, keepdims=True)
        e_RxHxLxM = jnp.exp(s_RxHxLxM - max_RxHxLx1)
        sum_RxHxLx1 = e_RxHxLxM.sum(-1, keepdims=True)
        p_RxHxLxM = (e_RxHxLxM / sum_RxHxLx1).astype(v_RxHxLxK.dtype)
        outs.append(jnp.einsum("rnlm,rnmh->rnlh", p_RxHxLxM, v_RxHxLxK[:, :, :b]))
        lses.append((max_RxHxLx1 + jnp.log(sum_RxHxLx1))[..., 0])
    return jnp.concatenate(outs, 2), jnp.concatenate(lses, 2)


def _backward_chunk(q_RxHxLxK, k_RxHxLxK, v_RxHxLxK, out_RxHxLxK, lse_RxHxL, dout_RxHxLxK):
    blocks = _blocks(q_RxHxLxK.shape[2])
    scale = q_RxHxLxK.shape[-1] ** -0.5
    dtype = q_RxHxLxK.dtype
    # d softmax: dS = P * (dP - rowsum(dO * O)).
    delta_RxHxL = jnp.sum(dout_RxHxLxK.astype(jnp.float32) * out_RxHxLxK, -1)
    # One pass over the query blocks [a, b), each against keys [0, b): P and dS once, then
    # dQ = dS K, and each key block's share of dK = dS^T Q and dV = P^T dO.
    dqs, dks, dvs = [], [[] for _ in blocks], [[] for _ in blocks]
    for i, (a, b) in enumerate(blocks):
        p_RxHxLxM = jnp.where(
            _causal(b - a, b, a),
            jnp.exp(
                _scores(q_RxHxLxK[:, :, a:b], k_RxHxLxK[:, :, :b]) - lse_RxHxL[:, :, a:b, None]
            ),
            0.0,
        )
        dp_RxHxLxM = jnp.einsum(
            "rnlh,rnmh->rnlm",
            dout_RxHxLxK[:, :, a:b],
            v_RxHxLxK[:, :, :b],
            preferred_element_type=jnp.float32,
        )
        ds_RxHxLxM = (p_RxHxLxM * (dp_RxHxLxM - delta_RxHxL[:, :, a:b, None]) * scale).astype(dtype)
        dqs.append(jnp.einsum("rnlm,rnmh->rnlh", ds_RxHxLxM, k_RxHxLxK[:, :, :b]))
        dk_RxHxMxK = jnp.einsum("rnlm,rnlh->rnmh", ds_RxHxLxM, q_RxHxLxK[:, :, a:b])
        dv_RxHxMxK = jnp.einsum("rnlm,rnlh->rnmh", p_RxHxLxM.astype(dtype), dout_RxHxLxK[:, :, a:b])
        for j, (c, d) in enumerate(blocks[: i + 1]):  # the key blocks in [0, b)
            dks[j].append(dk_RxHxMxK[:, :, c:d])
            dvs[j].append(dv_RxHxMxK[:, :, c:d])
    return (
        jnp.concatenate(dqs, 2),
        jnp.concatenate([sum(parts[1:], parts[0]) for parts in dks], 2),
        jnp.concatenate([sum(parts[1:], parts[0]) for parts in dvs], 2),
    )


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
    # Named, so that a rematerialised block keeps them (transformer.REMAT_POLICIES).
    out_BxHxLxK = checkpoint_name(_unchunk(out), ATTENTION_RESIDUALS[0])
    lse_BxHxL = checkpoint_name(_unchunk(lse), ATTENTION_RESIDUALS[1])
    return out_BxHxLxK, (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out_BxHxLxK, lse_BxHxL)


def _attention_backward(rows: int, saved, dout_BxHxLxK):
    grads = jax.lax.map(
        lambda args: _backward_chunk(*args), tuple(_chunks(x, rows) for x in (*saved, dout_BxHxLxK))
    )
    return tuple(_unchunk(g) for g in grads)


_attention.defvjp(_attention_forward, _attention_backward)
