"""Launchers without a cloud account: a fake gcloud/xpk first on PATH records every command."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import config as config_lib
from launch import remote_records
from launch.backends import get_backend, launch_steps, runner
from launch.cli import main

STUDY = "experiments/local_cpu.py:tiny"  # three members
HOSTILE = 'a b\'c;d "e" $(touch pwned)'
ZONE, ACCEL, NAME, PROJECT = "us-central2-b", "v4-32", "my-slice", "my-proj"
FAKE = Path(__file__).with_name("fake_gcloud.py")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])  # study paths are relative to the repo


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """gcloud, xpk and git replaced by the recorder; returns a reader of its log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk", "git", "python3"):
        script = bin_dir / tool
        script.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))

    def calls(tool=None):
        log = tmp_path / "log.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        return [c["argv"] for c in map(json.loads, lines) if tool in (None, c["tool"])]

    def arm(counter, n):
        (tmp_path / counter).write_text(str(n))

    calls.arm = arm
    return calls


def _flags(bucket, *extra):
    return [
        "--backend",
        "tpu",
        "--tpu-name",
        NAME,
        "--zone",
        ZONE,
        "--accelerator",
        ACCEL,
        "--bucket",
        str(bucket),
        "--project",
        PROJECT,
        "--spot",
        "--config.data.paths",
        HOSTILE,
        *extra,
    ]


def _overrides(bucket, **launch):
    base = {
        "data.paths": HOSTILE,
        "launch.backend": "tpu",
        "launch.tpu_name": NAME,
        "launch.zone": ZONE,
        "launch.accelerator": ACCEL,
        "launch.bucket": str(bucket),
        "launch.project": PROJECT,
        "launch.spot": "true",
        "launch.retry_backoff_s": "5",
    }
    return base | {f"launch.{k}": str(v) for k, v in launch.items()}


def _run_ids(overrides):
    return [config_lib.run_id(c) for c in config_lib.study_sweep(STUDY, overrides)]


def _command(argv):
    """The remote shell string of an ssh call."""
    return argv[argv.index("--command") + 1]


def _is_train(argv):
    return "ssh" in argv and "launch.cli run" in _command(argv)


