"""Kaplan et al. 2020, "Scaling Laws for Neural Language Models": the setup of its L(N) sweep.

Ten decoder-only sizes from 768 to 1.47e9 non-embedding parameters
(N = 12 n_layer d_model^2; section 1.2 reports "768 to 1.5 billion"), each
trained for the paper's 2.5e5 steps of 512 sequences of 1024 tokens, with a
3000-step linear warmup and a cosine decay to zero (section 2.2), at the
learning rate the paper's equation D.1 gives for its size. Evals are
log-spaced and log the per-token loss (its Figure 20).

    scaling plan experiments/kaplan2020.py --accelerator v4-128

The paper's FLOP count is C ~= 6 N B S with N non-embedding (section 2.1,
Table 1 drops the attention term), the "6N" convention of models/sizes.py.
"""

import math

from launch.config import base_config

FLOP_CONVENTION = "6N"

# (n_layer, d_model, n_heads). Widths and depths are GPT-2's for the four
# largest (Radford et al. 2019, Table 2: 12x768, 24x1024, 36x1280, 48x1600;
# head size 64); the smaller ones keep d_model / n_layer between 8 and 64,
# the range over which Kaplan's Figure 5 finds the loss within a few percent.
# The smallest is the paper's 768-parameter model: 1 layer of width 8.
SIZES = (
    (1, 8, 1),  # N = 768
    (2, 32, 2),  # 24.6k
    (2, 64, 2),  # 98.3k
    (4, 128, 2),  # 786k
    (6, 256, 4),  # 4.72M
    (6, 512, 8),  # 18.9M
    (12, 768, 12),  # 84.9M
    (24, 1024, 16),  # 302M
    (36, 1280, 20),  # 708M
    (48, 1600, 25),  # 1.47B
)


def learning_rate(n_params: float) -> float:
    """Kaplan et al. 2020, equation D.1: LR(N) ~= 0.003239 - 0.0001395 log(N)."""
    return 0.003239 - 0.0001395 * math.log(n_params)


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of kaplan2020; it takes none")
    config = base_config()
    config.sweep_name = "kaplan2020"
    config.model.n_ctx = 1024  # section 2.2: n_ctx = 1024
    config.model.vocab_size = 50_257  # GPT-2's byte-pair encoding (section 2.3)
    config.model.d_ff = 0  # 4 d_model, as in the paper (section 2.1)
    config.model.compute_dtype = "bfloat16"
    # WebText2 is not public: tokenise your own text once with GPT-2's tokenizer.json
    # (50,257 ids), `scaling prepare --text ... --tokenizer gpt2/tokenizer.json --out
    # gs://BUCKET/webtext-gpt2`, and train on it with
    # --config.data.manifest=gs://BUCKET/webtext-gpt2 (or pre-tokenised .npy streams,
    # --config.data.train_tokens=... --config.data.val_tokens=...).
    config.data.corpus = "tokens"
    config.train.steps = 250_000  # section 2.2: 2.5e5 steps
    config.train.batch_size = 512  # section 2.2: 512 sequences of 1024 tokens
    config.train.warmup_steps = 3000  # section 2.2: 3000-step linear warmup
    config.train.final_lr_fraction = 0.0  # section 2.2: cosine decay to zero
    config.eval.points = 32  # log-spaced steps, dense on a log axis (Figures 2, 20)
    config.eval.batches = 8  # 4096 held-out sequences of 1024 tokens per eval
    config.checkpoint.every = 5000
    return config


def get_sweep(arg=None):
    return [
        {
            "model.n_layer": n_layer,
            "model.d_model": d_model,
            "model.n_heads": n_heads,
            "train.learning_rate": learning_rate(12 * n_layer * d_model**2),
        }
        for n_layer, d_model, n_heads in SIZES
    ]
