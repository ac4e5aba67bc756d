"""A run with a bucket writes its records there; `scaling sync` ingests them exactly once."""

import json
import sqlite3
from pathlib import Path

import jax
import numpy as np
import pytest

from launch import config as config_lib
from launch import remote_records, sync
from launch.cli import main
from launch.train import train_and_evaluate
from scaling.store import Store


def bucket_config(tmp, data_cache, bucket: str, sweep_name: str):
    """A tiny run's config whose records and checkpoints go to `bucket` (also tests/test_gcs.py)."""
    config = config_lib.base_config()
    config.update_from_flattened_dict(
        {
            "store": str(tmp / "worker.sqlite"),
            "workdir": str(tmp / "runs"),
            "progress": False,
            "data.cache_dir": data_cache,
            "model.n_layer": 1,
            "model.d_model": 32,
            "model.n_heads": 2,
            "model.n_ctx": 32,
            "train.steps": 20,
            "train.batch_size": 8,
            "train.warmup_steps": 2,
            "eval.batches": 2,
            "eval.points": 4,
            "checkpoint.every": 10,
            "launch.bucket": bucket,
            "sweep_name": sweep_name,
        }
    )
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    """A tiny run trained with a local folder as its bucket, as process 0 on a pod would.

    Trained once for the module; the tests only read it (or train on copies).
    """
    tmp = tmp_path_factory.mktemp("remote")
    config = bucket_config(tmp, data_cache, str(tmp / "bucket"), "remote-sweep.one")
    return config, train_and_evaluate(config)


@pytest.fixture
def remote_run(trained):
    config, run_id = trained
    return config.copy_and_resolve_references(), run_id


def _count(path, table, run_id):
    with sqlite3.connect(path) as conn:
        query = f"SELECT COUNT(*) FROM {table} WHERE run_id = ?"
        return conn.execute(query, (run_id,)).fetchone()[0]


def test_records_and_checkpoints_land_in_the_bucket(remote_run):
    config, run_id = remote_run
    run_dir = remote_records.run_dir(config.launch.bucket, run_id)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "20"]
    remote = remote_records.read_run(config.launch.bucket, run_id)
    assert remote["status"]["status"] == "finished" and remote["status"]["step"] == 20
    with Store(config.store) as store:
        steps, per_token = store.per_token(run_id)
        assert [e["step"] for e in remote["evals"]] == steps.tolist()
        np.testing.assert_allclose([e["per_token"] for e in remote["evals"]], per_token, rtol=1e-6)
        assert remote["run"]["n_params"] == store.run(run_id).n_params
    # Only whole files: no temporary names are left behind.
    assert not list(Path(run_dir / "records").rglob(".*"))
    # Each status change is a new file; none is rewritten.
    names = [p.name for p in (run_dir / "records" / "status").iterdir()]
    assert len(names) == 2  # running, finished


def test_sync_twice_gives_exactly_one_copy(remote_run, tmp_path, capsys):
    config, run_id = remote_run
    fresh = tmp_path / "laptop.sqlite"
    for _ in range(2):
        assert (
            main(
                ["sync", config.sweep_name, "--bucket", config.launch.bucket, "--store", str(fresh)]
            )
            == 0
        )
    assert "synced 1 runs" in capsys.readouterr().out
    evals = len(remote_records.read_run(config.launch.bucket, run_id)["evals"])
    assert evals == 4
    assert _count(fresh, "per_token", run_id) == evals
    assert _count(fresh, "metrics", run_id) == _count(config.store, "metrics", run_id)
    with Store(fresh) as mine, Store(config.store) as theirs:
        assert [r.run_id for r in mine.runs(config.sweep_name)] == [run_id]
        assert mine.run(run_id).status == "finished" and mine.run(run_id).step == 20
        for name in theirs.metric_names(run_id):
            np.testing.assert_array_equal(
                mine.scalars(run_id, name)[1], theirs.scalars(run_id, name)[1]
            )
        np.testing.assert_allclose(mine.per_token(run_id)[1], theirs.per_token(run_id)[1])
        # What the run ran on came along, once (the records' copy of the store's).
        (ran_on,) = mine.environments(run_id)
        assert ran_on == theirs.environments(run_id)[-1]
        assert ran_on["packages"]["jax"] == jax.__version__ and ran_on["device_count"] >= 1


