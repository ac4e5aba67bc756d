"""The local study: six byte-level models on Shakespeare, trained on this CPU.

Six sizes from 3k to 442k non-embedding parameters (Kaplan N; 144x), the
same token budget for each (1,800 steps x 16 sequences x 128 tokens = 3.7M
tokens, about 0.8 of an epoch of the 38 training texts), the same optimizer
recipe. The sweep trains one member per core; on a 2-core CPU it takes
about six minutes and ends with L(N) and, per size, the per-token law
L(T) = E + A T^-alpha (Kaplan et al. 2020, Figure 20).

The budget is set by the per-token law: models this small first learn
unigram and bigram statistics, when loss is flat or even rising along the
context, and only after a few million tokens use it, which is when L(T)
falls with T over the whole context. The last eval reads 1,024 held-out
sequences, so a position's mean loss is a statement about the model and
not about the sample (each bin of T reports its standard error).

    scaling sweep experiments/local_cpu.py
    scaling sweep experiments/local_cpu.py:tiny     # a 1-minute smoke version
"""

from launch.config import base_config

# (n_layer, d_model, n_heads): aspect ratio d_model / n_layer between 16
# and 32, head size 16, as small Kaplan-style models. Six sizes, so that a
# two-parameter L(N) has three points per parameter.
SIZES = (
    (1, 16, 1),
    (1, 32, 2),
    (2, 32, 2),
    (2, 48, 3),
    (3, 64, 4),
    (4, 96, 6),
)


def get_config(arg=None):
    config = base_config()
    config.sweep_name = "local_cpu"
    config.model.n_ctx = 128
    config.model.vocab_size = 256  # bytes
    config.train.steps = 1800
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 40
    # Evals during training read 256 held-out sequences (the learning
    # curves); the last reads 1,024, for the final and per-token fits.
    config.eval.batches = 16
    config.eval.final_batches = 64
    config.eval.points = 14
    config.checkpoint.every = 600
    if arg == "tiny":
        config.sweep_name = "local_cpu_tiny"
        config.train.steps = 60
        config.train.warmup_steps = 5
        config.eval.points = 6
        config.eval.batches = 2
        config.eval.final_batches = 0
        config.checkpoint.every = 30
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of local_cpu; use local_cpu.py or :tiny")
    return config


def get_sweep(arg=None):
    sizes = (SIZES[0], SIZES[2], SIZES[3]) if arg == "tiny" else SIZES
    return [
        {"model.n_layer": n_layer, "model.d_model": d_model, "model.n_heads": n_heads}
        for n_layer, d_model, n_heads in sizes
    ]
