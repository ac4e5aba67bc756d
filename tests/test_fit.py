"""The batched fitter: recovery, published fits, masks, bootstrap, bad input, CSV."""

import csv
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from scaling.errors import UserError
from scaling.fitting.fit import bootstrap_weights, fit
from scaling.fitting.laws import get_law
from scaling.studies.csvfit import fit_csv

# ../shared/data beside the checkout (or beside the folder of worktrees), or $SCALING_SHARED_DATA.
_ROOT = Path(__file__).resolve().parents[1]
DATA = next(
    (
        p
        for p in (
            Path(os.environ.get("SCALING_SHARED_DATA", "/nonexistent")),
            _ROOT.parent / "shared" / "data",
            _ROOT.parents[1] / "shared" / "data",
        )
        if p.is_dir()
    ),
    _ROOT.parent / "shared" / "data",
)
EPOCH_CSV = DATA / "chinchilla_fig4_epoch.csv"
# Epoch AI's replication of Hoffmann et al. (2022): estimate, 95% bootstrap interval.
EPOCH = {
    "A": (482.0, 285.2, 743.6),
    "B": (2085.4, 1042.4, 5810.3),
    "E": (1.817, 1.769, 1.871),
    "alpha": (0.3478, 0.317, 0.373),
    "beta": (0.3659, 0.331, 0.415),
}


def noisy(y, rng, sigma=3e-3):
    return y * np.exp(rng.normal(0.0, sigma, np.shape(y)))


def grid2(a, b):
    return np.stack([g.ravel() for g in np.meshgrid(a, b)], axis=1)


