import dataclasses
import multiprocessing
import sqlite3

import numpy as np
import pytest

from scaling import store as store_module
from scaling.errors import UserError
from scaling.store import SCHEMA_VERSION, FitRecord, RunRecord, Store, check_writable


def _run(run_id="r1", n=1000):
    return RunRecord(
        run_id=run_id,
        config={"seed": 0},
        n_params=n,
        n_params_total=2 * n,
        n_layer=1,
        d_model=8,
        n_heads=1,
        n_ctx=4,
        tokens=10_000,
        flops=6e7,
    )


def test_round_trip(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.register_run(_run("b", 2000), sweep="sw")
        store.register_run(_run("a", 1000), sweep="sw")
        store.log_eval("a", 5, {"eval_loss": 3.0, "tokens": 50}, np.array([4, 3, 2, 1.5]))
        store.log_eval("a", 10, {"eval_loss": 2.5}, np.array([3, 2.5, 2, 1.25]))
        store.set_status("a", "finished", step=10)
        fit_id = store.save_fit(
            FitRecord(
                "sw",
                "power",
                "final",
                "all",
                {"alpha": 0.1},
                {"alpha": [0.05, 0.15]},
                1e-3,
                True,
                2,
                {"runs": ["a", "b"]},
                {"objective": "huber"},
            )
        )
    with Store(path) as store:  # reopened: everything came from the file
        assert [r.run_id for r in store.runs("sw")] == ["a", "b"]  # smallest N first
        run = store.run("a")
        assert run.status == "finished" and run.step == 10 and run.config == {"seed": 0}
        steps, values = store.scalars("a", "eval_loss")
        assert steps.tolist() == [5, 10] and values.tolist() == [3.0, 2.5]
        steps, matrix = store.per_token("a")
        assert matrix.shape == (2, 4) and matrix[1].tolist() == [3, 2.5, 2, 1.25]
        assert store.last_eval("a") == (10, 2.5)
        (fit,) = store.fits("sw")
        assert fit.fit_id == fit_id and fit.intervals == {"alpha": [0.05, 0.15]}
        assert store.sweeps() == ["sw"]


def test_writes_are_idempotent(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        store.register_run(_run())
        store.set_status("r1", "running", step=3)
        store.register_run(_run())  # a relaunch registers again: state is kept
        assert store.run("r1").status == "running"
        for _ in range(3):
            store.log_eval("r1", 7, {"eval_loss": 1.0}, np.ones(4))
        assert len(store.scalars("r1", "eval_loss")[0]) == 1
        assert len(store.per_token("r1")[0]) == 1


def test_a_failure_reason_with_undecodable_bytes_is_kept_escaped(tmp_path):
    """os.fsdecode turns a file name's non-UTF-8 bytes into lone surrogates, which SQLite
    cannot store: the status is written anyway, the bytes as escapes."""
    reason = "cannot read " + b"/data/\xff.txt".decode("utf-8", "surrogateescape")
    with Store(tmp_path / "s.sqlite") as store:
        store.register_run(_run())
        store.set_status("r1", "failed", reason=reason)
        run = store.run("r1")
    assert run.status == "failed" and run.reason == "cannot read /data/\\udcff.txt"


def test_not_a_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"these are my notes, not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(UserError, match="not a results store"):
        Store(path)
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(UserError, match="newer"):
        Store(path)


def test_unwritable_path_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="not writable"):
        Store(blocker / "sub" / "s.sqlite")


def _writer(path, worker):
    with Store(path) as store:
        for step in range(50):
            store.log_eval("r1", step, {f"w{worker}": float(step)}, np.ones(4))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "s.sqlite")
    with Store(path) as store:
        store.register_run(_run())
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    with Store(path) as store:
        for w in range(2):
            assert store.scalars("r1", f"w{w}")[1].tolist() == [float(s) for s in range(50)]


def _open_at(paths, start: float, results):
    """Open each new store at its own agreed moment, so every process collides on each."""
    import time

    for i, path in enumerate(paths):
        time.sleep(max(0.0, start + 0.1 * i - time.time()))
        try:
            with Store(path) as store:
                store.runs()
        except Exception as e:  # noqa: BLE001 - the test reports whatever it was
            results.put(f"{type(e).__name__}: {e}")


