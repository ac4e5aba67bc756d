"""Preemption notices: SIGTERM (or the configured signal) mid-run saves at the next step, marks
the run preempted and exits 143; the relaunch loses no step and matches an uninterrupted run."""

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launch import config as config_lib
from launch import preemption
from launch.backends import local
from launch.checkpoints import COMMIT_MARKER
from scaling.errors import Preempted, UserError
from scaling.store import Store

ROOT = Path(__file__).parents[1]

STUDY = """
from launch.config import base_config

def get_config(arg=None):
    c = base_config()
    c.sweep_name = "noticed"
    c.model.n_layer, c.model.n_ctx = 1, 32
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 30, 8, 2
    c.eval.batches, c.eval.points = 2, 6
    c.checkpoint.every = 10
    return c

def get_sweep(arg=None):
    return [{"model.d_model": 16, "model.n_heads": 1}, {"model.d_model": 32}]
"""


def _scaling(out: Path, data_cache, *argv, fault: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    env.pop("SCALING_FAULT", None)
    if fault:
        env["SCALING_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *argv]
        + [
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


def _metrics(path: Path) -> dict:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT run_id, step, name, value FROM metrics").fetchall()
        per_token = conn.execute("SELECT run_id, step, losses FROM per_token").fetchall()
    timing = ("tokens_per_s", "mfu", "wall_time")
    values = {(r, s, n): v for r, s, n, v in rows if n not in timing}
    values.update({(r, s, "per_token"): np.frombuffer(b, "<f4") for r, s, b in per_token})
    return values


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for key, value in b.items():
        np.testing.assert_allclose(a[key], value, rtol=1e-6, atol=1e-6, err_msg=str(key))


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_notice_saves_at_the_next_step_and_the_relaunch_loses_none(tmp_path, data_cache, signame):
    study = tmp_path / "noticed.py"
    study.write_text(STUDY)
    noticed, clean = tmp_path / "noticed", tmp_path / "clean"
    extra = [f"--config.train.preemption_signal={signame}"] if signame != "SIGTERM" else []
    # The notice comes while step 15 runs (the 15th train step of the first run).
    first = _scaling(
        noticed,
        data_cache,
        "sweep",
        str(study),
        "--parallel",
        "1",
        *extra,
        fault=f"train_step:15:{signame}",
    )
    assert first.returncode == 143, first.stderr[-2000:]
    assert first.stderr.strip().splitlines()[-1] == (
        "preempted at step 15; the checkpoint there resumes it; relaunch the same command to resume"
    )
    with Store(noticed / "store.sqlite") as store:
        run, second = store.runs("noticed")  # the sweep stops: the machine is going
        assert (run.status, run.step) == ("preempted", 15)
        assert (second.status, second.step) == ("pending", 0)
    checkpoints = noticed / "runs" / run.run_id / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [10, 15]
    assert (checkpoints / "15" / COMMIT_MARKER).exists()  # the save finished before the exit

    # The relaunch resumes at 15 (the latest checkpoint), through a sweep, which trains a
    # preempted run as it trains a pending one.
    again = _scaling(noticed, data_cache, "sweep", str(study), "--parallel", "1", *extra)
    assert again.returncode == 0, again.stderr[-2000:]
    reference = _scaling(clean, data_cache, "sweep", str(study), "--parallel", "1")
    assert reference.returncode == 0, reference.stderr[-2000:]
    _assert_same(_metrics(noticed / "store.sqlite"), _metrics(clean / "store.sqlite"))


@pytest.mark.slow
def test_a_parallel_sweep_reports_preempted_members_and_exits_143(tmp_path, data_cache):
    study = tmp_path / "noticed.py"
    study.write_text(STUDY)
    out = tmp_path / "parallel"
    # Each member's process gets its notice at its own 12th step.
    result = _scaling(
        out, data_cache, "sweep", str(study), "--parallel", "2", fault="train_step:12:SIGTERM"
    )
    assert result.returncode == 143, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("sweep done: 2 preempted")
    with Store(out / "store.sqlite") as store:
        assert {(r.status, r.step) for r in store.runs("noticed")} == {("preempted", 12)}
    assert _scaling(out, data_cache, "sweep", str(study), "--parallel", "2").returncode == 0


def test_outcomes_and_signal_names():
    assert local._outcome(Preempted.exit_code) == "preempted"
    assert local._outcome(-signal.SIGTERM) == "preempted"  # killed by the notice outright
    assert local._outcome(1) == "failed (exit code 1)"
    assert preemption.signal_of("") is None
    assert preemption.signal_of("USR1") == preemption.signal_of("SIGUSR1") == signal.SIGUSR1
    for bad in ("SIGKILL", "INT", "SIGNOPE"):
        with pytest.raises(UserError, match="train.preemption_signal"):
            preemption.signal_of(bad)
    config = config_lib.base_config()
    config.train.preemption_signal = "SIGKILL"
    with pytest.raises(UserError, match="train.preemption_signal"):
        config_lib.validate(config)


def test_a_notice_block_restores_the_handlers_it_replaced():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.Notice(signal.SIGUSR2) as notice:
        assert not notice.reached(1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert notice.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