def test_dry_run_prints_every_command_in_order_and_runs_nothing(tmp_path, fake, capsys):
    bucket = tmp_path / "bucket"
    assert main(["sweep", STUDY, *_flags(bucket, "--runs-per-slice", "2", "--dry-run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert fake() == []  # nothing ran
    where = ["--zone", ZONE, "--project", PROJECT]
    archive = runner.shlex.split(lines[0])[-2].removeprefix("--output=")
    ids = _run_ids(_overrides(bucket))
    expected = [["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]]
    for i, members in enumerate([ids[:2], ids[2:]]):
        name = f"{NAME}-{i}"
        expected += [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "create",
                name,
                "--node-id",
                name,
                *where,
                "--accelerator-type",
                ACCEL,
                "--runtime-version",
                "tpu-ubuntu2204-base",
                "--spot",
            ],
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "describe",
                name,
                *where,
                "--format=value(state.state)",
            ],
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                archive,
                f"{name}:scaling-suite.tar.gz",
                "--worker=all",
                *where,
            ],
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "ssh",
                name,
                *where,
                "--worker=all",
                "--command",
                "install",
            ],
        ]
        expected += [
            [
                "gcloud",
                "compute",
                "tpus",
                "tpu-vm",
                "ssh",
                name,
                *where,
                "--worker=all",
                "--command",
                run_id,
            ]
            for run_id in members
        ]
        expected += [
            [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                name,
                *where,
                "--force",
                "--quiet",
            ]
        ]
    got = [shlex.split(line) for line in lines]
    assert len(got) == len(expected)
    run_ids = iter(ids)
    for argv, want in zip(got, expected, strict=True):
        if "--command" in want:
            command = _command(argv)
            if want[-1] == "install":
                assert "pip install" in command and "tar -xzf scaling-suite.tar.gz" in command
                # The workers run the versions this study was checked with here.
                import flax
                import jax

                assert f"'jax[tpu]=={jax.__version__}'" in command
                assert f"flax=={flax.__version__}" in command and "gcsfs" in command
            else:
                # The worker trains exactly this member: its run id is recomputed there.
                run_id = next(run_ids)
                assert want[-1] == run_id
                tokens = shlex.split(command)
                member = [t.removeprefix("--config.") for t in tokens if t.startswith("--config")]
                over = dict(m.split("=", 1) for m in member)
                assert config_lib.run_id(config_lib.study_config(STUDY, over)) == run_id
            argv, want = argv[:-1], want[:-1]
        assert argv == want


def test_hostile_values_reach_the_trainer_as_one_argument(tmp_path, fake, monkeypatch):
    """The remote command, run by a real shell, gives the trainer the exact values."""
    bucket = tmp_path / "bucket with 'quotes'; and spaces"
    plan = runner.prepare_launch(STUDY, _overrides(bucket))
    backend = get_backend("tpu")
    step = backend.train(plan, 0, plan.members[0])[0]
    (tmp_path / "home" / "scaling-suite").mkdir(parents=True)
    subprocess.run(["bash", "-c", _command(step.args)], cwd=tmp_path / "home", check=True)
    [argv] = fake("python3")
    assert f"--config.data.paths={HOSTILE}" in argv
    assert f"--config.launch.bucket={bucket}" in argv
    assert argv[:4] == ["-m", "launch.cli", "run", STUDY]
    assert not list(tmp_path.rglob("pwned"))  # $(...) was not run
    assert fake("gcloud") == []


def test_a_preempted_slice_is_requested_again_and_the_run_resumes(tmp_path, fake):
    bucket = tmp_path / "bucket"
    fake.arm("preempt", 2)  # the first two trainer ssh calls lose the slice
    plan = runner.prepare_launch(STUDY, _overrides(bucket))
    slept = []
    outcome = runner.execute(get_backend("tpu"), plan, sleep=slept.append, say=lambda _: None)
    assert set(outcome.values()) == {"finished"}
    assert slept == [5.0, 10.0]  # backoff doubles
    gcloud = fake("gcloud")
    creates = [a for a in gcloud if "create" in a]
    assert len(creates) == 3  # the first request and two re-requests
    trains = [_command(a) for a in gcloud if _is_train(a)]
    # The first member is tried three times, then the others once each, in order.
    ids = [m.run_id for m in plan.members]
    assert len(trains) == 5
    assert [sum(f"--config.model.d_model={d}" in t for t in trains) for d in (16, 32, 48)] == [
        3,
        1,
        1,
    ], ids
    # Before each re-request the lost slice is deleted, and at the end the last one.
    verbs = [a[3] for a in gcloud]  # after "compute tpus queued-resources|tpu-vm"
    assert verbs.count("delete") == 3
    assert gcloud[-1][2:4] == ["queued-resources", "delete"]


def test_a_trainer_that_answered_a_notice_is_trained_again(tmp_path, fake):
    """Exit 143 (saved at a preemption notice) is a preemption even while the slice still
    says ACTIVE: the slice is requested again and the run resumes, not reported failed."""
    bucket = tmp_path / "bucket"
    fake.arm("notice", 1)
    plan = runner.prepare_launch(STUDY, _overrides(bucket))
    slept = []
    outcome = runner.execute(get_backend("tpu"), plan, sleep=slept.append, say=lambda _: None)
    assert set(outcome.values()) == {"finished"}
    assert slept == [5.0]
    trains = [_command(a) for a in fake("gcloud") if _is_train(a)]
    assert len(trains) == 4  # the first member twice, the others once


def test_preemption_retries_are_bounded_and_reported(tmp_path, fake, capsys):
    bucket = tmp_path / "bucket"
    fake.arm("preempt", 1000)
    code = main(["sweep", STUDY, *_flags(bucket, "--max-retries", "2", "--retry-backoff-s", "0")])
    assert code == 1
    trains = [a for a in fake("gcloud") if _is_train(a)]
    assert len(trains) == 3 * 3  # three members, each tried once and re-requested twice
    assert "0 finished or skipped, 3 failed" in capsys.readouterr().out


def test_a_failed_run_is_reported_with_its_reason_and_not_retried(tmp_path, fake):
    bucket = tmp_path / "bucket"
    plan = runner.prepare_launch(STUDY, _overrides(bucket))
    first = plan.members[0].run_id
    remote_records.RunRecords(str(bucket), first).status(
        "failed", 7, "train loss became nan by step 7; lower train.learning_rate"
    )
    fake.arm("fail", 1)
    outcome = runner.execute(get_backend("tpu"), plan, sleep=pytest.fail, say=lambda _: None)
    assert outcome[first] == "failed: train loss became nan by step 7; lower train.learning_rate"
    assert [outcome[m.run_id] for m in plan.members[1:]] == ["finished", "finished"]
    assert len([a for a in fake("gcloud") if "create" in a]) == 1
    # Relaunching reports it again instead of training it again.
    again = runner.prepare_launch(STUDY, _overrides(bucket))
    assert first in again.skipped and "failed earlier (train loss" in again.skipped[first]
    assert first not in [m.run_id for m in again.members]


def test_relaunch_skips_finished_runs(tmp_path, fake, capsys):
    bucket = tmp_path / "bucket"
    ids = _run_ids(_overrides(bucket))
    remote_records.RunRecords(str(bucket), ids[1]).status("finished", 60)
    assert main(["sweep", STUDY, *_flags(bucket, "--dry-run")]) == 0
    out = capsys.readouterr().out
    assert f"# {ids[1]}: finished earlier, skipped" in out
    trains = [line for line in out.splitlines() if "launch.cli run" in line]
    assert len(trains) == 2 and not any("d_model=32 " in line for line in trains)


def test_direct_slice_and_best_effort_commands(tmp_path):
    bucket = tmp_path / "bucket"
    tpu = get_backend("tpu")
    direct = runner.prepare_launch(STUDY, _overrides(bucket, queued="false"))
    steps = launch_steps(tpu, direct)
    assert steps[1].args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", NAME]
    assert "--version" in steps[1].args and "--spot" in steps[1].args
    assert steps[-1].args[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", NAME]
    best = runner.prepare_launch(
        STUDY, _overrides(bucket, spot="false", best_effort="true", keep_slice="true")
    )
    steps = launch_steps(tpu, best)
    assert steps[1].args[:3] == ["gcloud", "alpha", "compute"] and "--best-effort" in steps[1].args
    assert not any("delete" in s.args for s in steps)  # keep_slice


def test_xpk_creates_one_workload_per_run_and_waits_for_it(tmp_path, fake):
    bucket = tmp_path / "bucket"
    over = _overrides(bucket, backend="xpk", cluster="my-cluster", spot="true", max_retries=4)
    plan = runner.prepare_launch(STUDY, over)
    outcome = runner.execute(get_backend("xpk"), plan, sleep=pytest.fail, say=lambda _: None)
    assert set(outcome.values()) == {"finished"}
    calls = fake("xpk")
    assert len(calls) == 6
    pairs = zip(calls[::2], calls[1::2], strict=True)
    for (create, wait), member in zip(pairs, plan.members, strict=True):
        name = f"{NAME}-{member.run_id}"
        assert create[:2] == ["workload", "create"] and wait[:2] == ["workload", "list"]
        assert create[create.index("--workload") + 1] == name
        assert create[create.index("--max-restarts") + 1] == "4" and "--spot" in create
        assert wait[-2:] == ["--wait-for-job-completion", name]
        tokens = shlex.split(create[create.index("--command") + 1])
        assert f"--config.data.paths={HOSTILE}" in tokens
        import jax

        assert f"jax[tpu]=={jax.__version__}" in tokens  # the versions checked here
    assert fake("gcloud") == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bucket", "s3://b"], "neither gs://BUCKET"),
        (["--accelerator", "v5-lite"], "is not a TPU type like v5litepod-16"),
        (["--tpu-name", "My_Slice"], "config.launch.tpu_name='My_Slice'"),
        (["--zone", "central"], "is not a zone like us-central2-b"),
        (["--best-effort"], "spot and config.launch.best_effort are exclusive"),
        (["--backend", "pbs"], "is not one of local, tpu, xpk, slurm"),
        (["--backend", "xpk"], "needs the GKE cluster's name"),
    ],
)
def test_bad_launch_settings_are_one_line_errors(tmp_path, fake, capsys, flags, message):
    assert main(["sweep", STUDY, *_flags(tmp_path / "b", *flags), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert fake() == []


def test_a_study_outside_the_repository_is_refused(tmp_path, capsys):
    study = tmp_path / "study.py"
    shutil.copy("experiments/local_cpu.py", study)
    assert main(["sweep", f"{study}:tiny", *_flags(tmp_path / "b"), "--dry-run"]) == 2
    assert "is outside this repository" in capsys.readouterr().err


def test_a_missing_zone_is_named(tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                STUDY,
                "--backend",
                "tpu",
                "--tpu-name",
                NAME,
                "--accelerator",
                ACCEL,
                "--bucket",
                str(tmp_path),
                "--dry-run",
            ]
        )
        == 2
    )
    assert "needs config.launch.zone (or --zone)" in capsys.readouterr().err