# Per law: inputs [n_points, n_inputs], true parameters, and how close the fit must come
# (relative for exponents and offsets, in log units for scales searched as logs).
RECOVERY = {
    "power": (
        np.logspace(6, 10, 30)[:, None],
        {"x_c": 8.8e13, "alpha": 0.076},
        {"x_c": 0.3, "alpha": 0.02},
    ),
    "saturating": (
        np.logspace(0, 4, 40)[:, None],
        {"E": 1.7, "A": 4.0, "alpha": 0.5},
        {"E": 0.005, "A": 0.01, "alpha": 0.01},
    ),
    "kaplan_nd": (
        grid2(np.logspace(6, 9, 6), np.logspace(8, 11, 6)),
        {"N_c": 6.4e13, "alpha_N": 0.076, "D_c": 1.8e13, "alpha_D": 0.103},
        {"N_c": 0.4, "alpha_N": 0.03, "D_c": 0.5, "alpha_D": 0.04},
    ),
    "kaplan_ns": (
        grid2(np.logspace(6, 9, 6), np.logspace(2, 5, 6)),
        {"N_c": 6.5e13, "alpha_N": 0.077, "S_c": 2.1e3, "alpha_S": 0.76},
        {"N_c": 0.4, "alpha_N": 0.03, "S_c": 0.05, "alpha_S": 0.01},
    ),
    "chinchilla": (
        grid2(np.logspace(7, 10, 6), np.logspace(9, 12, 6)),
        {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
        {"E": 0.02, "A": 0.25, "B": 0.3, "alpha": 0.04, "beta": 0.05},
    ),
}


@pytest.mark.parametrize("name", sorted(RECOVERY))
def test_recovers_every_law_from_noisy_synthetic_data(name):
    law = get_law(name)
    x, truth, tolerance = RECOVERY[name]
    y = noisy(np.asarray(law.predict(truth, x)), np.random.default_rng(1))
    result = fit(law, x, y)
    assert result.converged[0] and result.n_points[0] == len(y)
    for k, v in truth.items():
        got = result.params[k][0]
        if k in law.positive and k != "E":
            assert abs(np.log(got / v)) < tolerance[k], (k, got, v)
        else:
            assert got == pytest.approx(v, rel=tolerance[k]), k


def test_objective_is_at_least_as_good_as_scipy_from_the_same_grid():
    law = get_law("saturating")
    x, truth, _ = RECOVERY["saturating"]
    y = noisy(np.asarray(law.predict(truth, x)), np.random.default_rng(1))
    ours = fit(law, x, y).objective[0]

    def objective(theta):  # the same sum of Huber(1e-3) on log residuals, in NumPy
        r = np.log(y) - np.log(np.exp(theta[0]) + np.exp(theta[1]) * x[:, 0] ** -theta[2])
        a = np.abs(r)
        return np.sum(np.where(a <= 1e-3, 0.5 * r * r, 1e-3 * (a - 5e-4)))

    with np.errstate(all="ignore"):
        theirs = min(minimize(objective, x0, method="L-BFGS-B").fun for x0 in law.grid_points())
    assert ours <= theirs * (1 + 1e-9)


def test_kaplan_per_token_curves_recover_their_exponents():
    # Kaplan et al. 2020, Fig. 20: per-token loss a + b T^-c, c from 0.47 to 0.62.
    rng = np.random.default_rng(2)
    t = np.arange(1, 1025, dtype=float)
    c = np.linspace(0.47, 0.62, 8)
    a, b = rng.uniform(2.0, 3.5, 8), rng.uniform(3.0, 6.0, 8)
    y = noisy(a[:, None] + b[:, None] * t ** -c[:, None], rng)
    result = fit("saturating", t, y)
    assert result.converged.all()
    np.testing.assert_allclose(result.params["alpha"], c, atol=0.01)
    np.testing.assert_allclose(result.params["E"], a, rtol=0.01)


def epoch_data():
    if not EPOCH_CSV.is_file():
        pytest.skip(
            f"Epoch's Chinchilla data is not at {EPOCH_CSV} (../shared/data beside the checkout)"
        )
    with EPOCH_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    d = np.array([float(r["Training FLOP"]) for r in rows]) / (6 * n)
    keep = np.argsort(loss)[:-5]  # the five highest-loss runs are left out
    return np.stack([n[keep], d[keep]], axis=1), loss[keep]


def test_reproduces_epochs_chinchilla_fit():
    x, y = epoch_data()
    result = fit("chinchilla", x, y)
    assert result.converged[0] and result.n_points[0] == 240 and result.n_starts == 4500
    for k, (_, low, high) in EPOCH.items():
        assert low < result.params[k][0] < high, k
    assert result.derived["a"][0] == pytest.approx(0.51, abs=0.01)
    # Screening the grid down to 32 starts per curve finds the same optimum for far less work.
    screened = fit("chinchilla", x, y, keep_starts=32)
    assert screened.objective[0] == pytest.approx(result.objective[0], rel=1e-9)
    assert screened.n_evaluations < result.n_evaluations / 5


@pytest.mark.slow
def test_epochs_bootstrap_intervals_from_the_csv():
    epoch_data()
    out = fit_csv(
        EPOCH_CSV,
        "chinchilla",
        ["Model Size", "[Training FLOP] / (6 * [Model Size])"],
        "loss",
        exclude_top=5,
        bootstrap=1000,
    )
    for k, (_, low, high) in EPOCH.items():
        ours_low, ours_high = out["intervals"][k]
        assert ours_low == pytest.approx(low, rel=0.1) and ours_high == pytest.approx(
            high, rel=0.1
        ), k


@pytest.mark.slow  # a curve fitted alone, then padded in a batch
def test_padding_changes_nothing():
    rng = np.random.default_rng(3)
    law = get_law("saturating")
    x = np.logspace(0, 3, 30)
    short = noisy(np.asarray(law.predict({"E": 2.0, "A": 3.0, "alpha": 0.4}, x[:20])), rng)
    long = noisy(np.asarray(law.predict({"E": 1.5, "A": 5.0, "alpha": 0.6}, x)), rng)
    alone = fit(law, x[:20], short)
    y = np.stack([np.concatenate([short, [np.nan, -1.0, 0.0] * 3 + [1.0]]), long])
    xs = np.stack([np.concatenate([x[:20], np.zeros(10)]), x])
    mask = np.arange(30)[None] < np.array([[20], [30]])
    batched = fit(law, xs, y, mask)
    for k in law.param_names:
        assert batched.params[k][0] == pytest.approx(alone.params[k][0], rel=1e-7)
    assert batched.objective[0] == pytest.approx(alone.objective[0], rel=1e-9)
    assert list(batched.n_points) == [20, 30]


def test_resamples_draw_only_valid_points():
    mask = np.arange(12)[None] < np.array([[5], [12]])
    weights = bootstrap_weights(mask, 50, seed=4)
    assert weights.shape == (50, 2, 12)
    assert np.all(weights[:, 0, 5:] == 0)
    np.testing.assert_array_equal(weights.sum(axis=2), np.broadcast_to([5, 12], (50, 2)))
    assert len({tuple(w) for w in weights[:, 1]}) > 45  # resamples differ


@pytest.mark.slow  # 200 bootstrap refits of 40 curves
def test_bootstrap_intervals_cover_the_truth():
    rng = np.random.default_rng(5)
    x = np.logspace(2, 6, 40)
    truth = {"x_c": 1e8, "alpha": 0.1}
    y = noisy(np.broadcast_to((truth["x_c"] / x) ** truth["alpha"], (40, 40)), rng, sigma=0.01)
    result = fit("power", x, y, bootstrap=200, confidence=0.95)
    for k, v in truth.items():
        low, high = result.intervals[k].T
        assert np.all(low <= result.params[k]) and np.all(result.params[k] <= high)
        assert np.mean((low <= v) & (v <= high)) >= 0.9, k
    assert result.bootstrap_params["alpha"].shape == (200, 40)


@pytest.mark.slow  # a pinned fit with bootstrap intervals
def test_pinned_parameters_stay_put():
    law = get_law("saturating")
    x, truth, _ = RECOVERY["saturating"]
    y = noisy(np.asarray(law.predict(truth, x)), np.random.default_rng(6))
    result = fit(law, x, np.stack([y, y]), fixed={"E": [1.7, 1.6]}, bootstrap=20)
    np.testing.assert_array_equal(result.params["E"], [1.7, 1.6])
    assert set(result.intervals) == {"A", "alpha"} and result.fixed == ("E",)
    assert result.params["alpha"][0] == pytest.approx(0.5, rel=0.02)
    assert result.objective[1] > result.objective[0]  # the wrong pin fits worse


def test_fits_leave_float32_the_default():
    fit("power", np.logspace(1, 3, 5), np.logspace(0.5, 0.1, 5))
    assert jnp.asarray(1.0).dtype == jnp.float32 and not jax.config.jax_enable_x64


def test_one_curve_is_a_plain_json_dict():
    x, y = np.logspace(1, 3, 5), np.logspace(0.5, 0.1, 5)
    out = fit("power", x, y).curve(0)
    assert json.loads(json.dumps(out)) == out
    assert set(out) == {"law", "params", "intervals", "objective", "converged", "n_points"}
    assert set(out["params"]) == {"x_c", "alpha"} and out["intervals"] == {}


X5 = np.logspace(1, 3, 5)
Y5 = np.logspace(0.5, 0.1, 5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fit("saturating", X5[:2], Y5[:2]), "curve 0 has 2 valid points.*3 free"),
        (lambda: fit("power", X5, np.stack([Y5, -Y5])), r"curve 1, point 0: y = -"),
        (lambda: fit("power", np.stack([X5, X5 * np.nan]), np.stack([Y5, Y5])), "curve 1.*x = nan"),
        (lambda: fit("power", X5 - 10, Y5), "curve 0, point 0: x = 0.0"),
        (lambda: fit("power", np.append(X5, 1e4), np.append(Y5, np.inf)), "point 5: y = inf"),
        (lambda: fit("power", X5[:4], Y5), r"x has shape \(4,\) but y has shape \(1, 5\)"),
        (lambda: fit("chinchilla", X5[None, :, None], Y5), "1 input columns.*takes 2"),
        (lambda: fit("chinchilla", np.ones((5, 3)), Y5), "3 input columns.*takes 2"),
        (lambda: fit("kaplan", X5, Y5), "unknown law 'kaplan'; known laws: .*chinchilla"),
        (lambda: fit("power", X5, Y5, objective="l2"), "objective 'l2' is not one of huber, lsq"),
        (lambda: fit("power", X5, Y5, mask=np.ones(4, bool)), "mask must be booleans"),
        (lambda: fit("power", X5, Y5, fixed={"E": 1.0}), "fixed parameter 'E'"),
        (
            lambda: fit("power", X5, Y5, fixed={"x_c": -1.0}),
            "fixed x_c = -1.0 must be finite and positive",
        ),
        (lambda: fit("power", X5, Y5, fixed={"x_c": 1e3, "alpha": 0.1}), "every parameter"),
        (lambda: fit("power", X5, Y5, bootstrap=-1), "bootstrap = -1"),
        (lambda: fit("power", X5, Y5, confidence=95), "confidence = 95"),
        (lambda: fit("power", X5, Y5, init_grid={"beta": (1.0,)}), "init_grid names 'beta'"),
        (lambda: fit("power", X5, Y5, keep_starts=0), "keep_starts = 0"),
        (lambda: fit("power", X5, Y5[None, None]), "y has shape"),
        (
            lambda: fit("power", X5, np.stack([Y5, Y5]), np.ones((5, 2), bool)),
            r"mask must be .*\(2, 5\)",
        ),
        (lambda: fit("power", ["a"] * 5, Y5), "x must be an array of numbers"),
    ],
)
def test_bad_input_is_a_user_error(call, message):
    with pytest.raises(UserError, match=message):
        call()


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "curve.csv"
    rng = np.random.default_rng(7)
    x = np.logspace(1, 3, 5)
    y = noisy(np.logspace(0.5, 0.1, 5), rng)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "eval loss", "note"])
        w.writerows([[a, b, "ok"] for a, b in zip(x, y, strict=True)] + [[1e4, 9.0, "spike"]])
    return path, x, y


