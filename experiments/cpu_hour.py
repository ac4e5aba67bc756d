"""An hour on a 2-core CPU: Kaplan's per-token law and Chinchilla's compute-optimal exponent.

One sweep of 24 byte-level models on the Linux kernel's Ethernet drivers
(C source, 29.2M bytes; the corpus of experiments/kaplan_fig20_gpu.py),
context 256, two designs in one store:

- a ladder of six sizes from 12k to 1.5M non-embedding parameters, each
  trained on the same 3.1M tokens: per-token loss L(T) = E + A T^-alpha per
  size (Kaplan et al. 2020, Figure 20), the three largest being the ones
  the figure is about;
- an IsoFLOP grid (Hoffmann et al. 2022, approach 2): three budgets of
  6 N_total D = 3e11, 1e12 and 3e12 FLOPs, six sizes each, spread around
  the size that sees 100 tokens per parameter; the parabolas' minima give
  N_opt ~ C^a, to compare with Chinchilla's a = 0.5. All 24 final losses
  also fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3, a = beta / (alpha + beta)).

The recipe follows Porian et al. 2024, who recovered a ~ 0.5 at small scale
where Kaplan's setup gave 0.73: the budget counts every parameter (the
output layer is the tied embedding, so its FLOPs are in 6 N_total), the
warmup is short (N_total tokens, at most 5% of the run), AdamW's beta2 is
0.99 for this small batch, and the learning rate falls with size.

    apt-get install linux-source-6.1 && mkdir -p corpora
    tar -xf /usr/src/linux-source-6.1.tar.xz -C corpora \\
        linux-source-6.1/drivers/net/ethernet/{intel,mellanox,broadcom,sfc}
    scaling sweep experiments/cpu_hour.py
    scaling fit --sweep cpu_hour --what per-token --law saturating
    scaling fit --sweep cpu_hour --what isoflop --law compute_optimal
    scaling fit --sweep cpu_hour --what final --law chinchilla

The `:lr` variant measures the two corrections the main sweep only prescribes:
every IsoFLOP member again at 2, 4, 8 and 16 times its learning rate, and
the middle budget with beta2 = 0.95 (78 more runs; the members at 1x are the
main sweep's own runs, so a store that holds them trains only the rest):

    scaling sweep experiments/cpu_hour.py:lr

The `:tuned` variant is the main sweep with the IsoFLOP grid at the learning rate
the `:lr` variant found best, put as one rule (`tuned_learning_rate`): the same
24 runs' compute, Chinchilla's a without the 78 runs of the search. The ladder
keeps the main sweep's rate (and so its runs): the search covered the grid's
sizes and lengths only.

    scaling sweep experiments/cpu_hour.py:tuned
    scaling fit --sweep cpu_hour_tuned --what isoflop --law compute_optimal

The `:warmup` variant measures Porian's short warmup: the middle budget at the
tuned rate (six of `:tuned`'s runs) and again with a warmup ten times longer.

    scaling sweep experiments/cpu_hour.py:warmup
"""

from experiments.chinchilla_isoflop import sizes_at, steps_for_budget
from experiments.kaplan_fig20_gpu import CORPUS, learning_rate
from launch.config import base_config
from models.sizes import ModelShape

N_CTX, VOCAB, BATCH = 256, 256, 16  # bytes; 4,096 tokens a step

# (n_layer, d_model, n_heads): head size 16 (12 at d_model 24), d_model / n_layer 16 to 32.
LADDER = (
    (1, 16, 1),  # N = 3.1k non-embedding, 11.5k total
    (1, 24, 2),  # 6.9k
    (1, 32, 2),  # 12.3k non-embedding, 29.2k total
    (2, 32, 2),  # 24.6k
    (2, 48, 3),  # 55.3k
    (2, 64, 4),  # 98.3k
    (3, 64, 4),  # 147k
    (3, 80, 5),  # 230k
    (3, 96, 6),  # 332k
    (4, 96, 6),  # 442k
    (4, 112, 7),  # 602k
    (4, 128, 8),  # 786k
    (5, 160, 10),  # 1.54M
)

# The per-token ladder: six sizes (three points per parameter of L(N)), one budget of tokens.
PER_TOKEN_SIZES = ((1, 32, 2), (2, 48, 3), (2, 64, 4), (3, 96, 6), (4, 128, 8), (5, 160, 10))
PER_TOKEN_STEPS = 750  # 3.1M tokens each

# The IsoFLOP grid, in the Chinchilla convention C = 6 N_total D.
BUDGETS = (3e11, 1e12, 3e12)
# Six sizes per budget, 10-16x in N, centred on 100 tokens per parameter. A first grid of
# five, centred on 50, found every profile's minimum at or below its smallest size (byte
# models of C source gain far more from data than from size at these budgets), so each
# profile got one size more, below.
SIZES_PER_BUDGET = 6
TOKENS_PER_PARAM = 100

