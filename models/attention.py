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
probabilities, as flash attention does, and (ii) goes over the key blocks
once in the backward, in the keys' orientation: each block's P^T and dS^T
([keys, queries], against the queries that see it) are computed once and
give the block's whole dK = dS^T Q and dV = P^T dO and its share of dQ^T =
K^T dS^T. With K^T copied once (the size of K), all five products are in the
plain forms XLA:CPU runs on its fast path. In the queries' orientation, dK
and dV contract over the major axis of P and dS, a transposed form XLA:CPU
leaves to Eigen, and each key block's share has to be padded and added
(README, Performance: the local sweep's shapes).

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
# Positions per block of the causal loops: the forward's block of queries
# [a, b) meets keys [0, b) only, and the backward's block of keys [c, d)
# queries [c, L) only, so the score blocks above the diagonal are never
# computed. Smaller blocks skip more of them, but as more, smaller products.
QUERY_BLOCK = 64
# What the backward reads, as checkpoint names: the heads-major q, k and v the
# kernel takes, and its output (token-major, as the output projection reads it)
# and log-sum-exp.
ATTENTION_INPUTS = ("attention_q", "attention_k", "attention_v")
ATTENTION_OUTPUTS = ("attention_out", "attention_lse")
ATTENTION_RESIDUALS = (*ATTENTION_INPUTS, *ATTENTION_OUTPUTS)


def chunk_rows(batch: int, n_heads: int, length: int) -> int:
    """Sequences per chunk: the most whose scores fit CHUNK_SCORE_BYTES, dividing the batch."""
    rows = max(1, min(batch, CHUNK_SCORE_BYTES // (4 * n_heads * length * length)))
    while batch % rows:
        rows -= 1
    return rows


def _swap_positions_and_heads(x_BxLxHx):
    """[B, L, H, ...] <-> [B, H, L, ...]: token-major to heads-major and back."""
    return jnp.swapaxes(x_BxLxHx, 1, 2)


def reference_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    """softmax(q k^T / sqrt(H), causal) v, as XLA computes it: the function the kernel matches."""
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation="xla"
    )


def chunked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK):
    """Causal attention, `chunk_rows` sequences at a time; [B, L, H, K] in and out."""
    b, length, n, _ = q_BxLxHxK.shape
    rows = chunk_rows(b, n, length)
    # Named, so that a rematerialised block keeps the heads-major copies the backward
    # reads, not the projection they came from and three transposes to redo.
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (
        checkpoint_name(_swap_positions_and_heads(x), name)
        for x, name in zip((q_BxLxHxK, k_BxLxHxK, v_BxLxHxK), ATTENTION_INPUTS, strict=True)
    )
    return _attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows)


def _causal(rows: int, cols: int, offset: int = 0):
    """[rows, cols] mask: query offset + i may see key j <= offset + i."""
    return jnp.arange(cols)[None, :] <= offset + jnp.arange(rows)[:, None]


def _causal_keys(rows: int, cols: int):
    """[rows, cols] mask in the keys' orientation, both from one offset: key i is seen by
    query j >= i. (Built directly: a transposed `_causal` slows the fusions that read it.)"""
    return jnp.arange(rows)[:, None] <= jnp.arange(cols)[None, :]


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


