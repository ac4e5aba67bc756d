"""Chinchilla approach 2 on a synthetic IsoFLOP grid whose exponents are known."""

import json

import numpy as np
import pytest

from launch.cli import main
from scaling.store import RunRecord, Store

E, A, B, ALPHA, BETA = 1.7, 400.0, 410.0, 0.34, 0.28  # Hoffmann et al. 2022, approach 3


def _n_opt(budget):
    """The compute-optimal N of the law above at C = 6 N D."""
    return (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA)) * (budget / 6) ** (
        BETA / (ALPHA + BETA)
    )


def _add_finished_run(store, run_id, n, tokens, sweep, penalty=0.0):
    """One finished run of N = n on `tokens` tokens at the law's loss (plus a penalty)."""
    store.register_run(
        RunRecord(run_id, {}, int(n * 0.9), int(n), 4, 64, 4, 2048, int(tokens), 0.0),
        sweep=sweep,
    )
    store.log_eval(run_id, 10, {"eval_loss": E + A / n**ALPHA + B / tokens**BETA + penalty})
    store.set_status(run_id, "finished")


def test_approach_two_recovers_the_compute_optimal_exponents(tmp_path, capsys):
    path = str(tmp_path / "store.sqlite")
    ids = []
    with Store(path) as store:
        for budget in (1e18, 1e19, 1e20, 1e21):
            for n in _n_opt(budget) * np.geomspace(1 / 4, 4, 9):
                run_id = f"r{len(ids)}"
                ids.append(run_id)
                _add_finished_run(store, run_id, n, budget / (6 * n), "grid")
        store.add_sweep("grid", {}, ids)
    assert (
        main(
            [
                "fit",
                "--sweep",
                "grid",
                "--what",
                "isoflop",
                "--law",
                "compute_optimal",
                "--store",
                path,
                "--json",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    (record,) = json.loads(capsys.readouterr().out)
    assert record["n_points"] == 4
    assert record["params"]["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert record["params"]["b"] == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.02)
    assert record["params"]["a"] + record["params"]["b"] == pytest.approx(1.0, abs=1e-6)
    # Stored as every fit is: the runs and points it used, its method, the version.
    p = record["provenance"]
    assert sorted(p["runs"]) == sorted(ids) and len(p["points"]) == len(ids)
    assert p["method"].startswith("approach 2") and p["version"] and p["environments"] == []
    assert main(["query", "--sweep", "grid", "--store", path]) == 0
    assert f"provenance: {len(ids)} runs, {len(ids)} points, approach 2" in (
        capsys.readouterr().out
    )
    assert (
        main(
            [
                "plot",
                "grid",
                "--kind",
                "isoflop-total",
                "--store",
                path,
                "--out",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    assert (tmp_path / "plots" / "isoflop-total.png").stat().st_size > 10_000


def test_a_grid_without_profiles_is_refused(one_run_store, capsys):
    path = one_run_store
    assert (
        main(
            [
                "fit",
                "--sweep",
                "s",
                "--what",
                "isoflop",
                "--law",
                "compute_optimal",
                "--store",
                path,
            ]
        )
        == 2
    )
    assert "profiles" in capsys.readouterr().err


def test_a_tuned_grid_keeps_each_sizes_best_run(tmp_path):
    """Each (budget, size) trained at three learning rates, two of them worse by a margin
    that depends on size (a rule that favours small models): the profiles are the best
    runs, so the exponent is the grid's own, and the other runs are named as left out."""
    from scaling.figures import plots
    from scaling.studies.analysis import fits_table
    from scaling.studies.isoflop import fit_isoflop

    path = tmp_path / "store.sqlite"
    ids, worse = [], []
    with Store(path) as store:
        for budget in (1e18, 1e19, 1e20):
            for n in _n_opt(budget) * np.geomspace(1 / 4, 4, 7):
                for penalty in (0.2 * np.log(n), 0.0, 0.02):  # the best one is not first
                    run_id = f"r{len(ids)}"
                    ids.append(run_id)
                    if penalty:
                        worse.append(run_id)
                    _add_finished_run(store, run_id, n, budget / (6 * n), "tuned", penalty)
        store.add_sweep("tuned", {}, ids)
        record = fit_isoflop(store, "tuned", bootstrap=0)
        plot = plots.make_plot(store, "tuned", "isoflop-total")
    assert "42 other run(s) of the same size and budget reached higher losses" in plot.notes[0]
    assert record.params["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert sorted(record.selection["left_out"]) == sorted(worse)
    assert len(record.provenance["runs"]) == len(ids) - len(worse) == 21
    (line,) = [t for t in fits_table([record]).splitlines() if "left out" in t]
    assert line.startswith("  left out, 42 runs (not the best at its size and budget")


def test_a_profile_without_a_minimum_is_named_as_left_out(tmp_path):
    """A budget whose sizes all lie above its optimum gives no N_opt: the fit says which
    profile it dropped and why, beside the runs it used."""
    from scaling.figures import plots
    from scaling.studies.isoflop import fit_isoflop

    ids, dropped = [], []
    with Store(tmp_path / "store.sqlite") as store:
        for budget, spread in ((1e18, (1 / 4, 4)), (1e19, (1 / 4, 4)), (1e20, (4, 16))):
            for n in _n_opt(budget) * np.geomspace(*spread, 5):
                run_id = f"r{len(ids)}"
                ids.append(run_id)
                if budget == 1e20:
                    dropped.append(run_id)
                _add_finished_run(store, run_id, n, budget / (6 * n), "grid")
        store.add_sweep("grid", {}, ids)
        record = fit_isoflop(store, "grid", bootstrap=0)
        plot = plots.make_plot(store, "grid", "isoflop-total")
    assert record.n_points == 2 and record.selection["budgets"] == pytest.approx([1e18, 1e19])
    left_out = record.selection["left_out"]
    assert sorted(left_out) == sorted(dropped)
    assert {reason.split(":")[0] for reason in left_out.values()} == {
        "the profile at C = 1e+20 has no minimum"
    }
    assert "lies outside its sizes" in left_out[dropped[0]]
    assert f"isoflop-total: {left_out[dropped[0]]}; the exponents leave it out" in plot.notes