# The :lr variant: Porian et al. tuned the learning rate and beta2 per size where the main
# sweep applies a rule. Above the rule only: at the largest budget half the rule's rate
# was worse than the rule at every size, and twice it better at all but the smallest.
# 4x was still the best at most sizes, and 8x at the smallest, so every member trains up
# to 16x.
LR_FACTORS = (1.0, 2.0, 4.0, 8.0, 16.0)
BETA2_ABLATION = 0.95  # at the middle budget, every size

# The :tuned variant: the IsoFLOP grid at the rate the :lr variant found best. That rate
# does not fall with N (1.3e-2 to 4.6e-2 at every size from 11.5k to 183k total parameters
# in runs of 500 steps or more, against the rule's 2.9e-3 falling to 1.6e-3), but it is
# lower for runs of a few hundred steps (3.4e-3 at 92 steps, 7.4e-3 at 150). So one peak,
# scaled down in proportion for short runs; at the low end of the best rates, because
# past the best the loss rises faster than before it (81k at 3e12: 1.93 at 1.5e-2, 2.18
# at 3e-2, 1.95 at 7.4e-3).
TUNED_LR, TUNED_FULL_STEPS = 1.5e-2, 500

# The :warmup variant: Porian's last correction. The middle budget at the tuned rate, as
# :tuned trains it, and again with a warmup LONG_WARMUP times longer (10 N_total tokens,
# at most a quarter of the run), as a fixed warmup long next to small models' runs is.
LONG_WARMUP = 10


def tuned_learning_rate(steps: int) -> float:
    """The :lr variant's best rates as one rule: TUNED_LR, less for runs under
    TUNED_FULL_STEPS steps."""
    return TUNED_LR * min(1.0, steps / TUNED_FULL_STEPS)


def get_config(arg=None):
    if arg not in (None, "", "lr", "tuned", "warmup"):
        raise ValueError(
            f"unknown variant {arg!r} of cpu_hour; use it bare, :lr, :tuned or :warmup"
        )
    config = base_config()
    config.sweep_name = f"cpu_hour_{arg}" if arg else "cpu_hour"
    config.data.corpus = "text"
    config.data.paths = CORPUS
    config.data.val_fraction = 0.02  # whole files; ~600k held-out bytes
    config.model.vocab_size = VOCAB
    config.model.n_ctx = N_CTX
    config.train.batch_size = BATCH
    config.train.b2 = 0.99  # Porian et al.: beta2 = 0.95 costs small batches loss
    config.eval.batches = 8  # 128 held-out sequences during training
    config.eval.final_batches = 64  # 1,024 at the end, for the per-token fits
    config.eval.points = 14  # enough for a learning-curve fit per run
    config.checkpoint.every = 500
    return config


def _shape(n_layer, d_model, n_heads) -> ModelShape:
    return ModelShape(
        n_layer=n_layer, d_model=d_model, n_heads=n_heads, n_ctx=N_CTX, vocab_size=VOCAB
    )


def _member(shape: ModelShape, steps: int, batch: int, lr_factor: float = 1.0) -> dict:
    return {
        "model.n_layer": shape.n_layer,
        "model.d_model": shape.d_model,
        "model.n_heads": shape.n_heads,
        "train.steps": steps,
        "train.batch_size": batch,
        "train.learning_rate": lr_factor * learning_rate(shape.n_params_kaplan),
        # Porian et al.: warm up over N_total tokens, not a fixed share of the run.
        "train.warmup_steps": max(5, min(steps // 20, round(shape.n_params / (batch * N_CTX)))),
    }


def _isoflop_grid(budget: float, lr_factor: float = 1.0) -> list[dict]:
    shapes = [_shape(*s) for s in LADDER]
    members = []
    for shape in sizes_at(budget, shapes, SIZES_PER_BUDGET, TOKENS_PER_PARAM):
        steps, batch = steps_for_budget(budget, shape.n_params, BATCH, N_CTX)
        members.append(_member(shape, steps, batch, lr_factor))
    return members


def _ladder() -> list[dict]:
    return [_member(_shape(*s), PER_TOKEN_STEPS, BATCH) for s in PER_TOKEN_SIZES]


def _tuned(member: dict) -> dict:
    return {**member, "train.learning_rate": tuned_learning_rate(member["train.steps"])}


def _long_warmup(member: dict) -> dict:
    steps = member["train.steps"]
    return {
        **member,
        "train.warmup_steps": min(steps // 4, LONG_WARMUP * member["train.warmup_steps"]),
    }


def get_sweep(arg=None):
    if arg == "tuned":
        return _ladder() + [_tuned(m) for budget in BUDGETS for m in _isoflop_grid(budget)]
    if arg == "warmup":
        middle = [_tuned(m) for m in _isoflop_grid(BUDGETS[1])]
        return middle + [_long_warmup(m) for m in middle]
    if arg == "lr":
        grid = [m for b in BUDGETS for f in LR_FACTORS for m in _isoflop_grid(b, f)]
        beta2 = [{**m, "train.b2": BETA2_ABLATION} for m in _isoflop_grid(BUDGETS[1])]
        return grid + beta2
    return _ladder() + [m for budget in BUDGETS for m in _isoflop_grid(budget)]