def test_fit_csv_returns_the_fit_as_json(small_csv):
    path, x, y = small_csv
    out = fit_csv(path, "power", ["step"], "eval loss", exclude_top=1)
    assert json.loads(json.dumps(out)) == out
    direct = fit("power", x, y).curve(0)
    assert out["params"] == pytest.approx(direct["params"], rel=1e-9)
    assert out["n_points"] == 5 and out["converged"] is True
    scaled = fit_csv(path, "power", ["[step] * 10"], "eval loss", exclude_top=1)
    assert scaled["params"]["x_c"] == pytest.approx(10 * out["params"]["x_c"], rel=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (("missing.csv", "power", ["step"], "eval loss"), "no CSV file at"),
        ((None, "power", ["steps"], "eval loss"), "no column 'steps'; its columns are"),
        ((None, "power", ["step"], "note"), "column 'note' holds 'ok', not a number"),
        ((None, "power", ["step", "step"], "eval loss"), "takes 1 x column"),
        ((None, "power", ["[step] + len"], "eval loss"), "may only use numbers"),
    ],
)
def test_fit_csv_bad_input_is_a_user_error(small_csv, args, message):
    path = small_csv[0] if args[0] is None else small_csv[0].parent / args[0]
    with pytest.raises(UserError, match=message):
        fit_csv(path, *args[1:])


