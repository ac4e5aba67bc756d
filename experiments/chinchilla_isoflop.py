"""A Chinchilla-style IsoFLOP grid (Hoffmann et al. 2022, approach 2).

Nine training budgets C from 6e18 to 3e21 FLOPs (the budgets of the
paper's Figure 3), and at each budget seven model sizes spread by 4x either
side of the budget's compute-optimal size; each member trains on
D = C / (6 N) tokens, N the total parameter count, as the paper states its
budgets. Fitting a parabola in log N to each budget's final losses gives
N_opt(C); the exponents a and b of N_opt ~ C^a and D_opt ~ C^b follow.

    scaling plan experiments/chinchilla_isoflop.py --accelerator v5p-128
    scaling sweep experiments/chinchilla_isoflop.py:local   # a CPU version, minutes

`:local` is the same design scaled down to byte-level models on this
machine's corpus: five budgets from 2.5e10 to 4e11 FLOPs, five sizes per
budget. Budgets of 1e13 and more would take hours on a 2-core CPU (the
local grid's 3.9e12 FLOPs took about 30 minutes), so it is that much smaller.
"""

import math

from launch.config import base_config
from models.sizes import ModelShape

# The convention the budgets are stated in: 6 N D with N every parameter,
# embeddings included (Hoffmann et al. 2022, section 3 and appendix F).
FLOP_CONVENTION = "6N_total"

# Figure 3 of Hoffmann et al. 2022: the nine IsoFLOP budgets.
BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21)
LOCAL_BUDGETS = (2.5e10, 5e10, 1e11, 2e11, 4e11)

# Sizes per budget: neighbours on the ladder around the compute-optimal size;
# seven shapes ~1.5x apart span about 10x in N, as the paper's profiles do.
SIZES_PER_BUDGET = 7
LOCAL_SIZES_PER_BUDGET = 5

# (n_layer, d_model, n_heads) of the paper's Table A9 ladder (a selection from
# 44M to 16B parameters; head size 64 or 128, d_model / n_layer from 20 to 100).
LADDER = (
    (8, 512, 8),
    (10, 640, 10),
    (12, 768, 12),
    (14, 896, 14),
    (16, 1024, 16),
    (18, 1280, 10),
    (20, 1536, 12),
    (22, 1792, 14),
    (24, 2048, 16),
    (26, 2304, 18),
    (28, 2560, 20),
    (30, 3072, 24),
    (32, 3584, 28),
    (36, 4096, 32),
    (40, 5120, 40),
)
# Byte-level models for the local version: 1 to 4 layers, head size 8 or 16.
LOCAL_LADDER = (
    (1, 8, 1),
    (1, 12, 1),
    (1, 16, 1),
    (1, 24, 1),
    (1, 32, 2),
    (2, 32, 2),
    (2, 48, 3),
    (2, 64, 4),
    (3, 64, 4),
    (3, 80, 5),
    (4, 96, 6),
    (4, 128, 8),
)

N_CTX, VOCAB = 2048, 32_000  # Hoffmann et al.: 2048-token context, 32k SentencePiece vocabulary
LOCAL_N_CTX, LOCAL_VOCAB = 128, 256  # bytes
BATCH = 256  # sequences per step: 0.5M tokens, the paper's starting batch (Table A9 footnote)
LOCAL_BATCH = 16
# The local profiles are centred on 200 tokens per parameter, not 20: at
# budgets this small, byte-level models of a few thousand parameters need
# hundreds of steps, and a first grid centred on 20 had every profile's
# minimum at its smallest size.
LOCAL_TOKENS_PER_PARAM = 200
MIN_STEPS = 50  # rounding steps to an integer then moves the budget by at most 1%


