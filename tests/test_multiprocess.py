"""Runs made of several processes: the settings that start one, and a real two-process run.

The settings tests replace `jax.distributed.initialize` with a recorder, so
they never start a coordinator. The end-to-end test starts two `scaling run`
processes on this machine, each with 2 simulated CPU devices, joined through
a coordinator on 127.0.0.1 (cross-process collectives on CPU go through
gloo), and checks that they write one set of results: the store's rows from
process 0 only, one checkpoint folder, and losses equal to the same run
trained by one process over 4 devices. Then, its last checkpoint deleted,
both processes restore the one before and finish the run again, on another
mesh, to the same eval loss.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from launch import distributed
from scaling.errors import UserError
from scaling.store import Store

REPO = Path(__file__).resolve().parents[1]
SETTINGS = (
    distributed.ENV_COORDINATOR,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
    distributed.ENV_MODE,
    distributed.ENV_TIMEOUT,
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_NUM_SLICES",
)
# Compile faster (the runs are tiny; these change code generation, not what is computed).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every jax.distributed.initialize call, none of them real."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: made.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return made


def test_a_single_process_initialises_nothing(calls, monkeypatch):
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.maybe_initialize() is False
    assert calls == []


def test_explicit_settings_from_env_and_arguments(calls, monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.maybe_initialize() is True
    # Arguments (the CLI flags) win over the environment.
    assert distributed.maybe_initialize(process_id=2) is True
    assert [(c["coordinator_address"], c["num_processes"], c["process_id"]) for c in calls] == [
        ("10.0.0.1:1234", 4, 3),
        ("10.0.0.1:1234", 4, 2),
    ]
    assert calls[0]["initialization_timeout"] == 300


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SCALING_NUM_PROCESSES": "2", "SCALING_PROCESS_ID": "0"}, "coordinator not given"),
        ({"SCALING_COORDINATOR": "h:1", "SCALING_NUM_PROCESSES": "2"}, "process id not given"),
        (
            {"SCALING_COORDINATOR": "h:1", "SCALING_NUM_PROCESSES": "2", "SCALING_PROCESS_ID": "2"},
            "must be in [0, 2)",
        ),
        (
            {
                "SCALING_COORDINATOR": "nohost",
                "SCALING_NUM_PROCESSES": "2",
                "SCALING_PROCESS_ID": "1",
            },
            "must be host:port",
        ),
        ({"SCALING_NUM_PROCESSES": "two"}, "must be an integer"),
        ({"SCALING_DISTRIBUTED": "yes"}, "must be 'auto' or 'off'"),
    ],
)
def test_unusable_settings_are_user_errors(calls, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError) as error:
        distributed.maybe_initialize()
    assert message in str(error.value)
    assert calls == []


def test_multihost_tpu_and_auto_use_jax_detection(calls, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0")  # one host: a single process
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
    monkeypatch.setenv(distributed.ENV_MODE, "off")
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv(distributed.ENV_MODE, "")
    assert distributed.maybe_initialize() is True
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv(distributed.ENV_MODE, "auto")
    assert distributed.maybe_initialize() is True
    # JAX's own cluster detection fills in the coordinator and the ids.
    assert [sorted(c) for c in calls] == [["initialization_timeout"]] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(folder: Path) -> str:
    """Ten small text files, a few KB each: documents for data.corpus=text."""
    folder.mkdir()
    words = (
        "the of and to in that is was he for it with as his on be at by had not but "
        "what all were when we there can an your which their said if do will each"
    ).split()
    for d in range(10):
        lines = [
            " ".join(words[(d * 7 + i * j) % len(words)] for j in range(12)) for i in range(40)
        ]
        (folder / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "*.txt")


def _run_args(
    tmp: Path,
    store: Path,
    workdir: Path,
    paths: str,
    mesh: tuple[int, int, int] = (1, 2, 2),
    **more,
) -> list[str]:
    settings = {
        "model.n_layer": 1,
        "model.d_model": 32,
        "model.n_heads": 2,
        "model.n_ctx": 16,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.batch_size": 8,
        "eval.batches": 2,
        "eval.final_batches": 0,
        "eval.points": 2,
        "checkpoint.every": 2,
        "mesh.data": mesh[0],
        "mesh.fsdp": mesh[1],
        "mesh.tensor": mesh[2],
        "data.corpus": "text",
        "data.paths": paths,
        "data.val_fraction": 0.2,
        "data.cache_dir": str(tmp / "cache"),
        "store": str(store),
        "workdir": str(workdir),
        "progress": False,
        **more,
    }
    return [
        sys.executable,
        "-m",
        "launch.cli",
        "run",
        "experiments/local_cpu.py",
        *(f"--config.{k}={v}" for k, v in settings.items()),
    ]


def _two_processes(
    args: list[str], expect: int = 0, extra_env: tuple[dict, dict] = ({}, {})
) -> list[tuple[str, str]]:
    """Run `args` as processes 0 and 1 of one run; their (stdout, stderr), both exiting
    with `expect`; `extra_env` adds variables to each process's environment."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            args,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(
                2,
                SCALING_COORDINATOR=f"127.0.0.1:{port}",
                SCALING_NUM_PROCESSES="2",
                SCALING_PROCESS_ID=str(i),
                SCALING_INIT_TIMEOUT="120",
                **extra_env[i],
            ),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == expect, (
            f"process {i} exited {proc.returncode}:\n{out}\n{err[-4000:]}"
        )
    return outputs


