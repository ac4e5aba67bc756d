"""Hostile input by the class, not by the example (hypothesis): any text as a sweep name, any
JSON in any field of a bucket's run records, any text in a CSV cell. Each either works or is
refused in one line; nothing else escapes, and nothing refused leaves a trace."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch import remote_records, sync
from scaling.errors import UserError
from scaling.figures.status import status_rows, status_table
from scaling.store import Store, check_sweep_name
from scaling.studies.csvfit import csv_arrays

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- names --------------------------------------------------------------------


@FAST
@given(st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9._/\\-]{1,70}", fullmatch=True))
def test_a_sweep_name_is_refused_in_one_line_or_stays_inside_its_folder(name):
    base = Path("/srv/results/plots").resolve()
    try:
        check_sweep_name(name)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) < 300
        return
    for path in (base / name, base / f"{name}.html", base / name / "per-token.png"):
        resolved = path.resolve()
        assert resolved.is_relative_to(base) and resolved != base, name
    assert name == name.strip() and "\n" not in name and len(name) <= 64


# -- bucket records -----------------------------------------------------------

RUN_ID = "0123456789ab"
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def _good_bucket(root: Path) -> Path:
    """A bucket holding one run's records as the trainer writes them: two evals, finished."""
    bucket = root / "good"
    if bucket.exists():
        return bucket
    records = remote_records.RunRecords(str(bucket), RUN_ID)
    records.start(
        {
            "run_id": RUN_ID,
            "config": {"sweep_name": "fz", "seed": 0, "train": {"steps": 10}},
            "n_params": 1000,
            "n_params_total": 2000,
            "n_layer": 1,
            "d_model": 16,
            "n_heads": 1,
            "n_ctx": 4,
            "tokens": 10_000,
            "flops": 1e9,
            "status": "pending",
            "step": 0,
            "reason": None,
            "flops_by_convention": {"6N": 6e8, "6N+attention": 1e9},
            "flop_convention": "6N+attention",
        }
    )
    records.environment(
        {
            "packages": {"jax": "0.10.2", "flax": "0.12.8"},
            "platform": "cpu",
            "device_kind": "cpu",
            "device_count": 1,
            "process_count": 1,
        }
    )
    for step in (5, 10):
        records.eval(step, {"eval_loss": 3.0 / step, "train_loss": 3.1 / step}, [3, 2, 1.5, 1.2])
    records.status("finished", 10)
    return bucket


def _fields(bucket: Path) -> list[tuple[Path, tuple]]:
    """Every (file, key path) of the run's records a value could be put at."""
    found = []

    def walk(file, value, path):
        found.append((file, path))
        if isinstance(value, dict):
            for k, v in value.items():
                walk(file, v, (*path, k))
        elif isinstance(value, list) and value:
            walk(file, value[0], (*path, 0))

    for file in sorted((bucket / "runs" / RUN_ID / "records").rglob("*.json")):
        walk(file, json.loads(file.read_text()), ())
    return found


@pytest.fixture(scope="module")
def good_bucket(tmp_path_factory):
    bucket = _good_bucket(tmp_path_factory.mktemp("records"))
    return bucket, _fields(bucket)


# An overflow on the way into the store is a failure too. Hypothesis's own deprecation
# warning is not: it fires when anything in the process touches the global `random` during
# a draw, such as a storage client's retry jitter on a thread an earlier test left behind.
@pytest.mark.filterwarnings("error", "ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(FAST, max_examples=150)
@given(data=st.data())
def test_any_value_in_any_record_field_syncs_whole_or_is_skipped_in_one_line(
    good_bucket, tmp_path_factory, data
):
    good, fields = good_bucket
    file, path = data.draw(st.sampled_from(fields))
    value = data.draw(JSON)
    bucket = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(good, bucket, dirs_exist_ok=True)
    target = bucket / file.relative_to(good)
    record = json.loads(target.read_text())
    if path:
        holder = record
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value
    else:
        record = value
    target.write_text(json.dumps(record))  # NaN and inf as JSON allows them (Python's)
    with Store(bucket / "store.sqlite") as store:
        try:
            outcome = sync.sync(store, str(bucket), "fz")
        except UserError as e:  # "no runs of sweep": skipped (its reason said) or moved out
            assert "\n" not in str(e)
            assert store.runs() == []
            return
        if outcome["skipped"]:
            why = outcome["skipped"][RUN_ID]
            assert "\n" not in why and store.runs() == []
            return
        # Accepted: the run reads back whole, as every reader reads it.
        (run,) = store.runs()
        steps, losses = store.scalars(RUN_ID, "eval_loss")
        assert len(steps) == 2 and all(loss == loss for loss in losses)
        assert run.n_ctx == 4 and len(store.per_token(RUN_ID)[1][-1]) == 4
        assert np.isfinite(store.per_token(RUN_ID)[1]).all()
        assert len(status_table(status_rows(store, "fz")).splitlines()) == 2  # one line a run


# -- CSV cells ----------------------------------------------------------------


@FAST
@given(
    cell=st.text(max_size=30),
    row=st.integers(min_value=0, max_value=4),
    column=st.sampled_from(["N", "L"]),
)
def test_any_text_in_a_csv_cell_reads_as_numbers_or_one_line(tmp_path_factory, cell, row, column):
    rows = [{"N": f"{n:g}", "L": f"{2 + 10 * n**-0.3:.6f}"} for n in (1e6, 3e6, 1e7, 3e7, 1e8)]
    rows[row] = {**rows[row], column: cell}
    path = tmp_path_factory.mktemp("csv") / "points.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["N", "L"])
        writer.writeheader()
        writer.writerows(rows)
    try:
        x, y = csv_arrays(path, "saturating", ["N"], "L")
    except UserError as e:
        assert "\n" not in str(e)
        return
    # Numbers the fitter can be given: finite and in range (its own checks refuse <= 0).
    assert x.shape == (5, 1) and y.shape == (5,)
    assert (abs(x) <= 1e300).all() and (abs(y) <= 1e30).all()


def test_a_sync_killed_inside_a_run_leaves_that_run_out_whole(tmp_path):
    """SIGKILL at the second eval write of a run: the run's rows are one transaction, so the
    store holds none of it (not a run with half its evals); a second sync brings it whole."""
    import os
    import subprocess
    import sys

    bucket = _good_bucket(tmp_path)
    store = tmp_path / "store.sqlite"
    Store(store).close()
    code = (
        "import sys; from launch import sync; from scaling.store import Store; "
        "s = Store(sys.argv[1]); sync.sync(s, sys.argv[2], 'fz')"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code, str(store), str(bucket)],
        env={**os.environ, "SCALING_FAULT": "store_write:2"},
        cwd=Path(__file__).parents[1],
        capture_output=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    with Store(store) as s:
        assert s.runs() == [] and s.scalars(RUN_ID, "eval_loss")[0].size == 0
        assert sync.sync(s, str(bucket), "fz")["evals"] == 2
        assert len(s.scalars(RUN_ID, "eval_loss")[0]) == 2 and s.run(RUN_ID).status == "finished"