def _backward_chunk(q_RxHxLxK, k_RxHxLxK, v_RxHxLxK, lse_RxHxL, delta_RxHxL, dout_RxHxLxK):
    length = q_RxHxLxK.shape[2]
    scale = q_RxHxLxK.shape[-1] ** -0.5
    dtype = q_RxHxLxK.dtype
    # K^T once (a copy the size of K), so that dQ^T = K^T dS^T is a plain product.
    kt_RxHxKxM = jnp.swapaxes(k_RxHxLxK, 2, 3)
    # One pass over the key blocks [c, d), each against the queries [c, L) that see it, in
    # the keys' orientation: P^T and dS^T once, then the block's whole dK = dS^T Q and
    # dV = P^T dO, and its share of dQ^T, added into those queries' columns.
    dks, dvs = [], []
    for c, d in _blocks(length):
        # Masked before exp, as in the forward (exp sends _MASKED to exactly 0): P^T is then
        # written in one pass that both its readers take, not exp's output and then the select.
        pt_RxHxMxL = jnp.exp(
            jnp.where(
                _causal_keys(d - c, length - c),
                _scores(k_RxHxLxK[:, :, c:d], q_RxHxLxK[:, :, c:]),
                _MASKED,
            )
            - lse_RxHxL[:, :, None, c:]
        )
        dpt_RxHxMxL = jnp.einsum(
            "rnmh,rnlh->rnml",
            v_RxHxLxK[:, :, c:d],
            dout_RxHxLxK[:, :, c:],
            preferred_element_type=jnp.float32,
        )
        dst_RxHxMxL = (pt_RxHxMxL * (dpt_RxHxMxL - delta_RxHxL[:, :, None, c:]) * scale).astype(
            dtype
        )
        dks.append(jnp.einsum("rnml,rnlh->rnmh", dst_RxHxMxL, q_RxHxLxK[:, :, c:]))
        dvs.append(jnp.einsum("rnml,rnlh->rnmh", pt_RxHxMxL.astype(dtype), dout_RxHxLxK[:, :, c:]))
        part_RxHxKxL = jnp.einsum("rnhm,rnml->rnhl", kt_RxHxKxM[:, :, :, c:d], dst_RxHxMxL)
        if c == 0:  # the first block meets every query
            dqt_RxHxKxL = part_RxHxKxL
        else:
            dqt_RxHxKxL = jnp.concatenate(
                [dqt_RxHxKxL[..., :c], dqt_RxHxKxL[..., c:] + part_RxHxKxL], -1
            )
    return (
        jnp.swapaxes(dqt_RxHxKxL, 2, 3),
        jnp.concatenate(dks, 2),
        jnp.concatenate(dvs, 2),
    )


def _chunks(x_Bx, rows: int):
    return x_Bx.reshape(x_Bx.shape[0] // rows, rows, *x_Bx.shape[1:])


def _unchunk(x_CxRx):
    return x_CxRx.reshape(x_CxRx.shape[0] * x_CxRx.shape[1], *x_CxRx.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows: int):
    """Heads-major q, k and v in; the output token-major ([B, L, H, K]), as read next."""
    return _attention_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows)[0]


def _attention_forward(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, rows: int):
    out, lse = jax.lax.map(
        lambda qkv: _forward_chunk(*qkv),
        tuple(_chunks(x, rows) for x in (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK)),
    )
    # Named, so that a rematerialised block keeps them (transformer.REMAT_POLICIES). The
    # output is kept token-major: the backward reads it only through delta below, and the
    # output projection's weight gradient takes it in that layout, not transposed again.
    out_name, lse_name = ATTENTION_OUTPUTS
    out_BxLxHxK = checkpoint_name(_swap_positions_and_heads(_unchunk(out)), out_name)
    lse_BxHxL = checkpoint_name(_unchunk(lse), lse_name)
    return out_BxLxHxK, (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out_BxLxHxK, lse_BxHxL)


def _attention_backward(rows: int, saved, dout_BxLxHxK):
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, out_BxLxHxK, lse_BxHxL = saved
    # d softmax: dS = P * (dP - delta), delta = rowsum(dO * O), taken where O is kept.
    delta_BxLxH = jnp.sum(dout_BxLxHxK.astype(jnp.float32) * out_BxLxHxK, -1)
    delta_BxHxL = _swap_positions_and_heads(delta_BxLxH)
    dout_BxHxLxK = _swap_positions_and_heads(dout_BxLxHxK)
    grads = jax.lax.map(
        lambda args: _backward_chunk(*args),
        tuple(
            _chunks(x, rows)
            for x in (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, lse_BxHxL, delta_BxHxL, dout_BxHxLxK)
        ),
    )
    return tuple(_unchunk(g) for g in grads)


_attention.defvjp(_attention_forward, _attention_backward)
