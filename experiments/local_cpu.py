"""The local study: five byte-level models on Shakespeare, trained on this CPU.

Five sizes from 3k to 442k non-embedding parameters (Kaplan N; 144x), the
same token budget for each (800 steps x 16 sequences x 128 tokens = 1.6M
tokens, a third of an epoch of the 38 training texts), the same optimizer
recipe. The whole sweep takes about ten minutes on a 2-core CPU and ends
with L(N) and, per size, the per-token law L(T) = a + b T^-c.

The budget is set by the per-token law: models this small first learn
unigram and bigram statistics, when loss is flat or even rising along the
context, and only after about a million tokens start to use it, which is
when L(T) falls as a power of T.

    scaling sweep experiments/local_cpu.py
    scaling sweep experiments/local_cpu.py:tiny     # a 1-minute smoke version
"""

from launch.config import base_config

# (n_layer, d_model, n_heads): aspect ratio d_model / n_layer between 16
# and 32, head size 16, as small Kaplan-style models.
SIZES = (
    (1, 16, 1),
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
    config.train.steps = 800
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 40
    # 128 held-out sequences: the per-token loss at one position is a mean
    # over this many tokens, so fewer makes the L(T) curves noisy.
    config.eval.batches = 8
    config.eval.points = 16
    config.checkpoint.every = 200
    if arg == "tiny":
        config.sweep_name = "local_cpu_tiny"
        config.train.steps = 60
        config.train.warmup_steps = 5
        config.eval.points = 6
        config.eval.batches = 2
        config.checkpoint.every = 30
    elif arg not in (None, ""):
        raise ValueError(f"unknown variant {arg!r} of local_cpu; use local_cpu.py or :tiny")
    return config


def get_sweep(arg=None):
    sizes = SIZES[:3] if arg == "tiny" else SIZES
    return [
        {"model.n_layer": n_layer, "model.d_model": d_model, "model.n_heads": n_heads}
        for n_layer, d_model, n_heads in sizes
    ]
