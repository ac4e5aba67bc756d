"""Variable projection: NNLS against SciPy, and the same optimum as the full fit."""

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

from scaling.errors import UserError
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law
from scaling.fitting.varpro import nnls


@pytest.mark.parametrize("seed", range(6))
def test_nnls_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(20, 3)) * np.array([1.0, 1e-3, 1e2])  # badly scaled columns
    b = rng.normal(size=20) + (seed % 2) * a @ np.array([1.0, 500.0, 0.01])
    ours = np.asarray(nnls(a, b))
    theirs, _ = scipy_nnls(a, b)
    assert (ours >= 0).all()
    np.testing.assert_allclose(
        np.sum((a @ ours - b) ** 2), np.sum((a @ theirs - b) ** 2), rtol=1e-9
    )


@pytest.mark.slow  # both fitters on three curves
def test_varpro_and_full_fit_agree_on_saturating_curves():
    law = get_law("saturating")
    x = np.logspace(0, 4, 30)
    truths = [(1.7, 4.0, 0.5), (0.5, 10.0, 0.3), (2.5, 1.0, 1.1)]
    rng = np.random.default_rng(4)
    y = np.stack(
        [
            np.asarray(law.predict({"E": e, "A": a, "alpha": al}, x))
            * np.exp(rng.normal(0, 3e-3, len(x)))
            for e, a, al in truths
        ]
    )
    full, projected = fit(law, x, y), fit(law, x, y, varpro=True)
    assert projected.converged.all() and projected.varpro["n_starts"] == 3
    np.testing.assert_array_less(projected.objective, full.objective * (1 + 1e-7))
    for k in law.param_names:
        np.testing.assert_allclose(projected.params[k], full.params[k], rtol=1e-5)


@pytest.mark.slow
def test_varpro_and_full_fit_agree_on_chinchilla_data():
    law = get_law("chinchilla")
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    x = np.stack([n.ravel(), d.ravel()], axis=1)
    truth = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    rng = np.random.default_rng(2)
    y = np.stack(
        [np.asarray(law.predict(truth, x)) * np.exp(rng.normal(0, 3e-3, len(x))) for _ in range(3)]
    )  # three noisy curves, fitted at once
    full = fit(law, x, y, keep_starts=32)
    projected = fit(law, x, y, varpro=True)
    assert projected.converged.all()
    np.testing.assert_array_less(projected.objective, full.objective * (1 + 1e-7))
    for k in truth:
        np.testing.assert_allclose(projected.params[k], full.params[k], rtol=1e-4)
    # The projected search itself: 25 exponent starts, nearly all converged, close already.
    assert projected.varpro["n_starts"] == 25
    assert (projected.varpro["n_starts_converged"] >= 20).all()
    assert (projected.varpro["objective"] < full.objective * 1.5).all()


@pytest.mark.slow  # bootstrap refits of both fitters
def test_varpro_with_a_pinned_coefficient_and_bootstrap():
    law = get_law("saturating")
    x = np.logspace(0, 4, 40)
    y = np.asarray(law.predict({"E": 1.7, "A": 4.0, "alpha": 0.5}, x))
    y = y * np.exp(np.random.default_rng(0).normal(0, 3e-3, len(x)))
    full = fit(law, x, y, fixed={"E": 1.7}, bootstrap=20)
    projected = fit(law, x, y, fixed={"E": 1.7}, bootstrap=20, varpro=True)
    assert projected.params["E"][0] == 1.7 and "E" not in projected.intervals
    np.testing.assert_allclose(projected.params["alpha"], full.params["alpha"], rtol=1e-6)
    np.testing.assert_allclose(projected.intervals["alpha"], full.intervals["alpha"], rtol=1e-3)


def test_varpro_refuses_laws_it_cannot_project():
    x = np.logspace(0, 4, 20)
    with pytest.raises(UserError, match="linear in its coefficients"):
        fit("power", x, 3 * x**-0.1, varpro=True)
    with pytest.raises(UserError, match="every exponent"):
        fit("saturating", x, 1 + 3 * x**-0.1, fixed={"alpha": 0.1}, varpro=True)
