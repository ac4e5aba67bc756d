"""End to end on the real corpus: training lowers the loss, evals are consistent,
runs resume, sweeps skip finished work, bad input is refused cleanly."""

import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import config as config_lib
from launch import data, train
from launch.cli import main
from scaling.errors import UserError
from scaling.store import Store


def test_training_lowers_eval_loss_on_real_text(tiny_config):
    tiny_config.train.steps = 200
    tiny_config.train.warmup_steps = 10
    tiny_config.checkpoint.every = 200
    run_id = train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        steps, losses = store.scalars(run_id, "eval_loss")
        assert store.run(run_id).status == "finished"
        assert steps[0] == 1 and steps[-1] == 200
        # Bytes start at ln(256) = 5.55 nats; a few hundred steps learn far more than unigrams.
        assert losses[0] > 5.0 and losses[-1] < 3.0
        per_step, per_token = store.per_token(run_id)
        assert per_step.tolist() == steps.tolist()
        assert per_token.shape == (len(steps), tiny_config.model.n_ctx)
        # The mean eval loss is the mean of the per-token vector.
        np.testing.assert_allclose(per_token.mean(axis=1), losses, rtol=1e-6)
        for name in ("tokens", "flops", "tokens_per_s", "mfu", "wall_time", "train_loss"):
            assert len(store.scalars(run_id, name)[0]) == len(steps), name
        tokens = store.scalars(run_id, "tokens")[1][-1]
        assert tokens == 200 * tiny_config.train.batch_size * tiny_config.model.n_ctx


def test_the_last_eval_reads_the_larger_final_set_with_standard_errors(tiny_config):
    tiny_config.eval.batches, tiny_config.eval.final_batches = 1, 4
    run_id = train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        steps, errors, sequences = store.per_token_stderr(run_id)
        _, means = store.per_token(run_id)
    rows = tiny_config.train.batch_size
    assert sequences.tolist() == [rows] * (len(steps) - 1) + [4 * rows]
    assert np.isfinite(errors).all() and (errors > 0).all()
    # Four times the sequences: about half the standard error, position by position.
    ratio = np.median(errors[-1] / errors[-2])
    assert 0.3 < ratio < 0.8, ratio
    assert means.shape == errors.shape


