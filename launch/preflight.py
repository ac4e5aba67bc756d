"""The checks a run needs the data and the disk for, made before anything is written.

`validate` (launch/config.py) checks a config on its own; these find what
only the files can tell: text that cannot be read, documents shorter than
the context, an eval set larger than the held-out text, a disk too full for
one checkpoint. They run before the store is opened or a run folder made,
so a refused run leaves no trace. Preparing a cached corpus takes a few
tens of milliseconds, so a sweep checks every member first.
"""

from __future__ import annotations

from pathlib import Path

from launch import checkpoints, data
from launch import config as config_lib
from scaling.errors import UserError


def check_run(config) -> data.Corpus:
    """The run's prepared corpus; UserError for the first input that cannot work."""
    shape = config_lib.model_config(config).shape
    corpus = data.prepare_corpus(config.data, shape.vocab_size, progress=config.progress)
    if config.seed < 0:
        raise UserError(f"config.seed={config.seed} must be >= 0")
    if data.windows_per_epoch(len(corpus.train), shape.n_ctx) < 1:
        raise UserError(
            f"the training text has {len(corpus.train)} tokens, fewer than the 2 x "
            f"model.n_ctx = {2 * shape.n_ctx} that training windows need; use a shorter "
            "model.n_ctx or more training text"
        )
    # Building the eval set raises the one-line error that names what is too short.
    data.eval_batches(
        corpus.val, config_lib.eval_batch_counts(config)[1], config.train.batch_size, shape.n_ctx
    )
    # Checkpoints go to the bucket when there is one (launch/train.py); a gs://
    # bucket has no fixed size to check.
    root = Path(config.launch.bucket) / "runs" if config.launch.bucket else Path(config.workdir)
    if not config.launch.bucket.startswith("gs://"):
        checkpoints.check_disk_space(
            root / config_lib.run_id(config) / "checkpoints", shape.n_params
        )
    return corpus
