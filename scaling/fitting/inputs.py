"""Checks and normalises what `scaling.fitting.fit.fit` is given; every mistake is a UserError.

Each message names the problem, the curve (and point) where there is one,
and the fix.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from scaling.errors import UserError
from scaling.fitting.laws import Law

OBJECTIVES = ("huber", "lsq")


def as_curves(law: Law, x, y, mask):
    """Normalise to x [C, n, n_inputs], y [C, n], mask [C, n] bool; check the valid points."""
    y, x = _numbers("y", y), _numbers("x", x)
    if y.ndim not in (1, 2) or y.size == 0:
        raise UserError(f"y has shape {y.shape}; give [n_points] or [n_curves, n_points]")
    given_shape = y.shape
    y = y.reshape(-1, y.shape[-1])
    n_curves, n_points = y.shape
    k = law.n_inputs
    if x.ndim == 1 and k == 1 and x.shape == (n_points,):
        x = x[None, :, None]
    elif x.ndim == 2 and k == 1 and x.shape == (n_curves, n_points):
        x = x[..., None]
    elif x.ndim == 2 and x.shape == (n_points, k):
        x = x[None]
    elif x.ndim == 3 and x.shape[:2] == (n_curves, n_points):
        if x.shape[2] != k:
            raise UserError(
                f"x has {x.shape[2]} input columns but law {law.name!r} "
                f"({law.formula}) takes {k}; pass one column per input"
            )
    elif x.ndim >= 2 and x.shape[-1] != k and x.shape[-2] == n_points:
        raise UserError(
            f"x has {x.shape[-1]} input columns but law {law.name!r} "
            f"({law.formula}) takes {k}; pass one column per input"
        )
    else:
        raise UserError(
            f"x has shape {x.shape} but y has shape {y.shape}; give x as "
            f"[n_curves, n_points, n_inputs] = [{n_curves}, {n_points}, {k}]"
        )
    x = np.broadcast_to(x, (n_curves, n_points, k))

    if mask is None:
        mask = np.ones(y.shape, bool)
    else:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape not in (given_shape, y.shape):
            raise UserError(
                f"mask must be booleans shaped like y {given_shape}, got {mask.dtype} {mask.shape}"
            )
        mask = mask.reshape(y.shape)
    for name, values in (("x", x), ("y", y[..., None])):
        bad = mask[..., None] & ~(np.isfinite(values) & (values > 0))
        if bad.any():
            c, p, j = (int(i) for i in np.argwhere(bad)[0])
            column = f" (input {j})" if values.shape[-1] > 1 else ""
            raise UserError(
                f"curve {c}, point {p}: {name}{column} = {values[c, p, j]} is not a "
                f"positive finite number; fix it or mask it out (mask[{c}, {p}] = "
                "False)"
            )
    # Padding takes the values of the curve's first valid point, so it stays
    # finite through every law (its weight is zero either way).
    first = np.argmax(mask, axis=1)
    rows = np.arange(n_curves)
    x = np.where(mask[..., None], x, x[rows, first][:, None])
    y = np.where(mask, y, y[rows, first][:, None])
    return x, y, mask


def _numbers(name, values) -> np.ndarray:
    try:
        return np.asarray(values, float)
    except (TypeError, ValueError):
        raise UserError(
            f"{name} must be an array of numbers, got {type(values).__name__}; convert it first"
        ) from None


# Every resample is a fit held in memory at once: beyond this the fitter asks
# for more memory than a workstation has, and the intervals gain nothing.
MAX_BOOTSTRAP = 100_000


def check_settings(objective, delta, bootstrap, max_iter, tol, confidence, keep_starts):
    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not (math.isfinite(delta) and delta > 0):
        raise UserError(f"delta = {delta} must be a positive number (Chinchilla uses 1e-3)")
    if int(bootstrap) != bootstrap or not 0 <= bootstrap <= MAX_BOOTSTRAP:
        raise UserError(
            f"bootstrap = {bootstrap} must be a whole number from 0 to "
            f"{MAX_BOOTSTRAP:,} (1000 gives 95% intervals to about 1%)"
        )
    if int(max_iter) != max_iter or max_iter < 1:
        raise UserError(f"max_iter = {max_iter} must be a whole number >= 1")
    if not (math.isfinite(tol) and tol >= 0):
        raise UserError(f"tol = {tol} must be a number >= 0")
    if keep_starts is not None and (int(keep_starts) != keep_starts or keep_starts < 1):
        raise UserError(
            f"keep_starts = {keep_starts} must be a whole number >= 1, or None to "
            "run every start to the end"
        )
    if not 0 < confidence < 1:
        raise UserError(f"confidence = {confidence} must lie strictly between 0 and 1, e.g. 0.95")


def check_fixed(law: Law, fixed, n_curves) -> dict[str, np.ndarray]:
    values = {}
    for name, value in (fixed or {}).items():
        if name not in law.param_names:
            raise UserError(
                f"fixed parameter {name!r} is not one of law {law.name!r}'s "
                f"parameters {law.param_names}"
            )
        v = np.asarray(value, float)
        if v.ndim > 1 or v.size not in (1, n_curves):
            raise UserError(
                f"fixed {name} must be one number or one per curve ({n_curves}), "
                f"got shape {v.shape}"
            )
        v = np.broadcast_to(v.reshape(-1), (n_curves,))
        ok = np.isfinite(v) & ((v > 0) if name in law.positive else True)
        if not ok.all():
            c = int(np.flatnonzero(~ok)[0])
            raise UserError(
                f"curve {c}: fixed {name} = {v[c]} must be finite"
                + (" and positive" if name in law.positive else "")
            )
        values[name] = v.copy()
    if len(values) == len(law.param_names):
        raise UserError(f"every parameter of law {law.name!r} is fixed; leave one free to fit")
    return values


def merged_grid(law: Law, init_grid) -> dict[str, tuple[float, ...]]:
    grid = dict(law.init_grid)
    for name, values in (init_grid or {}).items():
        if name not in law.param_names:
            raise UserError(
                f"init_grid names {name!r}, not a parameter of law {law.name!r} {law.param_names}"
            )
        values = tuple(float(v) for v in np.atleast_1d(values))
        if not values or not all(math.isfinite(v) for v in values):
            raise UserError(
                f"init_grid[{name!r}] must hold finite starting values (log for "
                "positive parameters)"
            )
        grid[name] = values
    return grid


# Bootstrap resamples of a curve start from its full-data best and from up to
# this many - 1 other local minima (scaling.fitting.fit.NEAR_TIE).
BOOTSTRAP_STARTS = 4
# Bytes the fitter holds per task (a start of a curve, or of a resample) per float64 of its
# state: the point, gradient, inverse-Hessian estimate and flags of each phase, and XLA's
# buffers around them. Measured peaks on CPU ran at 2.7-3.5 times the bare state.
STATE_COPIES = 4


def fit_memory(n_tasks: int, n_free: int, n_values: int) -> int:
    """Bytes a fit of `n_tasks` tasks with `n_free` free parameters, over `n_values`
    data values (x and y of every curve), holds at once."""
    per_task = (n_free * n_free + 2 * n_free + 4) * 8 * STATE_COPIES
    return n_tasks * per_task + n_values * 8 * STATE_COPIES


def available_memory() -> int | None:
    """Bytes one process may use: host RAM on a CPU, else one device's limit (None: unknown).
    The fitter runs on one device; launch/preflight.py scales it to a run's devices."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_memory(
    n_curves: int, n_starts: int, bootstrap: int, n_free: int, n_values: int, residuals=False
):
    """UserError, before anything is allocated, when the fit's state cannot fit in memory.
    With `residuals`, the bootstrap's resamples are refitted as curves of their own
    (resample="residuals"): n_curves x bootstrap curves, each from every start."""
    curves = n_curves * bootstrap if residuals else n_curves
    from_bootstrap = 0 if residuals else bootstrap * n_curves * BOOTSTRAP_STARTS
    n_tasks = max(curves * n_starts, from_bootstrap)
    values = n_values * (bootstrap if residuals else 1)
    need, have = fit_memory(n_tasks, n_free, values), available_memory()
    if have is None or need <= have:
        return
    fix = (
        "use fewer --bootstrap resamples (1000 gives 95% intervals to about 1%)"
        if residuals or from_bootstrap >= curves * n_starts
        else "fit fewer curves at once, or use keep_starts / fewer starts"
    )
    raise UserError(
        f"this fit needs about {need / 2**30:.1f} GiB ({n_tasks:,} starts of {n_curves:,} "
        f"curve(s), {bootstrap:,} resamples each) and the machine has {have / 2**30:.1f} GiB; "
        + fix
    )
