"""Strict JAX settings for every test, and shared fixtures.

Rank promotion raises, so a silent broadcast is a test failure. The
real-text corpus is downloaded once per test session into a temporary
cache (through pip, as a user's first run does).
"""

import os

# gcsfs (from 2026.10) asks GCS's gRPC control plane what kind each bucket is, and the
# emulator tests/test_gcs.py starts speaks only the JSON API: a minute's timeout per bucket.
# Read when gcsfs is imported, so set before any test can import it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import pytest

from launch.host_memory import keep_freed_memory

keep_freed_memory()  # as the command line does, before JAX starts its threads
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A cache folder shared by the tests that need the real corpus."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(tmp_path, data_cache):
    """A config small enough to train in seconds, writing under tmp_path."""
    from launch.config import base_config

    config = base_config()
    config.sweep_name = "test"
    config.store = str(tmp_path / "store.sqlite")
    config.workdir = str(tmp_path / "runs")
    config.progress = False
    config.data.cache_dir = data_cache
    config.model.n_layer = 1
    config.model.d_model = 32
    config.model.n_heads = 2
    config.model.n_ctx = 32
    config.train.steps = 20
    config.train.batch_size = 8
    config.train.warmup_steps = 2
    config.eval.batches = 2
    config.eval.points = 4
    config.checkpoint.every = 10
    return config


@pytest.fixture
def one_run_store(tmp_path):
    """A store path holding sweep 's' of one finished run 'r' with one eval (loss only)."""
    from scaling.store import RunRecord, Store

    path = str(tmp_path / "store.sqlite")
    with Store(path) as store:
        store.register_run(RunRecord("r", {}, 10, 20, 1, 8, 1, 16, 100, 1e3), sweep="s")
        store.log_eval("r", 10, {"eval_loss": 3.0})
        store.set_status("r", "finished")
        store.add_sweep("s", {}, ["r"])
    return path


os.environ.setdefault("TQDM_DISABLE", "1")
