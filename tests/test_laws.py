"""Laws as data: the registry, predictions against closed forms, derived answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from scaling.errors import UserError
from scaling.fitting.fit import fit
from scaling.fitting.laws import LAWS, Law, chinchilla_optimum, get_law, register

RNG = np.random.default_rng(0)


def closed_form(name, p, x):
    """The published formulas, written out in NumPy."""
    if name == "power":
        return (p["x_c"] / x[:, 0]) ** p["alpha"]
    if name == "saturating":
        return p["E"] + p["A"] * x[:, 0] ** -p["alpha"]
    if name == "kaplan_nd":
        n, d = x[:, 0], x[:, 1]
        return ((p["N_c"] / n) ** (p["alpha_N"] / p["alpha_D"]) + p["D_c"] / d) ** p["alpha_D"]
    if name == "kaplan_ns":
        return (p["N_c"] / x[:, 0]) ** p["alpha_N"] + (p["S_c"] / x[:, 1]) ** p["alpha_S"]
    if name == "chinchilla":
        return p["E"] + p["A"] / x[:, 0] ** p["alpha"] + p["B"] / x[:, 1] ** p["beta"]
    raise AssertionError(name)


PUBLISHED = {
    # Kaplan et al. 2020 (Eq. 1.1, 1.5, 1.6) and Hoffmann et al. 2022.
    "power": {"x_c": 8.8e13, "alpha": 0.076},
    "saturating": {"E": 1.7, "A": 4.0, "alpha": 0.5},
    "kaplan_nd": {"N_c": 6.4e13, "alpha_N": 0.076, "D_c": 1.8e13, "alpha_D": 0.103},
    "kaplan_ns": {"N_c": 6.5e13, "alpha_N": 0.077, "S_c": 2.1e3, "alpha_S": 0.76},
    "chinchilla": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
}


def test_the_five_laws_are_registered_with_their_parameter_names():
    assert {k: LAWS[k].param_names for k in PUBLISHED} == {
        "power": ("x_c", "alpha"),
        "saturating": ("E", "A", "alpha"),
        "kaplan_nd": ("N_c", "alpha_N", "D_c", "alpha_D"),
        "kaplan_ns": ("N_c", "alpha_N", "S_c", "alpha_S"),
        "chinchilla": ("E", "A", "B", "alpha", "beta"),
    }


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_predict_matches_the_published_formula(name):
    law = get_law(name)
    x = np.exp(RNG.uniform(np.log(1e2), np.log(1e12), (50, law.n_inputs)))
    expected = closed_form(name, PUBLISHED[name], x)
    got = np.asarray(law.predict(PUBLISHED[name], jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_one_input_laws_take_x_of_any_shape():
    law = get_law("saturating")
    x = np.array([[1.0, 10.0], [100.0, 1000.0]])
    expected = closed_form("saturating", PUBLISHED["saturating"], x.reshape(-1, 1))
    np.testing.assert_allclose(
        np.asarray(law.predict(PUBLISHED["saturating"], x)).ravel(), expected, rtol=1e-6
    )


def test_chinchilla_grid_is_epochs_4500_starts():
    law = get_law("chinchilla")
    grid = law.grid_points()
    assert grid.shape == (4500, 5)
    assert law.init_grid["alpha"] == law.init_grid["beta"] == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert law.init_grid["E"] == (-1.0, -0.5, 0.0, 0.5, 1.0)
    assert law.init_grid["A"] == law.init_grid["B"] == (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    assert law.positive == {"E", "A", "B"}


def test_unknown_law_names_the_known_ones():
    with pytest.raises(UserError, match="unknown law 'chinchila'.*chinchilla.*kaplan_nd"):
        get_law("chinchila")


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(UserError, match="already registered"):
        register(LAWS["power"])
    assert register(LAWS["power"], replace=True) is LAWS["power"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"positive": ("nope",)}, "positive names"),
        ({"init_grid": {"x_c": (1.0,)}}, "init_grid needs"),
        ({"param_names": ("x_c", "x_c")}, "distinct"),
    ],
)
def test_malformed_laws_are_refused(bad, message):
    fields = dict(
        name="broken",
        param_names=("x_c", "alpha"),
        n_inputs=1,
        predict_log=lambda p, log_x: log_x[..., 0],
        positive=("x_c",),
        init_grid={"x_c": (1.0,), "alpha": (0.1,)},
        formula="-",
    )
    with pytest.raises(UserError, match=message):
        Law(**{**fields, **bad})


def test_compute_optimal_spends_all_compute_at_the_loss_minimum():
    p = PUBLISHED["chinchilla"]
    compute = np.array([1e18, 1e21, 1e24])
    n_opt, d_opt = chinchilla_optimum(p, compute)
    np.testing.assert_allclose(6 * n_opt * d_opt, compute, rtol=1e-12)
    # N_opt ~ C^a with a = beta / (alpha + beta).
    slope = np.diff(np.log(n_opt)) / np.diff(np.log(compute))
    np.testing.assert_allclose(slope, p["beta"] / (p["alpha"] + p["beta"]), rtol=1e-12)

    # Along C = 6 N D, moving N either way from N_opt raises the loss.
    def loss_at(n):
        return closed_form("chinchilla", p, np.stack([n, compute / (6 * n)], axis=1))

    assert np.all(loss_at(0.97 * n_opt) > loss_at(n_opt))
    assert np.all(loss_at(1.03 * n_opt) > loss_at(n_opt))
    law = get_law("chinchilla")
    assert law.derived(p) == pytest.approx({"a": 0.28 / 0.62, "b": 0.34 / 0.62})


def test_a_law_registered_in_a_few_lines_fits():
    law = register(
        Law(
            name="offset_power",
            param_names=("E", "x_c", "alpha"),
            n_inputs=1,
            predict_log=lambda p, log_x: jnp.log(
                p["E"] + jnp.exp(p["alpha"] * (jnp.log(p["x_c"]) - log_x[..., 0]))
            ),
            positive=("E", "x_c"),
            init_grid={"E": (-1.0, 0.0, 1.0), "x_c": (0.0, 10.0, 20.0), "alpha": (0.1, 0.5)},
            formula="L = E + (x_c / x)^alpha",
        ),
        replace=True,
    )
    x = np.logspace(3, 8, 40)
    truth = {"E": 2.0, "x_c": 1e5, "alpha": 0.3}
    y = (truth["E"] + (truth["x_c"] / x) ** truth["alpha"]) * np.exp(RNG.normal(0, 1e-3, 40))
    assert get_law("offset_power") is law
    result = fit("offset_power", x, y)
    assert result.converged[0]
    assert result.params["E"][0] == pytest.approx(2.0, rel=0.01)
    assert result.params["alpha"][0] == pytest.approx(0.3, rel=0.03)
    assert np.log(result.params["x_c"][0]) == pytest.approx(np.log(1e5), abs=0.2)