def test_interrupted_run_resumes_at_its_checkpoint_and_matches(tiny_config, monkeypatch, tmp_path):
    real_batch = data.train_batch
    requested, crashed = [], []

    def crash_at_15(tokens, step, *args, **kwargs):
        requested.append(step)
        if step == 15 and not crashed:
            crashed.append(step)
            raise RuntimeError("simulated crash")
        return real_batch(tokens, step, *args, **kwargs)

    monkeypatch.setattr(data, "train_batch", crash_at_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(tiny_config)
    run_id = config_lib.run_id(tiny_config)
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "running"  # as a killed process leaves it
    requested.clear()
    train.train_and_evaluate(tiny_config)
    assert requested[0] == 10  # checkpoint.every = 10: steps 10..19 are trained again

    # The same run without interruption, elsewhere, ends at the same loss.
    monkeypatch.setattr(data, "train_batch", real_batch)
    tiny_config.store = str(tmp_path / "other.sqlite")
    tiny_config.workdir = str(tmp_path / "other_runs")
    assert train.train_and_evaluate(tiny_config) == run_id
    with Store(tiny_config.store) as a, Store(str(tmp_path / "store.sqlite")) as b:
        np.testing.assert_allclose(
            a.scalars(run_id, "eval_loss")[1], b.scalars(run_id, "eval_loss")[1], rtol=1e-6
        )


TWO_SIZES = [{"model.d_model": 16, "model.n_heads": 1}, {"model.d_model": 32}]


def _study(tmp_path, tiny_config, members=None):
    """A study file of tiny_config with these get_sweep() members (two sizes by default)."""
    study = tmp_path / "study.py"
    study.write_text(
        "import ml_collections\n"
        f"BASE = {tiny_config.to_dict()!r}\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(BASE)\n"
        "def get_sweep(arg=None):\n"
        f"    return {members or TWO_SIZES!r}\n"
    )
    return str(study)


@pytest.mark.slow
def test_sweep_twice_trains_nothing_the_second_time(tiny_config, tmp_path, monkeypatch, capsys):
    study = _study(tmp_path, tiny_config)
    assert main(["sweep", study]) == 0
    with Store(tiny_config.store) as store:
        first = {r.run_id: r.status for r in store.runs("test")}
    assert list(first.values()) == ["finished", "finished"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    assert main(["sweep", study]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "sweep done: 2 finished"
    with Store(tiny_config.store) as store:
        assert {r.run_id: r.status for r in store.runs("test")} == first


def test_status_json_lists_every_run(tiny_config, tmp_path, capsys):
    import json

    train.train_and_evaluate(tiny_config)
    capsys.readouterr()
    assert main(["status", "--store", tiny_config.store, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert rows[0]["status"] == "finished" and rows[0]["step"] == tiny_config.train.steps
    assert rows[0]["eval_loss"] > 0 and rows[0]["run_id"] == config_lib.run_id(tiny_config)


@pytest.mark.slow  # a whole `scaling run` of the tiny study
def test_cli_overrides_reach_the_run(tmp_path, data_cache):
    store = tmp_path / "s.sqlite"
    args = [
        "run",
        "experiments/local_cpu.py:tiny",
        f"--config.store={store}",
        f"--config.workdir={tmp_path / 'runs'}",
        f"--config.data.cache_dir={data_cache}",
        "--config.progress=false",
        "--config.model.n_layer=1",
        "--config.model.d_model=16",
        "--config.model.n_heads=1",
        "--config.model.n_ctx=16",
        "--config.train.steps=7",
        "--config.train.warmup_steps",
        "1",
        "--config.eval.points=2",
    ]
    assert main(args) == 0
    with Store(store) as s:
        (run,) = s.runs()
        assert run.d_model == 16 and run.n_ctx == 16 and run.step == 7
        assert s.scalars(run.run_id, "eval_loss")[0].tolist() == [1, 7]


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.n_heads=3", "error: model.d_model=64 is not divisible by model.n_heads=3"),
        ("--config.train.stepz=3", "error: command line: unknown config key 'train.stepz'"),
        ("--config.data.corpus=text", "error: data.corpus=text needs data.paths"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(override, message, tmp_path, capsys, data_cache):
    store = tmp_path / "s.sqlite"
    code = main(
        [
            "run",
            "experiments/local_cpu.py:tiny",
            f"--config.store={store}",
            f"--config.workdir={tmp_path / 'runs'}",
            f"--config.data.cache_dir={data_cache}",
            "--config.model.d_model=64",
            override,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "runs").exists()
    if store.exists():  # a missing data file is found after the run is registered
        with Store(store) as s:
            assert all(r.status == "pending" for r in s.runs())
            assert all(not s.metric_names(r.run_id) for r in s.runs())


def test_missing_data_file_is_one_line(tmp_path, capsys):
    code = main(
        [
            "run",
            "experiments/local_cpu.py:tiny",
            f"--config.store={tmp_path / 's.db'}",
            f"--config.workdir={tmp_path / 'runs'}",
            "--config.data.corpus=text",
            f"--config.data.paths={tmp_path / 'missing.txt'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "missing.txt" in err


def test_unwritable_store_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "experiments/local_cpu.py:tiny", f"--config.store={blocker}/s.sqlite"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not writable" in err and "\n" not in err, err


@pytest.mark.slow  # trains until the loss diverges
def test_divergence_fails_the_run_and_keeps_the_last_good_checkpoint(tiny_config):
    tiny_config.train.learning_rate = 1e6
    tiny_config.train.grad_clip = 0.0
    tiny_config.train.warmup_steps = 0
    tiny_config.eval.points = 2
    with pytest.raises(train.DivergedError, match="lower train.learning_rate"):
        train.train_and_evaluate(tiny_config)
    run_id = config_lib.run_id(tiny_config)
    with Store(tiny_config.store) as store:
        run = store.run(run_id)
        assert run.status == "failed" and "became nan" in run.reason.lower()
    saved = Path(tiny_config.workdir, run_id, "checkpoints")
    assert not saved.exists() or not [p for p in saved.iterdir() if p.name.isdigit()]


def test_resuming_into_a_store_without_the_runs_evals_is_refused(tiny_config, tmp_path):
    run_id = train.train_and_evaluate(tiny_config)
    first = tiny_config.store
    # Same workdir (its checkpoint at step 20), a new store: the evals are elsewhere.
    tiny_config.store = str(tmp_path / "new.sqlite")
    with pytest.raises(UserError, match="lacks its eval at step 20"):
        train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "pending" and store.last_eval(run_id) is None
    with Store(first) as store:  # the store it wrote to is untouched
        assert store.run(run_id).status == "finished" and store.last_eval(run_id)[0] == 20


def test_a_finished_run_is_not_touched_by_a_relaunch(tiny_config):
    run_id = train.train_and_evaluate(tiny_config)
    tiny_config.mesh.data = 3  # not this machine's device count: would fail if it ran
    assert train.train_and_evaluate(tiny_config) == run_id
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "finished"


@pytest.mark.slow  # a sweep that trains a member
def test_a_run_another_process_trains_is_skipped_not_trained_twice(tiny_config, tmp_path, capsys):
    """Two sweeps over one workdir: the member the other holds is left to it, untouched."""
    from launch import config as config_lib

    study = _study(tmp_path, tiny_config)
    busy, free = [config_lib.run_id(c) for c in config_lib.study_sweep(study)]
    with train.run_lock(tiny_config.workdir, busy):  # as the other sweep's trainer holds it
        assert main(["sweep", study, "--parallel", "1"]) == 1
        out = capsys.readouterr()
        assert "sweep done: 1 busy, 1 finished" in out.out
        assert f"{busy}: skipped: run {busy} is being trained by another process" in out.err
        with Store(tiny_config.store) as store:
            assert store.run(busy).status == "pending" and store.run(busy).step == 0
            assert store.run(free).status == "finished"
        assert not (Path(tiny_config.workdir) / busy / "checkpoints").exists()
        one = config_lib.study_sweep(study)[0]
        args = [
            "run",
            study,
            *(f"--config.{k}={v}" for k, v in {"model.d_model": 16, "model.n_heads": 1}.items()),
        ]
        assert config_lib.run_id(one) == busy
        assert main(args) == 75
        assert "is being trained by another process" in capsys.readouterr().err
    assert main(["sweep", study, "--parallel", "1"]) == 0  # the lock went with its holder
    with Store(tiny_config.store) as store:
        assert store.run(busy).status == "finished"


def test_a_run_claimed_on_another_machine_is_skipped_until_its_heartbeat_stops(tiny_config):
    """A trainer on another host (its claim in the shared store, no lock here): its run is
    left to it while its heartbeat is fresh (a sweep counts it busy, as for the lock above),
    and taken over once the heartbeat stopped."""
    from launch import claims

    run_id = config_lib.run_id(tiny_config)
    other = "node7:4242:0badc0de"
    with Store(tiny_config.store) as store:
        store.register_run(train.run_record(tiny_config, run_id))
        assert store.claim(run_id, other, claims.STALE_S) is None
    with pytest.raises(claims.RunBusy, match=f"run {run_id} is being trained by {other}"):
        train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "pending" and store.run(run_id).step == 0
        # node7 went silent: its heartbeat is older than STALE_S.
        stale = time.time() - claims.STALE_S - 1
        store._conn.execute("UPDATE claims SET heartbeat = ? WHERE run_id = ?", (stale, run_id))
    train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "finished"
        assert store.claim(run_id, "probe", claims.STALE_S) is None  # released at the end
        # The start recorded what it ran on.
        (ran_on,) = store.environments(run_id)
        assert ran_on["packages"]["jax"] == jax.__version__
        assert ran_on["device_count"] == jax.device_count() and ran_on["platform"] == "cpu"


def test_a_claim_left_by_a_process_killed_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    from launch import claims

    path = tmp_path / "s.sqlite"
    Store(path).close()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    with Store(path) as store:
        assert store.claim("run1", f"{socket.gethostname()}:{dead}:1", claims.STALE_S) is None
        assert store.claim("run2", f"{socket.gethostname()}:{os.getpid()}:1", 300) is None
    with claims.Claim(path, "run1"):  # its heartbeat is fresh, but its process is gone
        pass
    with pytest.raises(claims.RunBusy, match="is being trained by"):
        with claims.Claim(path, "run2"):  # this very process: alive
            pass


def test_a_trainer_whose_claim_was_taken_over_stops_before_writing(tmp_path, monkeypatch):
    from launch import claims

    path = tmp_path / "s.sqlite"
    Store(path).close()
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    with claims.Claim(path, "run1") as claim:
        claim.check()  # still its own
        with Store(path) as store:  # a trainer elsewhere that saw it stale took it over
            store._conn.execute("UPDATE claims SET owner = 'node7:1:x' WHERE run_id = 'run1'")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and claim._lost is None:
            time.sleep(0.05)
        with pytest.raises(claims.RunBusy, match="its claim was taken over"):
            claim.check()
    with Store(path) as store:  # the other owner's claim stays
        holder, age = store.claim("run1", "probe", claims.STALE_S)
        assert holder == "node7:1:x" and age < 60


@pytest.mark.slow  # two sweeps as real processes, side by side
def test_two_sweeps_started_at_once_train_every_member_exactly_once(tiny_config, tmp_path):
    import subprocess
    import sys

    from launch import config as config_lib

    tiny_config.train.steps = 200  # long enough that the two sweeps overlap
    study = _study(tmp_path, tiny_config, [{"model.d_model": d} for d in (16, 24, 32, 48)])
    ids = [config_lib.run_id(c) for c in config_lib.study_sweep(study)]
    repo = Path(__file__).parents[1]
    command = [sys.executable, "-m", "launch.cli", "sweep", study, "--parallel", "1"]
    sweeps = [
        subprocess.Popen(
            command, cwd=repo, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in sweeps]
    trained, busy = 0, 0
    for process, (_, err) in zip(sweeps, outputs, strict=True):
        assert "Traceback" not in err, err[-3000:]
        assert process.returncode in (0, 1), err[-3000:]
        skipped = {i for i in ids if f"{i}: skipped: run {i} is being trained by another" in err}
        earlier = {i for i in ids if f"run {i} finished earlier; nothing to train" in err}
        assert not skipped & earlier
        trained += len(ids) - len(skipped | earlier)
        busy += len(skipped)
    assert trained == len(ids)  # every member by one of the two, none by both
    assert busy  # the two did overlap: one found a member the other was training
    with Store(tiny_config.store) as store:
        assert {store.run(i).status for i in ids} == {"finished"}
        for run_id in ids:  # one eval row per scheduled step: nothing written twice
            steps, _ = store.scalars(run_id, "eval_loss")
            assert list(steps) == train.eval_schedule(200, tiny_config.eval.points)


def test_out_of_memory_fails_the_run_with_its_reason(tiny_config, monkeypatch):
    import jax

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 7.45GiB")

    monkeypatch.setattr(train, "_train", exhausted)
    from launch import config as config_lib

    with pytest.raises(UserError, match="out of memory at this size"):
        train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        record = store.run(config_lib.run_id(tiny_config))
    # Failed with the reason, not left `running`; other runtime errors still propagate.
    assert record.status == "failed" and "lower train.batch_size" in record.reason