@pytest.mark.slow  # 200 bootstrap refits of 24 curves: ~20 s on two cores
def test_residual_bootstrap_keeps_the_design_and_covers_the_truth():
    # Per-token curves: T = 1..128 is a fixed design whose first few points set alpha.
    rng = np.random.default_rng(7)
    T = np.arange(1, 129, dtype=float)
    truth = {"E": 1.8, "A": 0.9, "alpha": 1.2}
    clean = truth["E"] + truth["A"] * T ** -truth["alpha"]
    y = noisy(np.broadcast_to(clean, (24, len(T))), rng, sigma=0.005)
    residuals = fit("saturating", T, y, bootstrap=100, resample="residuals")
    cases = fit("saturating", T, y, bootstrap=100, resample="cases")
    low, high = residuals.intervals["alpha"].T
    assert np.all(low <= residuals.params["alpha"]) and np.all(residuals.params["alpha"] <= high)
    assert np.mean((low <= truth["alpha"]) & (truth["alpha"] <= high)) >= 0.85
    np.testing.assert_allclose(residuals.params["alpha"], cases.params["alpha"])
    # Drawing the points leaves T = 1 out of about a third of the resamples:
    # their refits do not know where the curve starts, and the intervals widen.
    c_low, c_high = cases.intervals["alpha"].T
    assert np.median(high / low) < np.median(c_high / c_low)
    assert residuals.bootstrap_params["alpha"].shape == (100, 24)
    with pytest.raises(UserError, match="resample 'rows' is not one of"):
        fit("saturating", T, y[0], bootstrap=10, resample="rows")


