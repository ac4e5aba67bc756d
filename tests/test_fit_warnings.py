"""Fits that must not be read as results are flagged: in text, JSON and the HTML report."""

import json

import numpy as np
import pytest

from launch.cli import main
from scaling.fitting.laws import get_law
from scaling.store import RunRecord, Store
from scaling.studies.fit_warnings import fit_warnings, per_token_bins, rises

N_CTX = 64


def test_bins_are_log2_with_the_short_tail_merged():
    bins = per_token_bins(np.arange(1, 129, dtype=float))
    assert [(b.lo, b.hi) for b in bins] == [
        (1, 1),
        (2, 3),
        (4, 7),
        (8, 15),
        (16, 31),
        (32, 63),
        (64, 128),
    ]
    assert bins[1].mean == 2.5 and np.isnan(bins[1].stderr)
    # Standard errors of independent positions combine as sqrt(sum se^2) / k.
    bins = per_token_bins(np.ones(8), np.full(8, 0.2))
    assert [(b.lo, b.hi) for b in bins] == [(1, 1), (2, 3), (4, 8)]
    np.testing.assert_allclose([b.stderr for b in bins], [0.2, 0.2 / 2**0.5, 0.2 / 5**0.5])


def test_rises_names_the_bin_above_the_one_before_it():
    falling = 2.0 + 3.0 * np.arange(1, N_CTX + 1) ** -0.5
    assert rises(per_token_bins(falling)) == []
    bumped = falling.copy()
    bumped[7:15] += 0.5  # T = 8..15, above T = 4..7
    ((before, after),) = rises(per_token_bins(bumped))
    assert (before.lo, after.lo, after.hi) == (4, 8, 15)
    # Within the tolerance, and before T = 4, a rise is noise or the first bytes.
    assert rises(per_token_bins(np.r_[falling[:7], falling[7:] + 0.02])) == []
    early = falling.copy()
    early[1:3] += 1.0  # T = 2, 3
    assert rises(per_token_bins(early)) == []


def test_a_determined_fit_has_no_warnings():
    law = get_law("saturating")
    x = np.arange(1, N_CTX + 1, dtype=float)
    y = 2.0 + 3.0 * x**-0.5
    assert (
        fit_warnings(
            law,
            {"E": 2.0, "A": 3.0, "alpha": 0.5},
            {"E": [1.9, 2.1], "A": [2.8, 3.3], "alpha": [0.45, 0.56]},
            len(y),
            y=y,
            what="per-token",
            x=x,
        )
        == []
    )


def test_each_reason_gives_one_line():
    law = get_law("saturating")
    y = np.linspace(3.0, 2.0, 5)
    lines = fit_warnings(
        law,
        {"E": 1e-11, "A": 3.8, "alpha": 0.049},
        {"E": [0.0, 0.85], "A": [3.0, 6.6], "alpha": [0.019, 0.145]},
        5,
        y=y,
    )
    assert any(line.startswith("E = 1e-11 is at its bound 0") for line in lines)
    assert not any(line.startswith("alpha") for line in lines)  # 7.6x: under the 10x line
    assert any("5 points for 3 parameters" in line for line in lines)
    wide = fit_warnings(
        law,
        {"E": 2.0, "A": 0.68, "alpha": 2.2},
        {"E": [1.99, 2.06], "A": [0.28, 1.5e18], "alpha": [0.9, 39.6]},
        128,
    )
    assert [line.split("'")[0] for line in wide] == ["A", "alpha"]


@pytest.fixture
def store_with_curves(tmp_path):
    """A sweep of three finished runs whose last per-token curves fall, rise, and are flat."""
    path = str(tmp_path / "store.sqlite")
    t = np.arange(1, N_CTX + 1, dtype=float)
    curves = {
        "falls": 2.0 + 3.0 * t**-0.6,
        "rises": 2.5 + 1.0 * t**-2.0 + np.where(t >= 8, 0.12, 0.0),
        "flat": np.full(N_CTX, 2.5) + np.random.default_rng(0).normal(0, 0.001, N_CTX),
    }
    with Store(path) as store:
        for i, (name, curve) in enumerate(curves.items()):
            store.register_run(
                RunRecord(name, {}, 1000 * 10**i, 2000 * 10**i, 1, 8, 1, N_CTX, 10**6, 1e12),
                sweep="s",
            )
            store.log_eval(
                name,
                100,
                {"eval_loss": float(curve.mean())},
                curve,
                np.full(N_CTX, 0.01),
                n_sequences=512,
            )
            store.set_status(name, "finished", step=100)
        store.add_sweep("s", {}, list(curves))
    return path


def _fit(store, what, *extra):
    """`scaling fit` of the saturating law to `what` of sweep s, 20 resamples."""
    return main(
        [
            "fit",
            "--sweep",
            "s",
            "--law",
            "saturating",
            "--what",
            what,
            "--store",
            store,
            "--bootstrap",
            "20",
            *extra,
        ]
    )


@pytest.mark.slow  # two fits with bootstrap intervals
def test_query_flags_a_rising_curve_and_an_unidentified_offset(store_with_curves, capsys):
    assert _fit(store_with_curves, "per-token") == 0
    text = capsys.readouterr().out
    assert main(["query", "--sweep", "s", "--store", store_with_curves, "--json"]) == 0
    fits = {f["curve"]: f for f in json.loads(capsys.readouterr().out)}
    assert fits["falls"]["warnings"] == []
    assert any("rises with T" in w for w in fits["rises"]["warnings"])
    # A flat curve has nothing for A T^-alpha to describe: A or alpha is undetermined.
    assert fits["flat"]["warnings"]
    assert "warning: the per-token loss rises with T" in text
    # Three runs for a three-parameter law: too few points, and the offset is flagged.
    assert _fit(store_with_curves, "final", "--json") == 0
    (final,) = json.loads(capsys.readouterr().out)
    assert any("3 points for 3 parameters" in w for w in final["warnings"])


@pytest.mark.slow  # two fits with bootstrap intervals, then the report
def test_the_report_shows_the_warnings(store_with_curves, tmp_path):
    from scaling.figures.html_report import write_report

    assert _fit(store_with_curves, "per-token") == 0
    with Store(store_with_curves) as store:
        path, _ = write_report(store, "s", tmp_path / "report.html")
    assert "rises with T" in path.read_text()
