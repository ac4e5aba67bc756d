"""The Slurm backend against a real Slurm: a one-node cluster started here (slurmctld and
slurmd in the foreground, no cgroups), the tiny sweep submitted with --backend slurm, and a
job cancelled mid-run (scancel) whose relaunch ends where an uninterrupted sweep ends; and a
two-node cluster on the same machine (two slurmd, two names), where each run is one JAX
program over both nodes and ends at the one-node run's losses.

Needs Debian's slurm-wlm and munge and root (slurmd runs jobs as their user); the tests skip
with one line where either is missing. `.ci/run` installs the packages where it can.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scaling.errors import UserError
from scaling.store import Store

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
STUDY = "experiments/local_cpu.py:tiny"  # three members


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    # A credential encoded, not a process found: a munged that could not open its socket
    # lingers as a zombie that pgrep still lists.
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


def _munge_running() -> bool:
    if _munge_works():
        return True
    # Debian's package has systemd make /run/munge at boot; without systemd it may be missing,
    # and munged will not start without it.
    socket_dir = Path("/run/munge")
    socket_dir.mkdir(exist_ok=True)
    try:
        shutil.chown(socket_dir, "munge", "munge")
    except (LookupError, OSError):
        pass
    subprocess.run(["munged", "--force"], capture_output=True)
    return _munge_works()


def _cluster(folder: Path, nodes: list[tuple[str, str, int, int]]):
    """Start slurmctld and one slurmd per (name, address, port, cpus) of `nodes`; yield
    the environment (SLURM_CONF) once every node is idle, and stop the daemons after."""
    missing = [
        t for t in ("slurmctld", "slurmd", "sbatch", "munged", "munge") if not shutil.which(t)
    ]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster here needs root (slurmd starts jobs as their user)")
    if not _munge_running():
        pytest.skip("munged does not start (no /etc/munge/munge.key?)")
    host = socket.gethostname().split(".")[0]
    names = ",".join(name for name, *_ in nodes)
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=scalingtest",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={folder}/state",
                # %n: each slurmd of a several-node cluster on one machine keeps its own files
                f"SlurmdSpoolDir={folder}/spool-%n",
                f"SlurmctldPidFile={folder}/slurmctld.pid",
                f"SlurmdPidFile={folder}/slurmd-%n.pid",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                f"SlurmctldPort={_free_port()}",
                "MpiDefault=none",
                "KillWait=30",
                *(
                    f"NodeName={name} NodeAddr={address} Port={port} CPUs={cpus} State=UNKNOWN"
                    for name, address, port, cpus in nodes
                ),
                f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    (folder / "state").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    log = open(folder / "daemons.log", "w")  # noqa: SIM115 - open while the daemons run
    daemons = [
        subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log, stderr=log
        )
    ]
    time.sleep(1)
    for name, *_ in nodes:
        daemons.append(
            subprocess.Popen(
                ["slurmd", "-D", "-N", name, "-f", str(conf)], env=env, stdout=log, stderr=log
            )
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True
            )
            if state.stdout.split() == ["idle"] * len(nodes):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the cluster never became idle: {(folder / 'daemons.log').read_text()}")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster (this host) with partition `debug`."""
    host = socket.gethostname().split(".")[0]
    node = (host, host, _free_port(), os.cpu_count() or 1)
    yield from _cluster(tmp_path_factory.mktemp("slurm"), [node])


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory):
    """A two-node cluster on this machine: this host, and a second slurmd at 127.0.0.2 (all
    of 127/8 is loopback) under its own name and port. Node names need not resolve for
    Slurm; the first must for JAX, whose coordinator runs on the job's first node."""
    host = socket.gethostname().split(".")[0]
    nodes = [(host, host, _free_port(), 1), (f"{host}-two", "127.0.0.2", _free_port(), 1)]
    yield from _cluster(tmp_path_factory.mktemp("slurm2"), nodes)


def _sweep_argv(out: Path, data_cache, *extra) -> list[str]:
    """`scaling sweep` of the tiny study on partition debug, its store and runs under `out`."""
    return (
        [sys.executable, "-m", "launch.cli", "sweep", STUDY, "--backend", "slurm"]
        + ["--partition", "debug", *extra]
        + [
            f"--config.store={out / 'store.sqlite'}",
            f"--config.workdir={out / 'runs'}",
            f"--config.data.cache_dir={data_cache}",
            "--config.progress=false",
        ]
    )


