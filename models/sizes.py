"""Model shapes, the size ladder, and parameter and FLOP counts.

`ModelShape` is the one description of a model's size. It owns every
derived count (exact parameters, Kaplan's non-embedding N, training FLOPs
per token), so no other module recomputes them.

Conventions (Kaplan et al. 2020, section 2.1):
- non-embedding parameters N ~= 12 * n_layer * d_model**2 when d_ff = 4 d_model
  (attention 4 d^2, MLP 2 d d_ff per layer; biases and norms left out);
- forward FLOPs per token ~= 2 N + 2 n_layer n_ctx d_model; training
  (forward + backward) is three times that: 6 N + 6 n_layer n_ctx d_model.
"""

from __future__ import annotations

import dataclasses

# How training FLOPs per token are counted. Papers differ, and a fit made
# under one convention is not comparable with one made under another:
#   6N                   Kaplan's C ~= 6 N B S, N non-embedding (his Table 1 drops attention)
#   6N_total             6 N with N every parameter, embeddings included (Chinchilla's budgets)
#   6N+attention         6 N + 6 n_layer n_ctx d_model (Kaplan 2.1, attention over the context)
#   6N+causal_attention  the same with the attention term halved, as a causal mask does
FLOP_CONVENTIONS = ("6N", "6N_total", "6N+attention", "6N+causal_attention")
DEFAULT_FLOP_CONVENTION = "6N+attention"  # what runs.flops and the `flops` metric hold


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters that fix a decoder-only transformer's size."""

    n_layer: int
    d_model: int
    n_heads: int
    n_ctx: int  # context length in tokens
    vocab_size: int
    d_ff: int = 0  # 0 means 4 * d_model

    def __post_init__(self):
        for name in ("n_layer", "d_model", "n_heads", "n_ctx", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.d_ff < 0:
            raise ValueError(f"model.d_ff={self.d_ff} must be >= 0 (0 means 4 * d_model)")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # -- parameter counts -------------------------------------------------

    @property
    def params_per_layer(self) -> int:
        """Exact parameters of one block: 2 LayerNorms, QKV, output, MLP (with biases)."""
        d, f = self.d_model, self.d_ff
        norms = 2 * (2 * d)
        attention = (d * 3 * d + 3 * d) + (d * d + d)
        mlp = (d * f + f) + (f * d + d)
        return norms + attention + mlp

    @property
    def embedding_params(self) -> int:
        """Token embedding (tied with the output head) plus learned positions."""
        return self.vocab_size * self.d_model + self.n_ctx * self.d_model

    @property
    def n_params(self) -> int:
        """Exact count of the initialised parameter tree."""
        final_norm = 2 * self.d_model
        return self.n_layer * self.params_per_layer + final_norm + self.embedding_params

    @property
    def n_params_nonembedding(self) -> int:
        """Exact parameters outside the vocabulary and position embeddings."""
        return self.n_params - self.embedding_params

    @property
    def n_params_kaplan(self) -> int:
        """Kaplan's non-embedding N: 2 d (2 d_attn + d_ff) per layer, biases left out."""
        return kaplan_nonembedding_params(self.n_layer, self.d_model, self.d_ff)

    # -- FLOPs --------------------------------------------------------------

    @property
    def train_flops_per_token(self) -> int:
        """Kaplan's training FLOPs per token, 6 N + 6 n_layer n_ctx d_model."""
        return train_flops_per_token(self.n_params_kaplan, self.n_layer, self.n_ctx, self.d_model)

    def flops_per_token(self, convention: str = DEFAULT_FLOP_CONVENTION) -> int:
        """Training FLOPs per token under one of FLOP_CONVENTIONS."""
        n, attention = self.n_params_kaplan, 6 * self.n_layer * self.n_ctx * self.d_model
        counts = {
            "6N": 6 * n,
            "6N_total": 6 * self.n_params,
            "6N+attention": 6 * n + attention,
            "6N+causal_attention": 6 * n + attention // 2,
        }
        if convention not in counts:
            raise ValueError(
                f"unknown FLOP convention {convention!r}; known: {', '.join(FLOP_CONVENTIONS)}"
            )
        return counts[convention]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def kaplan_nonembedding_params(n_layer: int, d_model: int, d_ff: int | None = None) -> int:
    """N = 2 n_layer d_model (2 d_attn + d_ff), which is 12 n_layer d_model^2 at d_ff = 4d."""
    d_ff = 4 * d_model if d_ff is None else d_ff
    return 2 * n_layer * d_model * (2 * d_model + d_ff)


def train_flops_per_token(n_params: int, n_layer: int, n_ctx: int, d_model: int) -> int:
    """Training FLOPs per token: 6 N for the weights plus 6 n_layer n_ctx d_model for attention."""
    return 6 * n_params + 6 * n_layer * n_ctx * d_model