def test_a_fit_that_cannot_fit_in_memory_is_refused_before_anything_is_allocated(monkeypatch):
    from scaling.fitting import inputs

    T = np.arange(1, 65, dtype=float)
    y = np.tile(2 + 1.5 * T**-0.5, (4, 1))
    need = inputs.fit_memory(100_000 * 4 * inputs.BOOTSTRAP_STARTS, 3, T.size * 4 + y.size)
    monkeypatch.setattr(inputs, "available_memory", lambda: need - 1)
    with pytest.raises(UserError, match=r"needs about .* GiB .* fewer --bootstrap resamples"):
        fit("saturating", T, y, bootstrap=100_000)
    with pytest.raises(UserError, match="fewer --bootstrap"):
        fit("saturating", T, y, bootstrap=100_000, varpro=True)
    with pytest.raises(UserError, match="fewer --bootstrap"):
        fit("saturating", T, y, bootstrap=100_000, resample="residuals")
    monkeypatch.setattr(inputs, "available_memory", lambda: need)  # just enough: no refusal
    inputs.check_memory(4, 27, 100_000, 3, T.size * 4 + y.size)


@pytest.mark.parametrize("scale", [pytest.param(1e100, marks=pytest.mark.slow), 1e-60])
def test_inputs_far_from_one_fit_as_well_as_inputs_near_it(scale):
    """Inputs past the grid's reach (1e100 FLOPs, say) are rescaled inside the fitter and
    the parameters mapped back: the same E and exponents, A in the inputs' own units."""
    from scaling.fitting import fit as fit_module

    N = np.geomspace(1e6, 1e10, 12)
    L = 1.7 + 50 * N**-0.3
    near = fit("saturating", N, L)
    far = fit("saturating", N * scale, L, bootstrap=20)
    assert far.converged[0]
    assert far.params["E"][0] == pytest.approx(near.params["E"][0], rel=1e-5)
    assert far.params["alpha"][0] == pytest.approx(0.3, rel=1e-5)
    assert far.params["A"][0] == pytest.approx(50 * scale**0.3, rel=1e-4)
    low, high = far.intervals["A"][0]
    assert low <= far.params["A"][0] <= high and low > 50 * scale**0.3 / 2
    # Two inputs, one of them far: the pair's law back in the inputs' units.
    NN, DD = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
    L2 = 1.7 + 400 * NN**-0.34 + 410 * DD**-0.28
    two = fit("chinchilla", np.stack([NN, DD * scale], 1), L2, keep_starts=8)
    assert two.params["beta"][0] == pytest.approx(0.28, rel=1e-4)
    assert two.params["B"][0] == pytest.approx(410 * scale**0.28, rel=1e-3)
    assert two.params["A"][0] == pytest.approx(400, rel=1e-3)  # N was not rescaled
    # Inputs of the usual sizes are fitted as given, so their answers do not move.
    assert (
        fit_module._input_scale(
            near.law, NN[None, :, None], np.ones((1, 36), bool), None, None, None
        )
        is None
    )
