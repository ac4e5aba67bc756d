"""Backtests: prediction intervals that cover at their nominal rate, and the stored command."""

import json

import numpy as np
import pytest

from launch import cli
from scaling.checks.backtest import backtest_arrays, backtest_sweep
from scaling.errors import UserError
from scaling.fitting.laws import get_law
from scaling.store import RunRecord, Store

TRUTH = {"E": 1.7, "A": 40.0, "alpha": 0.3}
SIZES = np.geomspace(1e3, 1e6, 10)


def synthetic(n_seeds, sigma=0.01, seed=0):
    law = get_law("saturating")
    clean = np.asarray(law.predict(TRUTH, SIZES))
    y = clean * np.exp(np.random.default_rng(seed).normal(0, sigma, (n_seeds, len(SIZES))))
    return np.broadcast_to(SIZES[None, :, None], (n_seeds, len(SIZES), 1)), y, clean


@pytest.mark.slow  # hundreds of synthetic sweeps
def test_intervals_cover_at_about_their_nominal_rate():
    # 30 synthetic sweeps with known truth, batched as 30 curves of one fit;
    # each predicts its two largest sizes from the other eight.
    x, y, clean = synthetic(30)
    holdout = np.zeros(y.shape, bool)
    holdout[:, -2:] = True
    out = backtest_arrays(
        "saturating", x, y, np.ones(y.shape, bool), holdout, bootstrap=100, confidence=0.9
    )
    assert out["result"].converged.all()
    rate = out["inside"][:, -2:].mean()  # observed held-out losses inside: nominal 0.9
    assert 0.78 <= rate <= 0.99, rate
    truth_inside = (out["low"][:, -2:] <= clean[-2:]) & (clean[-2:] <= out["high"][:, -2:])
    assert 0.78 <= truth_inside.mean() <= 1.0
    # Errors are of the noise's size, and only held-out points have predictions.
    assert np.nanmean(np.abs(out["rel_error"])) < 0.03
    assert np.isnan(out["predicted"][:, :-2]).all() and not out["inside"][:, :-2].any()


@pytest.mark.slow  # a backtest with 50 bootstrap refits
def test_a_wrong_law_is_caught_outside_its_intervals():
    # The truth saturates at E = 1.7; a pure power law fitted to the small sizes
    # overshoots the descent and misses the held-out largest ones.
    x, y, _ = synthetic(4, sigma=0.002, seed=1)
    holdout = np.zeros(y.shape, bool)
    holdout[:, -3:] = True
    out = backtest_arrays("power", x, y, np.ones(y.shape, bool), holdout, bootstrap=50)
    assert out["inside"].sum() < holdout.sum() / 2


def _sweep_store(path, n_runs=8, seed=3):
    law = get_law("saturating")
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1e3, 1e6, n_runs).astype(int)
    with Store(path) as store:
        for i, n in enumerate(sizes):
            run_id = f"run{i}"
            store.register_run(
                RunRecord(
                    run_id,
                    {},
                    int(n),
                    int(n) + 10,
                    1,
                    8,
                    1,
                    16,
                    10_000,
                    6.0 * n * 10_000,
                    flops_by_convention={
                        "6N": 6.0 * n * 1e4,
                        "6N+attention": 6.0 * n * 1e4,
                        "6N_total": 6.0 * (n + 10) * 1e4,
                    },
                ),
                sweep="sw",
            )
            loss = float(law.predict(TRUTH, float(n))) * np.exp(rng.normal(0, 0.005))
            store.log_eval(run_id, 100, {"eval_loss": loss})
            store.set_status(run_id, "finished", step=100)
    return sizes


def test_backtest_sweep_is_stored_with_the_fit(tmp_path):
    path = tmp_path / "s.sqlite"
    _sweep_store(path)
    with Store(path) as store:
        outcome = backtest_sweep(store, "sw", "saturating", 2, by="compute", bootstrap=50)
        assert [r["run_id"] for r in outcome["holdout"]] == ["run6", "run7"]
        (record,) = [f for f in store.fits("sw") if f.what == "backtest"]
    assert record.fit_id == outcome["fit_id"] and record.n_points == 6
    assert record.provenance["backtest"]["holdout"] == outcome["holdout"]
    assert record.provenance["runs"] == [f"run{i}" for i in range(6)]
    assert len(record.provenance["points"]) == 6
    with Store(path) as store, pytest.raises(UserError, match="hold out 1 to 4 runs"):
        backtest_sweep(store, "sw", "saturating", 5)


def test_backtest_command(tmp_path, capsys):
    path = tmp_path / "s.sqlite"
    _sweep_store(path)
    assert (
        cli.main(
            [
                "backtest",
                "sw",
                "--law",
                "saturating",
                "--holdout-largest",
                "1",
                "--bootstrap",
                "50",
                "--store",
                str(path),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["holdout"][0]["run_id"] == "run7" and out["by"] == "n"
    assert abs(out["holdout"][0]["rel_error"]) < 0.05
    assert (
        cli.main(
            [
                "backtest",
                "sw",
                "--law",
                "saturating",
                "--holdout-largest",
                "9",
                "--store",
                str(path),
            ]
        )
        == 2
    )
    assert "hold out 1 to 4 runs" in capsys.readouterr().err
