"""Kaplan et al. 2020's Figure 20 at GPU scale: six sizes on one H100 in about eight minutes.

Six decoder-only sizes from 393k to 135M non-embedding parameters (343x),
context 512, each trained on 100M bytes of the Linux kernel's C source (the
drivers of four Ethernet vendors: 1,006 files, 29.2M bytes), so no byte is
seen more than four times (3.5 passes). Per-token
losses are logged at log-spaced steps for Figure 20's two panels (loss
against the position T per size, and against the step for the largest) and
the learning curves.

Get the corpus (Debian's linux-source-6.1, 139 MB), then plan and run:

    apt-get install linux-source-6.1 && mkdir -p corpora
    tar -xf /usr/src/linux-source-6.1.tar.xz -C corpora \
        linux-source-6.1/drivers/net/ethernet/{intel,mellanox,broadcom,sfc}
    scaling plan experiments/kaplan_fig20_gpu.py --accelerator h100-1
    scaling sweep experiments/kaplan_fig20_gpu.py

The `:cpu` variant is the same design scaled to a 2-core CPU (the same corpus,
context 256, widths 32 to 128, 3.1M bytes each): it checks the pipeline, the
corpus and the fits before the GPU's time is spent.
"""

from launch.config import base_config

# (n_layer, d_model, n_heads): head size 64, d_model / n_layer from 64 to 96,
# inside the range where Kaplan's Figure 5 finds the loss flat in shape; six
# sizes, so that a two-parameter L(N) has three points per parameter.
SIZES = (
    (2, 128, 2),  # N = 393k
    (2, 192, 3),  # 885k
    (4, 320, 5),  # 4.92M
    (6, 512, 8),  # 18.9M
    (10, 640, 10),  # 49.2M
    (14, 896, 14),  # 135M
)
CPU_SIZES = (
    (1, 32, 2),  # 12.3k
    (2, 48, 3),  # 55.3k
    (2, 64, 4),  # 98.3k
    (3, 96, 6),  # 332k
    (4, 128, 8),  # 786k
)
CORPUS = ",".join(
    f"corpora/linux-source-6.1/drivers/net/ethernet/{vendor}/**/*.[ch]"
    for vendor in ("intel", "mellanox", "broadcom", "sfc")
)


def learning_rate(n_params: float) -> float:
    """Higher for smaller models, as Kaplan's equation D.1, at the scale of this short budget."""
    return min(3e-3, 6e-4 * (1e8 / n_params) ** 0.15)


def get_config(arg=None):
    if arg not in (None, "", "cpu"):
        raise ValueError(f"unknown variant {arg!r} of kaplan_fig20_gpu; use it bare or :cpu")
    config = base_config()
    config.sweep_name = "kaplan_fig20_gpu"
    config.data.corpus = "text"
    config.data.paths = CORPUS
    config.data.val_fraction = 0.02  # whole files; ~600k held-out bytes
    config.model.vocab_size = 256  # bytes: no tokenizer to ship to a machine offline
    config.model.n_ctx = 512
    config.model.compute_dtype = "bfloat16"
    config.train.batch_size = 96  # 49k tokens a step
    config.train.steps = 2050  # 100.7M tokens
    config.train.warmup_steps = 100
    config.eval.batches = 8  # 768 held-out sequences during training
    config.eval.final_batches = 32  # 3072 at the end, for the per-token fits
    config.eval.points = 16
    config.checkpoint.every = 1000
    if arg == "cpu":
        config.sweep_name = "kaplan_fig20_cpu"
        config.model.n_ctx = 256
        config.model.compute_dtype = "float32"
        config.train.batch_size = 16
        config.train.steps = 750  # 3.1M tokens
        config.train.warmup_steps = 40
        config.eval.batches = 8
        config.eval.final_batches = 64
        config.checkpoint.every = 250
    return config


def get_sweep(arg=None):
    sizes = CPU_SIZES if arg == "cpu" else SIZES
    return [
        {
            "model.n_layer": n_layer,
            "model.d_model": d_model,
            "model.n_heads": n_heads,
            "train.learning_rate": learning_rate(12 * n_layer * d_model**2),
        }
        for n_layer, d_model, n_heads in sizes
    ]
