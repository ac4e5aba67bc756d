"""The notebook API: the store as DataFrames, fits of DataFrames, figures on a given Axes."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from test_analysis import _synthetic_sweep

from launch.cli import main
from scaling import notebook as sn
from scaling.errors import UserError


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.sqlite"
    _synthetic_sweep(str(path))
    with sn.open_store(path) as store:
        yield store


def test_a_missing_store_is_an_error_not_a_new_file(tmp_path):
    with pytest.raises(UserError, match="no store at"):
        sn.open_store(tmp_path / "typo.sqlite")
    assert not (tmp_path / "typo.sqlite").exists()


def test_runs_evals_and_per_token_as_frames(store):
    runs = sn.runs(store, "syn")
    assert list(runs.index) == ["bad", "run0", "run1", "run2", "run3", "run4"]
    assert runs.loc["run4", "n_params"] == 256_000 and runs.loc["bad", "status"] == "failed"
    evals = sn.evals(store, "syn")
    assert evals.loc[("run0", 10), "eval_loss"] == pytest.approx(1.5 + 20 * 1e3**-0.3 + 0.2)
    assert sorted(evals.index.get_level_values("step").unique()) == [1, 3, 10]
    tokens = sn.per_token(store, "syn")
    assert len(tokens) == 5 * 3 * 64
    last = sn.per_token(store, "syn", last_only=True)
    assert set(last["step"]) == {10} and len(last) == 5 * 64
    row = last[(last.run_id == "run2") & (last["T"] == 4)].iloc[0]
    assert row["loss"] == pytest.approx(2.0 + 3.0 * 4**-0.5, rel=1e-6)
    with pytest.raises(UserError, match="no runs in sweep 'nope'"):
        sn.runs(store, "nope")


def test_fit_a_frame_per_group_and_read_stored_fits(store, capsys):
    final = sn.final_losses(store, "syn").join(sn.runs(store, "syn")[["n_params"]])
    one = sn.fit_frame(final, "saturating", x="n_params", y="eval_loss", bootstrap=20)
    assert one.loc["all", "alpha"] == pytest.approx(0.3, abs=0.02)
    assert one.loc["all", "alpha_low"] <= one.loc["all", "alpha"] <= one.loc["all", "alpha_high"]
    tokens = sn.per_token(store, "syn", last_only=True)
    per_run = sn.fit_frame(tokens, "saturating", x="T", y="loss", by="run_id")
    assert list(per_run.index) == ["run0", "run1", "run2", "run3", "run4"]
    np.testing.assert_allclose(per_run["alpha"], 0.5, atol=1e-3)
    with pytest.raises(UserError, match="no column 'loss_'"):
        sn.fit_frame(tokens, "saturating", x="T", y="loss_")
    assert (
        main(
            [
                "fit",
                "--store",
                str(store.path),
                "--sweep",
                "syn",
                "--law",
                "saturating",
                "--what",
                "final",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    capsys.readouterr()
    fits = sn.fits(store, "syn")
    assert set(fits["param"]) == {"E", "A", "alpha"} and set(fits["what"]) == {"final"}
    assert fits.set_index("param").loc["alpha", "value"] == pytest.approx(0.3, abs=0.02)


def test_draw_onto_the_callers_axes(store):
    figure = Figure()
    left, right = figure.subplots(1, 2)
    plot = sn.draw(store, "syn", "learning-curves", ax=right)
    assert plot.figure is figure
    assert len(right.get_lines()) >= 5 and not left.get_lines()
    alone = sn.draw(store, "syn", "learning-curves")
    assert alone.figure is not figure and len(alone.figure.axes[0].get_lines()) >= 5


def test_fit_a_sweep_from_python_stores_what_the_command_line_would(store):
    frame = sn.fit_sweep(store, "syn", "saturating", "per-token", bootstrap=0)
    assert set(frame["curve"]) == {"run0", "run1", "run2", "run3", "run4"}
    alphas = frame[frame.param == "alpha"]["value"]
    np.testing.assert_allclose(alphas, 0.5, atol=1e-3)
    stored = sn.fits(store, "syn")
    assert sorted(stored["fit_id"].unique()) == sorted(frame["fit_id"].unique())
    with pytest.raises(UserError, match="--what isoflop goes with --law compute_optimal"):
        sn.fit_sweep(store, "syn", "saturating", "isoflop")