def test_status_reads_remote_runs(remote_run, capsys):
    config, run_id = remote_run
    assert main(["status", "--bucket", config.launch.bucket, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["run_id"] == run_id and row["status"] == "finished" and row["step"] == 20
    assert row["sweep"] == config.sweep_name and np.isfinite(row["eval_loss"])


def test_a_new_slice_finds_the_run_finished_in_the_bucket(remote_run, tmp_path):
    """Relaunched on a fresh worker (an empty store), the run is not trained again."""
    config, run_id = remote_run
    config.store = str(tmp_path / "fresh-worker.sqlite")
    before = remote_records.read_run(config.launch.bucket, run_id)
    assert train_and_evaluate(config) == run_id
    after = remote_records.read_run(config.launch.bucket, run_id)
    assert after["evals"] == before["evals"] and after["status"] == before["status"]


@pytest.mark.slow  # trains twice
def test_an_interrupted_run_resumes_from_its_checkpoint_in_the_bucket(tiny_config, tmp_path):
    tiny_config.launch.bucket = str(tmp_path / "bucket")
    tiny_config.train.steps = 20
    short = config_lib.run_id(tiny_config)
    # A first slice trained, saving checkpoints at steps 10 and 20 ...
    first = tiny_config.copy_and_resolve_references()
    train_and_evaluate(first)
    # Keep only the step-10 checkpoint, as if the slice died before step 20.
    checkpoints = remote_records.run_dir(first.launch.bucket, short) / "checkpoints"
    for step in checkpoints.iterdir():
        if step.name == "20":
            step.rmtree()
    status = remote_records.records_dir(first.launch.bucket, short) / "status"
    for path in sorted(status.iterdir())[1:]:
        path.unlink()  # the "finished" record was never written
    tiny_config.store = str(tmp_path / "second-slice.sqlite")
    train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        steps, _ = store.scalars(short, "eval_loss")
    assert steps.min() > 10  # it resumed: no eval at or before the checkpoint step
    assert remote_records.read_run(first.launch.bucket, short)["status"]["status"] == "finished"


def test_sync_of_an_unknown_sweep_is_a_one_line_error(tmp_path, capsys):
    assert (
        main(["sync", "nope", "--bucket", str(tmp_path), "--store", str(tmp_path / "s.sqlite")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no runs of sweep 'nope'") and err.count("\n") == 1
    assert sync.remote_runs(str(tmp_path), None) == []


def _poisoned_bucket(config, run_id, tmp_path) -> tuple[Path, dict]:
    """A copy of the bucket beside the good run with one bad run per way a record can lie."""
    import shutil

    bucket = tmp_path / "bucket"
    shutil.copytree(config.launch.bucket, bucket)
    good = bucket / "runs" / run_id
    bad = {}

    def clone(new_id):
        shutil.copytree(
            good, bucket / "runs" / new_id, ignore=shutil.ignore_patterns("checkpoints")
        )
        records = bucket / "runs" / new_id / "records"
        run = json.loads((records / "run.json").read_text())
        run["run_id"] = new_id
        (records / "run.json").write_text(json.dumps(run))
        return records, run

    records, run = clone("aaaaaaaaaaa1")
    run["n_params"] = "lots"
    (records / "run.json").write_text(json.dumps(run))
    bad["aaaaaaaaaaa1"] = "n_params"
    records, _ = clone("aaaaaaaaaaa2")
    first = sorted((records / "eval").iterdir())[0]
    row = json.loads(first.read_text())
    row["scalars"]["eval_loss"] = float("nan")
    first.write_text(json.dumps(row))
    bad["aaaaaaaaaaa2"] = "finite numbers"
    records, _ = clone("aaaaaaaaaaa3")
    own = records / "eval" / first.name
    row = json.loads(own.read_text())
    row["per_token"] = row["per_token"] * 1000
    own.write_text(json.dumps(row))
    bad["aaaaaaaaaaa3"] = "per_token must be 32"
    records, _ = clone("aaaaaaaaaaa4")
    (records / "run.json").write_text((records / "run.json").read_text()[:40])
    bad["aaaaaaaaaaa4"] = "JSONDecodeError"
    records, _ = clone("aaaaaaaaaaa5")
    (records / "run.json").unlink()
    (records / "run.json").symlink_to(good / "records" / "run.json")
    bad["aaaaaaaaaaa5"] = "is a symbolic link"
    records, run = clone("aaaaaaaaaaa6")  # past SQLite's 64-bit INTEGER
    run["d_model"] = 2**63
    (records / "run.json").write_text(json.dumps(run))
    bad["aaaaaaaaaaa6"] = "d_model = '9223372036854775808' is not a positive whole number"
    records, run = clone("aaaaaaaaaaa7")
    run["flops"] = 10**30  # a whole number too large for INTEGER, as json.loads reads it
    (records / "run.json").write_text(json.dumps(run))
    bad["aaaaaaaaaaa7"] = "flops"
    records, run = clone("aaaaaaaaaaa8")
    run["reason"] = "\ud800"  # JSON can carry a lone surrogate; UTF-8, and so SQLite, cannot
    (records / "run.json").write_text(json.dumps(run))
    bad["aaaaaaaaaaa8"] = "reason is neither UTF-8 text nor null"
    clone("..evil_run")
    bad["..evil_run"] = "not a run id"
    return bucket, bad


def test_sync_skips_poisoned_records_and_keeps_the_good_run(remote_run, tmp_path, capsys):
    config, run_id = remote_run
    bucket, bad = _poisoned_bucket(config, run_id, tmp_path)
    store = tmp_path / "laptop.sqlite"
    assert main(["sync", config.sweep_name, "--bucket", str(bucket), "--store", str(store)]) == 1
    captured = capsys.readouterr()
    assert "synced 1 runs (4 evals)" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(bad)
    for bad_id, why in bad.items():
        assert any(bad_id[:12] in line and why in line for line in lines), bad_id
    with Store(store) as synced:
        assert [r.run_id for r in synced.runs()] == [run_id]
    assert main(["status", "--store", str(store), "--sweep", config.sweep_name]) == 0
    assert (
        main(
            [
                "fit",
                "--store",
                str(store),
                "--sweep",
                config.sweep_name,
                "--law",
                "saturating",
                "--what",
                "per-token",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