def _one_process(args: list[str]) -> None:
    """Run `args` as one process over 4 devices, the single-process reference of a run."""
    one = subprocess.run(args, cwd=REPO, text=True, capture_output=True, env=_env(4), timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]


def _env(devices: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(
        JAX_PLATFORMS="cpu",
        TQDM_DISABLE="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
    )
    env.update(extra)
    return env


def _eval_rows(store: Path) -> tuple[list, dict]:
    with sqlite3.connect(store) as db:
        runs = db.execute("SELECT run_id, status, step FROM runs").fetchall()
        metrics = db.execute(
            "SELECT run_id, step, name, value FROM metrics "
            "WHERE name IN ('eval_loss', 'train_loss')"
        ).fetchall()
    return runs, {(step, name): value for _, step, name, value in metrics}


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    paths = _corpus(tmp_path / "corpus")
    store, workdir = tmp_path / "store.sqlite", tmp_path / "runs"
    outputs = _two_processes(_run_args(tmp_path, store, workdir, paths))
    # Only process 0 reports. (Gloo prints its connections on stdout, from
    # several threads, so its lines can come in pieces: a lone "1" is the end
    # of "... connected peer ranks is : 1".)
    own_lines = [
        [
            line
            for line in out.splitlines()
            if line.strip()
            and "[Gloo]" not in line
            and "peer ranks" not in line
            and not line.strip().isdigit()
        ]
        for out, _ in outputs
    ]
    assert len(own_lines[0]) == 1 and own_lines[0][0].startswith("finished run")
    assert own_lines[1] == []

    runs, rows = _eval_rows(store)
    assert len(runs) == 1 and runs[0][1:] == ("finished", 4)
    run_id = runs[0][0]
    assert sorted({step for step, _ in rows}) == [1, 4]
    assert [p.name for p in workdir.iterdir()] == [run_id]
    checkpoints = workdir / run_id / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]
    config = json.loads((workdir / run_id / "config.json").read_text())
    assert config["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "rules": "", "cpu_per_core": False}

    # The same run by one process over 4 devices: the same losses (float32
    # reductions in another order: a few ulps).
    single_store = tmp_path / "single.sqlite"
    _one_process(_run_args(tmp_path, single_store, tmp_path / "single_runs", paths))
    single_runs, single_rows = _eval_rows(single_store)
    assert single_runs[0][0] == run_id  # the mesh is not part of the run's identity
    assert single_rows.keys() == rows.keys()
    for key, value in rows.items():
        assert value == pytest.approx(single_rows[key], rel=1e-5, abs=1e-5), key

    # Both processes restore together: as if killed after the checkpoint at
    # step 2 (the last one gone, the store not yet told it finished), the run
    # resumes from step 2, here on a mesh whose data axis spans the two
    # processes, and ends where it ended before.
    shutil.rmtree(checkpoints / "4")
    with Store(store) as s:
        s.set_status(run_id, "running", step=2)
    _two_processes(_run_args(tmp_path, store, workdir, paths, mesh=(2, 1, 2)))
    runs, resumed = _eval_rows(store)
    assert len(runs) == 1 and runs[0][1:] == ("finished", 4)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]
    # (train_loss is the mean since the previous eval, which the resumed run
    # saw only part of, so only the eval loss is compared.)
    assert resumed[4, "eval_loss"] == pytest.approx(rows[4, "eval_loss"], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_two_processes_read_their_own_rows_of_a_manifest_and_train_as_one_does(tmp_path):
    """A corpus prepared into shards, trained by two processes whose data axis spans both
    (each reading only its rows of every batch), ends at one process's losses."""
    from launch import make_shards

    manifest = tmp_path / "shards"
    make_shards.prepare(
        _corpus(tmp_path / "corpus"),
        "bpe:300",
        str(manifest),
        val_fraction=0.2,
        workers=1,
        shard_mb=0.01,
        progress=False,
    )
    more = {"data.manifest": str(manifest), "model.vocab_size": 300}
    store = tmp_path / "store.sqlite"
    args = _run_args(tmp_path, store, tmp_path / "runs", "", mesh=(2, 1, 2), **more)
    _two_processes(args)
    single = tmp_path / "single.sqlite"
    _one_process(_run_args(tmp_path, single, tmp_path / "single_runs", "", mesh=(2, 1, 2), **more))
    (runs, rows), (single_runs, single_rows) = _eval_rows(store), _eval_rows(single)
    assert runs == single_runs and runs[0][1:] == ("finished", 4)
    assert rows.keys() == single_rows.keys()
    for key, value in rows.items():
        assert value == pytest.approx(single_rows[key], rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_a_notice_to_one_process_stops_both_at_one_step_and_loses_none(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync lets both reach the same step, both
    save there together, both exit 143; relaunched, the run ends as an uninterrupted one."""
    paths = _corpus(tmp_path / "corpus")
    more = {"train.steps": 16, "eval.points": 4, "checkpoint.every": 8}
    store, workdir = tmp_path / "store.sqlite", tmp_path / "runs"
    args = _run_args(tmp_path, store, workdir, paths, **more)
    # Process 1 then stalls 3 s (both wait at the next step's all-reduce) while JAX's
    # coordination service agrees a sync step: on a fast machine the last step came first.
    outputs = _two_processes(
        args, expect=143, extra_env=({}, {"SCALING_FAULT": "train_step:5:SIGTERM:3"})
    )
    assert "preempted at step" in outputs[0][1], outputs[0][1][-2000:]
    runs, _ = _eval_rows(store)
    (run_id, status, step) = runs[0]
    assert status == "preempted" and 5 <= step < 16, runs
    checkpoints = workdir / run_id / "checkpoints"
    saved = {8, step} if step > 8 else {step}  # the regular save at 8, and the notice's
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == sorted(saved)
    _two_processes(args)
    runs, resumed = _eval_rows(store)
    assert runs[0][1:] == ("finished", 16)

    clean_store = tmp_path / "clean.sqlite"
    _two_processes(_run_args(tmp_path, clean_store, tmp_path / "clean_runs", paths, **more))
    _, clean = _eval_rows(clean_store)
    assert resumed.keys() == clean.keys()
    for key, value in clean.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