def test_runs_opening_a_new_store_together_all_open_it(tmp_path):
    """The jobs of a sweep start together and each opens the (new) store: turning a new file
    to WAL needs an exclusive lock that SQLite does not wait for, so this failed with
    "database is locked" in about one open in five before the store waited itself."""
    import time

    ctx = multiprocessing.get_context("spawn")
    paths = [str(tmp_path / f"s{i}.sqlite") for i in range(12)]
    results = ctx.Queue()
    start = time.time() + 3  # past every worker's start-up
    workers = [ctx.Process(target=_open_at, args=(paths, start, results)) for _ in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    errors = []
    while not results.empty():
        errors.append(results.get())
    assert errors == []
    for path in paths:
        with Store(path) as store:
            assert store.runs() == []


def test_a_store_held_past_the_timeout_says_so_not_that_it_is_damaged(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(UserError, match="another process held it for over 0 s: relaunch"):
            Store(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with Store(path) as store:  # untouched
        assert store.runs() == []


def test_a_store_file_not_yet_given_its_tables_is_read_as_one_line(tmp_path):
    path = tmp_path / "s.sqlite"
    sqlite3.connect(path).execute("PRAGMA user_version=0").connection.close()  # empty file
    with pytest.raises(UserError, match="has no tables yet .* try again once a run has started"):
        Store(path, readonly=True)


def test_a_relaunched_sweep_is_exactly_its_current_members(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        for run_id in ("old", "kept", "new"):
            store.register_run(_run(run_id))
        store.add_sweep("sw", {}, ["old", "kept"])
        store.add_sweep("sw", {}, ["kept", "new"])
        assert sorted(r.run_id for r in store.runs("sw")) == ["kept", "new"]
        assert store.run("old") is not None  # its rows stay in the store


# -- schema 2: FLOP conventions on runs, provenance on fits ------------------

_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE sweeps (name TEXT PRIMARY KEY, config_json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, config_json TEXT NOT NULL, n_params INTEGER NOT NULL,
    n_params_total INTEGER NOT NULL, n_layer INTEGER NOT NULL, d_model INTEGER NOT NULL,
    n_heads INTEGER NOT NULL, n_ctx INTEGER NOT NULL, tokens INTEGER NOT NULL,
    flops REAL NOT NULL, status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, reason TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE sweep_runs (sweep TEXT NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (sweep, run_id));
CREATE TABLE metrics (run_id TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (run_id, step, name));
CREATE TABLE per_token (run_id TEXT NOT NULL, step INTEGER NOT NULL, losses BLOB NOT NULL,
    PRIMARY KEY (run_id, step));
CREATE TABLE fits (fit_id INTEGER PRIMARY KEY AUTOINCREMENT, sweep TEXT NOT NULL,
    law TEXT NOT NULL, what TEXT NOT NULL, curve TEXT NOT NULL, params_json TEXT NOT NULL,
    intervals_json TEXT NOT NULL, objective REAL NOT NULL, converged INTEGER NOT NULL,
    n_points INTEGER NOT NULL, selection_json TEXT NOT NULL, settings_json TEXT NOT NULL,
    created REAL NOT NULL);
INSERT INTO schema_version VALUES (1);
INSERT INTO runs VALUES ('old', '{}', 1000, 2000, 1, 8, 1, 4, 10000, 6.5e7, 'finished', 10,
    NULL, 0, 0);
INSERT INTO sweep_runs VALUES ('sw', 'old');
INSERT INTO metrics VALUES ('old', 10, 'eval_loss', 2.5);
INSERT INTO per_token VALUES ('old', 10, X'0000803F00000040');
INSERT INTO fits (sweep, law, what, curve, params_json, intervals_json, objective, converged,
    n_points, selection_json, settings_json, created)
    VALUES ('sw', 'power', 'final', 'all', '{"alpha": 0.1}', '{}', 0.001, 1, 5, '{}', '{}', 0);
"""


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    with Store(path) as store:
        run = store.run("old")  # nothing lost, and its FLOPs are named by convention
        assert run.flops == 6.5e7 and run.status == "finished"
        assert run.flop_convention == "6N+attention"
        assert run.flops_by_convention == {"6N+attention": 6.5e7}
        assert store.last_eval("old") == (10, 2.5)
        (old_fit,) = store.fits("sw")
        assert old_fit.params == {"alpha": 0.1} and old_fit.provenance == {}
        # Per-token vectors from before schema 3 have no standard errors.
        steps, losses = store.per_token("old")
        assert steps.tolist() == [10] and losses.tolist() == [[1.0, 2.0]]
        _, errors, sequences = store.per_token_stderr("old")
        assert np.isnan(errors).all() and errors.shape == (1, 2) and sequences.tolist() == [0]
        store.register_run(_run("new"))  # and the upgraded store takes new records
        store.log_eval(
            "new",
            5,
            {"eval_loss": 2.0},
            np.array([3.0, 1.0]),
            np.array([0.5, 0.25]),
            n_sequences=64,
        )
        _, errors, sequences = store.per_token_stderr("new")
        assert errors.tolist() == [[0.5, 0.25]] and sequences.tolist() == [64]
    version = sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchall()
    assert version == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 4


def test_a_version_3_store_learns_the_preempted_status_and_keeps_its_runs(tmp_path):
    path = tmp_path / "v3.sqlite"
    with Store(path) as store:
        store.register_run(_run("old"), sweep="sw")
        store.log_eval("old", 5, {"eval_loss": 2.0})
        store.set_status("old", "running", step=5)
    # Back to schema 3 as it was: a runs table whose CHECK knows four statuses.
    conn = sqlite3.connect(path)
    v3_columns = store_module._RUNS_COLUMNS.replace(", 'preempted'", "")
    conn.executescript(
        f"CREATE TABLE runs_v3 ({v3_columns}); INSERT INTO runs_v3 SELECT * FROM runs; "
        "DROP TABLE runs; ALTER TABLE runs_v3 RENAME TO runs; "
        "UPDATE schema_version SET version = 3;"
    )
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE runs SET status = 'preempted'")
    conn.close()
    with Store(path) as store:
        run = store.run("old")
        assert (run.status, run.step, run.n_params) == ("running", 5, _run("old").n_params)
        assert store.last_eval("old") == (5, 2.0) and [r.run_id for r in store.runs("sw")] == [
            "old"
        ]
        assert store._conn.execute("PRAGMA foreign_keys").fetchone() == (1,)  # on again
        store.set_status("old", "preempted", step=7)
        assert (store.run("old").status, store.run("old").step) == ("preempted", 7)
        with pytest.raises(ValueError, match="not one of"):
            store.set_status("old", "paused")


def test_provenance_round_trips(tmp_path):
    path = tmp_path / "s.sqlite"
    counts = {"6N": 6e7, "6N_total": 1.2e8, "6N+attention": 6.5e7, "6N+causal_attention": 6.25e7}
    provenance = {
        "runs": ["a", "b"],
        "points": [[1000.0, 3.0], [2000.0, 2.5]],
        "objective": "huber",
        "objective_value": 1.5e-4,
        "optimizer": {"method": "bfgs", "max_iter": 500, "tol": 1e-9},
        "n_starts": 27,
        "n_starts_converged": 25,
        "flop_convention": "6N",
        "version": "git:0123abc",
    }
    with Store(path) as store:
        store.register_run(
            dataclasses.replace(
                _run("a"), flops_by_convention=counts, flop_convention="6N", flops=6e7
            )
        )
        store.save_fit(
            FitRecord(
                "sw",
                "power",
                "final",
                "all",
                {"alpha": 0.1},
                {},
                1.5e-4,
                True,
                2,
                {"runs": ["a", "b"]},
                {},
                provenance=provenance,
            )
        )
    with Store(path) as store:
        run = store.run("a")
        assert run.flops_by_convention == counts and run.flop_convention == "6N"
        assert store.fits("sw")[0].provenance == provenance


def test_writability_is_checked_without_creating_anything(tmp_path):
    nested = tmp_path / "a" / "b" / "s.sqlite"
    check_writable(nested)
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_writable(blocker / "s.sqlite")
    with pytest.raises(UserError, match="not writable"):
        check_writable(tmp_path)  # a folder where the file should be


def test_a_read_only_store_is_read_and_never_written(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.register_run(RunRecord("r1", {}, 10, 20, 1, 8, 1, 16, 100, 1e6), sweep="sw")
    before = path.read_bytes()
    with Store(path, readonly=True) as store:
        assert [r.run_id for r in store.runs("sw")] == ["r1"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.set_status("r1", "finished", step=5)
    assert path.read_bytes() == before
    with pytest.raises(UserError, match="no results store"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_damaged_store_is_one_line_for_every_reader(tmp_path, capsys):
    from launch.cli import main

    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        for i in range(50):
            store.register_run(
                RunRecord(f"r{i}", {"x": "y" * 500}, 10, 20, 1, 8, 1, 16, 100, 1e6), sweep="sw"
            )
    with path.open("r+b") as f:  # random bytes over the data pages, as `dd` would
        f.seek(3 * 4096)
        f.write(np.random.default_rng(0).bytes(20 * 4096))
    for command in (
        ["status", "--sweep", "sw"],
        ["query", "--sweep", "sw"],
        ["fit", "--sweep", "sw", "--law", "power", "--what", "final"],
    ):
        assert main([*command, "--store", str(path)]) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and (
            "damaged" in err or "not a readable" in err or "not a results store" in err
        ), err


def test_a_store_removed_under_a_writer_refuses_the_next_write(tmp_path):
    path = tmp_path / "store" / "s.sqlite"
    store = Store(path)
    store.register_run(RunRecord("r1", {}, 10, 20, 1, 8, 1, 16, 100, 1e6), sweep="sw")
    import shutil

    shutil.rmtree(path.parent)  # `rm -rf` of the store's folder mid-sweep
    with pytest.raises(UserError, match="was removed or replaced while this process"):
        store.log_eval("r1", 1, {"eval_loss": 2.0}, np.ones(16, np.float32))
    store.close()