def _env(slurm) -> dict:
    return {**slurm, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def _sweep(slurm, out: Path, data_cache, *extra):
    return subprocess.run(
        _sweep_argv(out, data_cache, "--time-limit", "30", *extra),
        cwd=ROOT,
        env=_env(slurm),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _losses(path: Path) -> dict:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT run_id, step, value FROM metrics WHERE name = 'eval_loss'"
        ).fetchall()
        per_token = conn.execute("SELECT run_id, step, losses FROM per_token").fetchall()
    found = {(r, s): v for r, s, v in rows}
    found.update({(r, s, "T"): np.frombuffer(b, "<f4") for r, s, b in per_token})
    return found


def _tiny_sweep_finishes(slurm, out: Path, data_cache, *extra):
    """Run the tiny sweep through Slurm; assert it ends with its three runs finished at step
    60, and return those runs."""
    result = _sweep(slurm, out, data_cache, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done on slurm: 3 finished or skipped, 0 failed" in result.stdout
    with Store(out / "store.sqlite") as store:
        runs = store.runs("local_cpu_tiny")
    assert [(r.status, r.step) for r in runs] == [("finished", 60)] * 3
    return runs


def _assert_same_losses(a: Path, b: Path, tolerance: float):
    found, expected = _losses(a), _losses(b)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(
            found[key], value, rtol=tolerance, atol=tolerance, err_msg=str(key)
        )


def test_the_tiny_sweep_trains_through_sbatch_and_srun(slurm, tmp_path, data_cache):
    runs = _tiny_sweep_finishes(slurm, tmp_path, data_cache)
    with Store(tmp_path / "store.sqlite") as store:
        for run in runs:
            steps, _ = store.scalars(run.run_id, "eval_loss")
            assert steps[-1] == 60 and len(steps) >= 4
    assert not list(tmp_path.glob("runs/*/checkpoints/*tmp*"))
    # The jobs' output goes to slurm-logs/, one file per job, not into the repository's root.
    names = {p.name for p in (ROOT / "slurm-logs").iterdir()}
    assert {f"local_cpu_tiny-{r.run_id}" for r in runs} <= {n.rsplit("-", 1)[0] for n in names}
    assert not list(ROOT.glob("slurm-*.out"))
    # Relaunching submits nothing: every run is finished in the store.
    again = _sweep(slurm, tmp_path, data_cache, "--dry-run")
    assert again.returncode == 0 and "sbatch" not in again.stdout, again.stdout


def test_a_job_cancelled_mid_run_resumes_on_relaunch_and_matches(slurm, tmp_path, data_cache):
    longer = ["--config.train.steps=300", "--config.checkpoint.every=100"]
    cancelled, clean = tmp_path / "cancelled", tmp_path / "clean"
    launcher = subprocess.Popen(
        _sweep_argv(cancelled, data_cache, "--max-retries", "0", *longer),
        cwd=ROOT,
        env=_env(slurm),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Cancel the first job once its run has logged an eval past step 10.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with Store(cancelled / "store.sqlite", readonly=True) as store:
                progressed = [
                    r for r in store.runs() if (store.last_eval(r.run_id) or (0,))[0] > 10
                ]
        except UserError:  # not there yet, or the jobs are still creating its tables
            progressed = []
        if progressed:
            break
        time.sleep(0.2)
    else:
        launcher.kill()
        pytest.fail("no run got past step 10")
    subprocess.run(["scancel", "--state=RUNNING", "--partition=debug"], env=slurm, check=True)
    out, err = launcher.communicate(timeout=600)
    # A cancelled job's `sbatch --wait` exits 1 (the batch shell dies of the signal), so the
    # launcher reports the runs it cancelled (all running jobs: they run side by side) failed.
    assert " 0 failed" not in out, out + err[-3000:]
    with Store(cancelled / "store.sqlite") as store:
        stopped = [r for r in store.runs() if r.status != "finished"]
    assert stopped and all(r.step < 300 for r in stopped)

    again = _sweep(slurm, cancelled, data_cache, *longer)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = _sweep(slurm, clean, data_cache, *longer)
    assert reference.returncode == 0, reference.stderr[-3000:]
    _assert_same_losses(cancelled / "store.sqlite", clean / "store.sqlite", 1e-6)


def test_a_two_node_job_is_one_jax_program_and_ends_at_the_one_node_losses(
    slurm_two_nodes, tmp_path, data_cache
):
    one, two = tmp_path / "one", tmp_path / "two"
    runs = _tiny_sweep_finishes(slurm_two_nodes, two, data_cache, "--nodes", "2")
    with Store(two / "store.sqlite") as store:
        for run in runs:
            (environment,) = store.environments(run.run_id)
            # one process per node, each with its CPU device, joined by jax.distributed
            assert (environment["process_count"], environment["device_count"]) == (2, 2)
    _tiny_sweep_finishes(slurm_two_nodes, one, data_cache, "--nodes", "1")
    _assert_same_losses(two / "store.sqlite", one / "store.sqlite", 1e-5)
