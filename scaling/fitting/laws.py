"""Scaling laws as data: a name, parameter names, and a prediction in log space.

A `Law` says how the loss L depends on one or more positive inputs (N
parameters, D tokens, S steps, T token position, ...).  The fitter
(`scaling.fitting.fit`) needs three things from it:

- `predict_log(params, log_x) -> log L`: a pure `jax.numpy` function.  `params`
  maps every parameter name to its value in natural units (scalars, or arrays
  that broadcast against `log_x[..., 0]`); `log_x` is the natural log of the
  inputs, shape `[..., n_inputs]`; the result has shape `log_x.shape[:-1]`.
  Laws work in log space because the fit's residuals are log L_observed minus
  log L_predicted, and because sums of power laws are cheap and stable there
  (one `exp` per term, one `log`).
- `positive`: the parameters that must stay > 0; the fitter searches their
  logarithm, so they can never cross zero.
- `init_grid`: starting values for every parameter *in the fitted space* (the
  log for names in `positive`, the value itself otherwise); the fitter starts
  from every point of the Cartesian product and keeps the best.

Registering a law of your own takes a few lines::

    import jax.numpy as jnp
    from scaling.fitting.laws import Law, register

    register(Law(
        name="offset_power",
        param_names=("E", "x_c", "alpha"),
        n_inputs=1,
        # L = E + (x_c / x)^alpha
        predict_log=lambda p, log_x: jnp.log(
            p["E"] + jnp.exp(p["alpha"] * (jnp.log(p["x_c"]) - log_x[..., 0]))),
        positive=("E", "x_c"),
        init_grid={"E": (-1.0, 0.0, 1.0), "x_c": (0.0, 10.0, 20.0), "alpha": (0.1, 0.5)},
        formula="L = E + (x_c / x)^alpha",
    ))

after which `fit("offset_power", x, y)` and `get_law("offset_power")` know it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from scaling.errors import UserError


# eq=False: laws compare and hash by identity, so a Law can be a static
# argument of a jitted function although it holds a dict and a callable.
@dataclass(frozen=True, eq=False)
class Law:
    """One scaling law; see the module docstring for what each field promises."""

    name: str
    param_names: tuple[str, ...]
    n_inputs: int
    predict_log: Callable
    positive: frozenset[str]
    init_grid: Mapping[str, tuple[float, ...]]
    formula: str
    # Quantities computed from the fitted parameters (natural units, numpy
    # arrays in, arrays out); the fitter reports them with bootstrap intervals.
    derived: Callable[[dict], dict] | None = field(default=None)
    # For laws that are linear in some coefficients once the other parameters
    # (the exponents) are fixed: (coefficient names, basis(params, log_x) ->
    # [..., n_coefficients]), with L = basis @ coefficients.  Enables
    # variable projection (`scaling.fitting.varpro`).
    linear: tuple[tuple[str, ...], Callable] | None = field(default=None)
    # The parameters for inputs x from those fitted to x / exp(log_s) (log_s [n_inputs]),
    # numpy in and out. With it the fitter rescales inputs far from 1 (1e36 FLOPs, say),
    # where the init grid cannot reach the scale of A or x_c, to near 1 and back.
    rescale: Callable[[dict, np.ndarray], dict] | None = field(default=None)

    def __post_init__(self):
        names = tuple(self.param_names)
        if len(set(names)) != len(names) or not names:
            raise UserError(
                f"law {self.name!r}: param_names {names} must be distinct and non-empty"
            )
        positive = frozenset(self.positive)
        if not positive <= set(names):
            raise UserError(
                f"law {self.name!r}: positive names {sorted(positive - set(names))} "
                f"are not parameters; use names from {names}"
            )
        grid = {k: tuple(float(v) for v in np.atleast_1d(vs)) for k, vs in self.init_grid.items()}
        if set(grid) != set(names) or not all(grid.values()):
            raise UserError(
                f"law {self.name!r}: init_grid needs a non-empty tuple for each of "
                f"{names}, got keys {sorted(grid)}"
            )
        if int(self.n_inputs) < 1:
            raise UserError(f"law {self.name!r}: n_inputs must be at least 1")
        object.__setattr__(self, "param_names", names)
        object.__setattr__(self, "positive", positive)
        object.__setattr__(self, "init_grid", {k: grid[k] for k in names})
        object.__setattr__(self, "n_inputs", int(self.n_inputs))

    def predict(self, params: Mapping, x) -> jnp.ndarray:
        """L at inputs x ([..., n_inputs], or any shape for one-input laws), natural units."""
        x = jnp.asarray(x)
        if self.n_inputs == 1 and (x.ndim == 0 or x.shape[-1] != 1):
            x = x[..., None]
        return jnp.exp(self.predict_log(dict(params), jnp.log(x)))

    def grid_points(
        self,
        names: tuple[str, ...] | None = None,
        grid: Mapping[str, tuple[float, ...]] | None = None,
    ) -> np.ndarray:
        """Cartesian product of the init grid over `names`: [n_starts, len(names)], fitted space."""
        names = self.param_names if names is None else names
        grid = self.init_grid if grid is None else grid
        return np.array(list(itertools.product(*(grid[k] for k in names))), float).reshape(
            -1, len(names)
        )


LAWS: dict[str, Law] = {}


def register(law: Law, *, replace: bool = False) -> Law:
    """Add `law` to `LAWS` under its name (a taken name needs replace=True)."""
    if law.name in LAWS and not replace:
        raise UserError(
            f"a law named {law.name!r} is already registered; pick another name "
            "or pass replace=True"
        )
    LAWS[law.name] = law
    return law


def get_law(name: str | Law) -> Law:
    """The registered law called `name` (a Law passes through)."""
    if isinstance(name, Law):
        return name
    try:
        return LAWS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown law {name!r}; known laws: {', '.join(sorted(LAWS))}") from None


def _power(p, log_x):
    return p["alpha"] * (jnp.log(p["x_c"]) - log_x[..., 0])


def _saturating(p, log_x):
    return jnp.log(p["E"] + jnp.exp(jnp.log(p["A"]) - p["alpha"] * log_x[..., 0]))


def _kaplan_nd(p, log_x):
    n_term = jnp.exp(p["alpha_N"] / p["alpha_D"] * (jnp.log(p["N_c"]) - log_x[..., 0]))
    d_term = jnp.exp(jnp.log(p["D_c"]) - log_x[..., 1])
    return p["alpha_D"] * jnp.log(n_term + d_term)


def _kaplan_ns(p, log_x):
    n_term = jnp.exp(p["alpha_N"] * (jnp.log(p["N_c"]) - log_x[..., 0]))
    s_term = jnp.exp(p["alpha_S"] * (jnp.log(p["S_c"]) - log_x[..., 1]))
    return jnp.log(n_term + s_term)


def _b_crit(p, log_x):
    return jnp.log(p["B_star"]) - log_x[..., 0] / p["alpha_B"]


def _chinchilla(p, log_x):
    # log(E + A N^-alpha + B D^-beta) = logsumexp(e, a - alpha log N, b - beta log D)
    # as in Hoffmann et al. and Epoch's replication.  Summing the exponentials
    # directly (no max shift) costs a third of jnp.logaddexp and is exact here:
    # an exponent above ~709 overflows to inf, and the optimiser rejects
    # non-finite trial points, so the fit never uses such a value.
    n_term = jnp.exp(jnp.log(p["A"]) - p["alpha"] * log_x[..., 0])
    d_term = jnp.exp(jnp.log(p["B"]) - p["beta"] * log_x[..., 1])
    return jnp.log(p["E"] + n_term + d_term)


def _scaled(p: dict, **factors) -> dict:
    """`p` with each named parameter multiplied by its factor."""
    return {k: np.asarray(v, float) * factors.get(k, 1.0) for k, v in p.items()}


def _rescale_power(p, log_s):
    return _scaled(p, x_c=np.exp(log_s[0]))


def _rescale_saturating(p, log_s):
    return _scaled(p, A=np.exp(np.asarray(p["alpha"]) * log_s[0]))


def _rescale_kaplan_nd(p, log_s):
    return _scaled(p, N_c=np.exp(log_s[0]), D_c=np.exp(log_s[1]))


def _rescale_kaplan_ns(p, log_s):
    return _scaled(p, N_c=np.exp(log_s[0]), S_c=np.exp(log_s[1]))


def _rescale_chinchilla(p, log_s):
    return _scaled(
        p,
        A=np.exp(np.asarray(p["alpha"]) * log_s[0]),
        B=np.exp(np.asarray(p["beta"]) * log_s[1]),
    )


def _rescale_b_crit(p, log_s):
    return _scaled(p, B_star=np.exp(log_s[0] / np.asarray(p["alpha_B"])))


def _saturating_basis(p, log_x):
    return jnp.stack([jnp.ones_like(log_x[..., 0]), jnp.exp(-p["alpha"] * log_x[..., 0])], -1)


def _chinchilla_basis(p, log_x):
    return jnp.stack(
        [
            jnp.ones_like(log_x[..., 0]),
            jnp.exp(-p["alpha"] * log_x[..., 0]),
            jnp.exp(-p["beta"] * log_x[..., 1]),
        ],
        -1,
    )


def _chinchilla_derived(p):
    alpha, beta = np.asarray(p["alpha"]), np.asarray(p["beta"])
    return {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}


def chinchilla_optimum(params: Mapping, compute) -> tuple[np.ndarray, np.ndarray]:
    """Chinchilla's compute-optimal (N_opt, D_opt) for compute C in FLOP, with C = 6 N D.

    N_opt = G (C/6)^a and D_opt = G^-1 (C/6)^b, where G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta), b = alpha/(alpha+beta).  Parameters may be arrays (one per
    curve); they broadcast against `compute`.
    """
    A, B = np.asarray(params["A"], float), np.asarray(params["B"], float)
    alpha, beta = np.asarray(params["alpha"], float), np.asarray(params["beta"], float)
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    half = np.asarray(compute, float) / 6.0
    return g * half ** (beta / (alpha + beta)), half ** (alpha / (alpha + beta)) / g


POWER = register(
    Law(
        name="power",
        param_names=("x_c", "alpha"),
        n_inputs=1,
        predict_log=_power,
        positive=("x_c",),
        init_grid={"x_c": (0.0, 10.0, 20.0, 30.0, 40.0), "alpha": (0.05, 0.2, 0.5, 1.0)},
        formula="L = (x_c / x)^alpha",
        rescale=_rescale_power,
    )
)
SATURATING = register(
    Law(
        name="saturating",
        param_names=("E", "A", "alpha"),
        n_inputs=1,
        predict_log=_saturating,
        positive=("E", "A"),
        init_grid={"E": (-1.0, 0.5, 2.0), "A": (0.0, 4.0, 8.0), "alpha": (0.2, 0.6, 1.2)},
        formula="L = E + A x^-alpha",
        linear=(("E", "A"), _saturating_basis),
        rescale=_rescale_saturating,
    )
)
KAPLAN_ND = register(
    Law(
        name="kaplan_nd",
        param_names=("N_c", "alpha_N", "D_c", "alpha_D"),
        n_inputs=2,
        predict_log=_kaplan_nd,
        positive=("N_c", "D_c"),
        init_grid={
            "N_c": (10.0, 20.0, 30.0, 40.0),
            "alpha_N": (0.05, 0.2, 0.5),
            "D_c": (10.0, 20.0, 30.0, 40.0),
            "alpha_D": (0.05, 0.2, 0.5),
        },
        formula="L = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D",
        rescale=_rescale_kaplan_nd,
    )
)
KAPLAN_NS = register(
    Law(
        name="kaplan_ns",
        param_names=("N_c", "alpha_N", "S_c", "alpha_S"),
        n_inputs=2,
        predict_log=_kaplan_ns,
        positive=("N_c", "S_c"),
        init_grid={
            "N_c": (10.0, 20.0, 30.0, 40.0),
            "alpha_N": (0.05, 0.2, 0.5),
            "S_c": (0.0, 5.0, 10.0, 15.0),
            "alpha_S": (0.1, 0.5, 1.0),
        },
        formula="L = (N_c / N)^alpha_N + (S_c / S)^alpha_S",
        rescale=_rescale_kaplan_ns,
    )
)
# The grid of Hoffmann et al. (2022) as Epoch's replication runs it: 4,500 starts.
CHINCHILLA = register(
    Law(
        name="chinchilla",
        param_names=("E", "A", "B", "alpha", "beta"),
        n_inputs=2,
        predict_log=_chinchilla,
        positive=("E", "A", "B"),
        init_grid={
            "E": (-1.0, -0.5, 0.0, 0.5, 1.0),
            "A": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            "B": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
            "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
        },
        formula="L = E + A / N^alpha + B / D^beta",
        derived=_chinchilla_derived,
        linear=(("E", "A", "B"), _chinchilla_basis),
        rescale=_rescale_chinchilla,
    )
)
# Kaplan et al. 2020, section 5.1: the critical batch size (tokens) as a
# function of the loss, fitted to (loss, gradient noise scale) points; the
# paper finds B* ~ 2e8 tokens and alpha_B ~ 0.21 (loss in nats).
B_CRIT = register(
    Law(
        name="b_crit",
        param_names=("B_star", "alpha_B"),
        n_inputs=1,
        predict_log=_b_crit,
        positive=("B_star", "alpha_B"),
        init_grid={"B_star": (0.0, 5.0, 10.0, 15.0, 20.0), "alpha_B": (-3.0, -1.5, 0.0, 1.0)},
        formula="B_crit = B_star / L^(1 / alpha_B)",
        rescale=_rescale_b_crit,
    )
)