def test_launch_keys_do_not_change_run_ids(tmp_path):
    assert _run_ids(_overrides(tmp_path)) == _run_ids({"data.paths": HOSTILE})


@pytest.mark.slow  # about 10 s of gcloud start-ups, 35 s on a busy machine
@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_real_gcloud_accepts_every_generated_command(tmp_path):
    """The real gcloud parses each command up to its need for an account."""
    bucket = tmp_path / "bucket"
    tpu = get_backend("tpu")
    variants = [
        _overrides(bucket),
        _overrides(bucket, spot="false", best_effort="true"),
        _overrides(bucket, queued="false"),
    ]
    unique = {}
    for over in variants:
        for step in launch_steps(tpu, runner.prepare_launch(STUDY, over)):
            if step.args[0] == "gcloud":
                unique[tuple(a for a in step.args if not a.startswith("--command"))] = step.args
    env = {
        **os.environ,
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }

    def parse(args):
        done = subprocess.run(
            args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
        )
        return args, done.stdout + done.stderr

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(parse, unique.values()))
    assert len(answers) >= 9
    for args, output in answers:
        assert "unrecognized arguments" not in output, (args, output)
        assert "Invalid choice" not in output and "invalid choice" not in output, (args, output)
        assert "active account" in output, (args, output)  # parsed, then stopped for auth


