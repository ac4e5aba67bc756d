"""SIGKILL a local sweep at a train step, a checkpoint save and a store write; relaunch until
done; the store must equal an uninterrupted sweep's (scaling/faults.py places the kills)."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaling.store import Store

ROOT = Path(__file__).parents[1]

STUDY = """
from launch.config import base_config

def get_config(arg=None):
    c = base_config()
    c.sweep_name = "killed"
    c.model.n_layer, c.model.n_ctx = 1, 32
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 30, 8, 2
    c.eval.batches, c.eval.points = 2, 4  # evals at steps 1, 3, 10, 30
    c.checkpoint.every = 10
    return c

def get_sweep(arg=None):
    return [{"model.d_model": 16, "model.n_heads": 1}, {"model.d_model": 32},
            {"model.d_model": 48, "model.n_heads": 3}]
"""


def _sweep(study, out: Path, data_cache, fault: str | None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    env.pop("SCALING_FAULT", None)
    if fault:
        env["SCALING_FAULT"] = fault
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "sweep",
            str(study),
            f"--config.store={out / 'store.sqlite'}",
            f"--config.workdir={out / 'runs'}",
            f"--config.data.cache_dir={data_cache}",
            "--config.progress=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _rows(path: Path):
    """{(run, step, name): value} of every metric, and the per-token vectors by (run, step)."""
    with sqlite3.connect(path) as conn:
        metrics = {
            (r, s, n): v
            for r, s, n, v in conn.execute("SELECT run_id, step, name, value FROM metrics")
        }
        per_token = {
            (r, s): np.frombuffer(b, "<f4")
            for r, s, b in conn.execute("SELECT run_id, step, losses FROM per_token")
        }
        counts = dict(conn.execute("SELECT run_id, COUNT(*) FROM runs GROUP BY run_id"))
    return metrics, per_token, counts


@pytest.mark.slow
def test_sigkill_anywhere_then_relaunch_equals_an_uninterrupted_sweep(tmp_path, data_cache):
    study = tmp_path / "killed.py"
    study.write_text(STUDY)
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    # Per process, the runs train in order, 30 steps each, saving at 10, 20, 30 and
    # writing eval rows at 1, 3, 10, 30.
    # 1: run 1 finishes; run 2 dies at its step 15 (its async save at 10 may still be
    #    in flight: then the relaunch starts it again from 0).
    # 2: run 2 resumes and dies during its second save (at 20 or 30).
    # 3: run 2 resumes and finishes (one eval row, at 30); run 3 dies inside its row
    #    write at step 10.
    # 4: run 3 resumes at 0 and finishes.
    for fault in ("train_step:45", "checkpoint_save:2", "store_write:4"):
        result = _sweep(study, killed, data_cache, fault)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-2000:])
        with Store(killed / "store.sqlite") as store:
            runs = store.runs("killed")
        if fault.startswith("checkpoint_save"):
            # The save was cut short: only its temporary folder is there.
            ckpts = killed / "runs" / runs[1].run_id / "checkpoints"
            assert list(ckpts.glob("*.orbax-checkpoint-tmp*")), sorted(ckpts.iterdir())
            assert runs[1].status == "running"
        if fault.startswith("store_write"):
            # The row being written at step 10 is gone whole; the rows before it are kept.
            with Store(killed / "store.sqlite") as store:
                steps, _ = store.scalars(runs[2].run_id, "eval_loss")
                assert steps.tolist() == [1, 3]
                assert store.metric_names(runs[2].run_id)
                assert runs[2].status == "running"
    final = _sweep(study, killed, data_cache, None)
    assert final.returncode == 0, final.stderr[-2000:]
    assert final.stdout.strip().splitlines()[-1] == "sweep done: 3 finished"
    assert not list((killed / "runs").glob("*/checkpoints/*.orbax-checkpoint-tmp*"))
    reference = _sweep(study, clean, data_cache, None)
    assert reference.returncode == 0, reference.stderr[-2000:]

    with Store(killed / "store.sqlite") as a, Store(clean / "store.sqlite") as b:
        runs_a, runs_b = a.runs("killed"), b.runs("killed")
        assert [r.run_id for r in runs_a] == [r.run_id for r in runs_b]
        assert all(r.status == "finished" and r.step == 30 for r in runs_a)
    metrics_a, per_token_a, counts_a = _rows(killed / "store.sqlite")
    metrics_b, per_token_b, counts_b = _rows(clean / "store.sqlite")
    assert counts_a == counts_b and set(counts_a.values()) == {1}
    # No row duplicated (the keys are unique) or missing, none extra.
    assert set(metrics_a) == set(metrics_b) and set(per_token_a) == set(per_token_b)
    for key, value in metrics_b.items():
        # The timing metrics differ by nature.
        if key[2] not in ("tokens_per_s", "mfu", "wall_time"):
            assert abs(metrics_a[key] - value) <= 1e-6 * max(1.0, abs(value)), key
    for key, losses in per_token_b.items():
        np.testing.assert_allclose(per_token_a[key], losses, rtol=1e-6, atol=1e-6)