def get_config(arg=None):
    config = base_config()
    if arg == "local":
        config.sweep_name = "chinchilla_isoflop_local"
        config.model.n_ctx, config.model.vocab_size = LOCAL_N_CTX, LOCAL_VOCAB
        config.train.batch_size = LOCAL_BATCH
        config.train.learning_rate = 3e-3
        config.eval.batches = 8  # 128 held-out sequences for the final loss
        config.eval.points = 4
        config.checkpoint.every = 500
        return config
    if arg not in (None, ""):
        raise ValueError(
            f"unknown variant {arg!r} of chinchilla_isoflop; use chinchilla_isoflop.py or :local"
        )
    config.sweep_name = "chinchilla_isoflop"
    config.model.n_ctx, config.model.vocab_size = N_CTX, VOCAB
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "bfloat16"
    # MassiveText is not public: tokenise your own text once with a 32k tokenizer,
    # `scaling prepare --text ... --tokenizer bpe:32000 --out gs://BUCKET/text-32k` (or a
    # 32k SentencePiece-style tokenizer.json), and train on it with
    # --config.data.manifest=gs://BUCKET/text-32k (or pre-tokenised .npy streams,
    # --config.data.train_tokens=... --config.data.val_tokens=...).
    config.data.corpus = "tokens"
    config.train.batch_size = BATCH
    # AdamW, peak 2e-4 for the larger models, cosine to a tenth of the peak over
    # the run's own length (Hoffmann et al. 2022, section 3 and appendix A).
    config.train.learning_rate = 2e-4
    config.train.final_lr_fraction = 0.1
    config.train.weight_decay = 0.1
    config.eval.batches = 16
    # 24 log-spaced evals: with 16, rounding to whole steps merged the early ones and left
    # the longest runs under 3 evals per decade, too few for their learning-curve fits.
    config.eval.points = 24
    config.checkpoint.every = 1000
    return config


def get_sweep(arg=None):
    local = arg == "local"
    budgets, count = (
        (LOCAL_BUDGETS, LOCAL_SIZES_PER_BUDGET) if local else (BUDGETS, SIZES_PER_BUDGET)
    )
    ladder = LOCAL_LADDER if local else LADDER
    n_ctx, vocab = (LOCAL_N_CTX, LOCAL_VOCAB) if local else (N_CTX, VOCAB)
    batch = LOCAL_BATCH if local else BATCH
    shapes = [
        ModelShape(n_layer=l, d_model=d, n_heads=h, n_ctx=n_ctx, vocab_size=vocab)
        for l, d, h in ladder
    ]
    members = []
    for budget in budgets:
        for shape in sizes_at(budget, shapes, count, LOCAL_TOKENS_PER_PARAM if local else 20):
            steps, batch_size = steps_for_budget(budget, shape.n_params, batch, n_ctx)
            members.append(
                {
                    "model.n_layer": shape.n_layer,
                    "model.d_model": shape.d_model,
                    "model.n_heads": shape.n_heads,
                    "train.steps": steps,
                    "train.batch_size": batch_size,
                    # Warmup over the first 2% of the run, at least one step.
                    "train.warmup_steps": max(1, steps // 50),
                }
            )
    return members


def compute_optimal_params(budget: float, tokens_per_param: float = 20) -> float:
    """The size that sees `tokens_per_param` tokens per parameter: C = 6 N (r N).

    Chinchilla's rule of thumb is r ~ 20.
    """
    return math.sqrt(budget / (6 * tokens_per_param))


def sizes_at(budget, shapes, count, tokens_per_param=20):
    """`count` neighbouring shapes of the ladder centred (in log total N) on the budget's
    compute-optimal size, so the profile's minimum lies inside it."""
    shapes = sorted(shapes, key=lambda s: s.n_params)
    target = math.log(compute_optimal_params(budget, tokens_per_param))
    nearest = min(range(len(shapes)), key=lambda i: abs(math.log(shapes[i].n_params) - target))
    first = min(max(0, nearest - count // 2), len(shapes) - count)
    return shapes[first : first + count]


def steps_for_budget(budget: float, n_total: int, batch: int, n_ctx: int) -> tuple[int, int]:
    """(steps, batch) with 6 n_total steps batch n_ctx within 1% of budget.

    The batch halves (down to a power-of-two floor of 8 sequences) until the
    run has MIN_STEPS steps, so that rounding to whole steps costs under 1%.
    """
    while True:
        steps = max(1, round(budget / (6 * n_total * batch * n_ctx)))
        if steps >= MIN_STEPS or batch <= 8:
            return steps, batch
        batch //= 2