class _FakeProcess:
    """A process that finishes after a few polls; counts how many run at once."""

    live = []
    most = 0

    def __init__(self, args, env=None):
        self.args, self.polls, self.returncode = args, 0, None
        from launch.backends import local

        self.cpus = set((env or {})[local.CPUS_ENV].split(","))
        # Two at a time on two or more cores: each pinned to cores of its own.
        assert len(local.usable_cores()) < 2 or all(
            not (self.cpus & other.cpus) for other in _FakeProcess.live
        )
        _FakeProcess.live.append(self)
        _FakeProcess.most = max(_FakeProcess.most, len(_FakeProcess.live))
        _FakeProcess.started.append(args)

    def poll(self):
        self.polls += 1
        if self.polls >= 3:
            self.returncode = 1 if "--config.model.d_model=32" in self.args else 0
            if self in _FakeProcess.live:
                _FakeProcess.live.remove(self)
        return self.returncode


def test_local_parallel_runs_n_processes_at_a_time(tmp_path):
    from launch.backends import local

    _FakeProcess.live, _FakeProcess.most, _FakeProcess.started = [], 0, []
    over = {"store": str(tmp_path / "s.sqlite"), "progress": "false"}
    outcome = local.train_parallel(STUDY, over, 2, popen=_FakeProcess, wait_s=0)
    assert _FakeProcess.most == 2 and len(_FakeProcess.started) == 3
    ids = _run_ids(over)
    assert outcome == {ids[0]: "finished", ids[1]: "failed (exit code 1)", ids[2]: "finished"}
    # Largest first (the tiny study's members grow with their index), so the
    # longest run never starts last.
    for args, run_id in zip(_FakeProcess.started, ids[::-1], strict=True):
        assert args[1:5] == ["-m", "launch.cli", "run", STUDY]
        over_run = dict(a.removeprefix("--config.").split("=", 1) for a in args[5:])
        assert config_lib.run_id(config_lib.study_config(STUDY, over_run)) == run_id


def test_parallel_members_get_disjoint_cores():
    from launch.backends import local

    assert local.core_sets(2, [0, 1]) == [[0], [1]]
    assert local.core_sets(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert local.core_sets(3, [0, 1]) == [[0, 1]] * 3  # more processes than cores: no pinning
    assert 1 <= local.auto_parallel(5, 1e13) <= max(1, len(local.usable_cores()))
    assert local.auto_parallel(1, 1e13) == 1
    assert local.auto_parallel(5, 1e9) == 1  # seconds of training: not worth the processes


@pytest.mark.slow  # three tiny trainings in subprocesses
def test_local_parallel_sweep_trains_every_member(tmp_path, data_cache, capsys):
    store = tmp_path / "s.sqlite"
    small = [
        "--config.store",
        str(store),
        "--config.workdir",
        str(tmp_path / "runs"),
        "--config.data.cache_dir",
        data_cache,
        "--config.progress=false",
        "--config.train.steps=10",
        "--config.train.warmup_steps=1",
        "--config.model.n_ctx=32",
        "--config.eval.points=3",
        "--config.checkpoint.every=10",
    ]
    assert main(["sweep", STUDY, "--parallel", "2", *small]) == 0
    assert "sweep done: 3 finished" in capsys.readouterr().out
    from scaling.store import Store

    with Store(store) as s:
        runs = s.runs("local_cpu_tiny")
        assert [r.status for r in runs] == ["finished"] * 3
    # A relaunch trains nothing.
    assert main(["sweep", STUDY, "--parallel", "2", *small]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "sweep done: 3 finished"


def test_slurm_dry_run_prints_one_sbatch_per_member(capsys):
    flags = ["--backend", "slurm", "--partition", "gpu", "--account", "lab", "--qos", "high"]
    flags += ["--nodes", "2", "--gpus-per-node", "8", "--time-limit", "4:00:00"]
    flags += ["--sbatch=--constraint=h100 --exclusive", "--dry-run"]
    assert main(["sweep", STUDY, *flags]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch")]
    assert len(lines) == 3
    argv = shlex.split(lines[0])
    assert argv[:3] == ["sbatch", "--wait", "--parsable"]
    pairs = dict(zip(argv[3:-2:1], argv[4:-1:1], strict=False))
    assert pairs["--partition"] == "gpu" and pairs["--account"] == "lab"
    assert pairs["--qos"] == "high" and pairs["--nodes"] == "2" and pairs["--gpus-per-node"] == "8"
    assert pairs["--time"] == "4:00:00" and pairs["--signal"] == "USR1@120"
    assert pairs["--output"] == "slurm-logs/%x-%j.out"
    assert "--exclusive" in argv and "--constraint=h100" in argv
    assert argv[-2] == "--wrap"
    command = shlex.split(argv[-1])
    # Two nodes: one trainer per node, joined by jax.distributed from Slurm's variables.
    assert command[0] == "SCALING_DISTRIBUTED=auto" and command[1:3] == [
        "srun",
        "--kill-on-bad-exit=1",
    ]
    assert command[4:8] == ["-m", "launch.cli", "run", STUDY]
    assert "--config.train.preemption_signal=SIGUSR1" in command


def test_a_failed_slurm_job_is_reported_with_the_error_line_of_its_log(tmp_path, monkeypatch):
    overrides = {"launch.backend": "slurm", "store": str(tmp_path / "store.sqlite")}
    plan = runner.prepare_launch(STUDY, overrides)
    monkeypatch.chdir(tmp_path)  # the logs are in the launching folder
    slurm, member = get_backend("slurm"), plan.members[0]
    assert runner._reason(slurm, plan, member, 2) == "the trainer exited with code 2"
    logs = tmp_path / "slurm-logs"
    logs.mkdir()
    name = slurm.job_name(plan, member)
    (logs / f"{name}-4.out").write_text("error: an earlier job's\n")
    latest = logs / f"{name}-12.out"
    latest.write_text(
        "distributed: ...\nerror: the store is busy; relaunch\n"
        "srun: error: node1: task 0: Exited with exit code 2\n"
    )
    os.utime(logs / f"{name}-4.out", (1, 1))  # older, though "4" sorts after "12"
    assert runner._reason(slurm, plan, member, 2) == (
        "the trainer exited with code 2 (error: the store is busy; relaunch; "
        "the whole log: slurm-logs/" + latest.name + ")"
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--time-limit=soon", "is not a Slurm time"),
        ("--sbatch=--wrap=x", "which the launcher sets itself"),
        ("--partition=a b", "is not a Slurm name"),
        ("--nodes=0", "must be 1 or more"),
    ],
)
def test_slurm_settings_that_cannot_work_are_one_line(capsys, flag, message):
    assert main(["sweep", STUDY, "--backend", "slurm", flag, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
