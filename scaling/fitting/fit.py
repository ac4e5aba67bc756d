"""Fit a scaling law to a batch of curves, with bootstrap confidence intervals.

`fit(law, x, y, mask)` fits every curve of the batch independently, in one
jitted program whose answers are float64 (the search runs in float32):

- Objective (Hoffmann et al. 2022; Epoch's replication): the sum over a
  curve's valid points of Huber_delta(log y - log L_predicted), delta = 1e-3,
  or with objective="lsq" the sum of (log y - log L_predicted)^2 / 2.
- Search: BFGS (`scaling.fitting.minimize`) from every point of the law's init grid
  (or `init_grid`), batched over starts and curves, in float32.  Parameters
  in `law.positive` are searched as logarithms.  `keep_starts=k` screens the
  grid instead: a few evaluations per start, then only the k best of each
  curve run to the end.
- Polish: each curve's best few distinct minima of the search are refined
  in float64 to the gradient tolerance; the lowest objective wins.
- Bootstrap: each resample draws a curve's valid points with replacement
  (multinomial counts used as weights, so padding never enters), is refitted
  in the same program from the full-data best and its curvature estimate,
  and percentiles of the refits give the intervals.  With
  `resample="residuals"` each resample is instead the fitted curve plus the
  fit's own log residuals drawn with replacement, every x kept: the
  bootstrap for a fixed design such as the positions T = 1..n_ctx of a
  per-token curve, where drawing the points themselves leaves out T = 1 in
  37% of resamples and so asks what the fit would be without the points
  that determine it.

Inputs: `x` holds the law's inputs in natural units, [n_curves, n_points,
n_inputs]; for one-input laws also [n_points] or [n_curves, n_points], and
any law accepts [n_points, n_inputs] shared by all curves.  `y` is the loss,
[n_curves, n_points] or [n_points].  `mask` (bool, y's shape) marks valid
points, so ragged curves are padded; padded entries may hold anything.

The program runs under `jax.enable_x64`, so float64 is on only for the fit
and the rest of the process (a float32 trainer) is unaffected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scaling.errors import UserError
from scaling.fitting import varpro as vp
from scaling.fitting.inputs import (
    BOOTSTRAP_STARTS,
    as_curves,
    check_fixed,
    check_memory,
    check_settings,
    merged_grid,
)
from scaling.fitting.laws import Law, get_law
from scaling.fitting.minimize import Solution, minimize_tasks

# Bootstrap resamples of a curve start from its full-data best and from up to
# BOOTSTRAP_STARTS - 1 other local minima within NEAR_TIE of it (see `_distinct_minima`).
NEAR_TIE = 0.25
# With keep_starts, every start first gets this many objective evaluations:
# one round of the solver, so screened tasks leave their lanes together.
SCREEN_EVALS = 8
# The optimizer settings `fit` uses unless told otherwise (recorded in provenance).
OPTIMIZER_DEFAULTS = {"max_iter": 500, "tol": 1e-9, "keep_starts": None}
# What a bootstrap resample draws: the points (x and y together), or the
# residuals of the full-data fit on the same x.
RESAMPLES = ("cases", "residuals")


@dataclass(frozen=True)
class FitResult:
    """Per-curve answers; every array's first axis (after the resample axis) is the curve.

    `params` holds all parameters in natural units, pinned ones included.
    `intervals` holds [low, high] percentile-bootstrap intervals at
    `confidence` for the fitted (not pinned) parameters, and is empty when
    bootstrap=0 (an interval is absent rather than NaN, so JSON stays valid).
    `derived`/`derived_intervals`: the law's derived quantities (chinchilla:
    a = beta/(alpha+beta), b = alpha/(alpha+beta)), likewise.
    `converged`: the winning start met the gradient tolerance in float64.
    `n_starts_converged`: starts whose float32 search met its own tolerance
    (`tol`, but at least SEARCH_TOL, per valid point).
    """

    law: Law
    params: dict[str, np.ndarray]  # name -> [n_curves]
    intervals: dict[str, np.ndarray]  # name -> [n_curves, 2]
    objective: np.ndarray  # [n_curves]
    converged: np.ndarray  # [n_curves] bool
    n_points: np.ndarray  # [n_curves] valid points
    n_starts: int
    n_starts_converged: np.ndarray  # [n_curves] searched starts that met the search tolerance
    n_evaluations: int  # objective evaluations of the full-data fits, all curves and starts
    fixed: tuple[str, ...]
    confidence: float
    bootstrap_params: dict[str, np.ndarray]  # fitted name -> [n_resamples, n_curves]
    bootstrap_objective: np.ndarray  # [n_resamples, n_curves]; [0, n_curves] without bootstrap
    derived: dict[str, np.ndarray]  # name -> [n_curves]
    derived_intervals: dict[str, np.ndarray]  # name -> [n_curves, 2]
    # With varpro=True: the projected search's own answers before the polish
    # ("objective", "n_starts", "n_starts_converged", "n_evaluations"), per curve.
    varpro: dict | None = None

    @property
    def n_curves(self) -> int:
        return len(self.objective)

    def curve(self, i: int = 0) -> dict:
        """Curve i as plain JSON-ready Python values."""
        out = {
            "law": self.law.name,
            "params": {k: float(v[i]) for k, v in self.params.items()},
            "intervals": {k: [float(v[i, 0]), float(v[i, 1])] for k, v in self.intervals.items()},
            "objective": float(self.objective[i]),
            "converged": bool(self.converged[i]),
            "n_points": int(self.n_points[i]),
        }
        if self.law.derived is not None:
            out["derived"] = {k: float(v[i]) for k, v in self.derived.items()}
            out["derived_intervals"] = {
                k: [float(v[i, 0]), float(v[i, 1])] for k, v in self.derived_intervals.items()
            }
        return out


def fit(
    law: str | Law,
    x,
    y,
    mask=None,
    *,
    objective: str = "huber",
    delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    max_iter: int = 500,
    tol: float = 1e-9,
    init_grid: Mapping | None = None,
    fixed: Mapping | None = None,
    confidence: float = 0.95,
    keep_starts: int | None = None,
    varpro: bool = False,
    starts=None,
    resample: str = "cases",
) -> FitResult:
    """Fit `law` to each curve of (x, y) where `mask` is true; see the module docstring.

    objective: "huber" (with `delta`, on log residuals) or "lsq".
    bootstrap: number of resamples for the intervals (0: no intervals).
    max_iter: objective evaluations allowed per start (kept starts get this
        many again after screening, and so does each bootstrap refit).
    tol: a start has converged when the gradient norm of its objective is at
        most tol x (number of valid points): the objective is a sum over points.
    init_grid: name -> starting values in the fitted space (log for positive
        parameters), replacing the law's grid for those names.
    fixed: name -> value (scalar or one per curve), natural units: pinned, not fitted.
    keep_starts: None runs every start to the end, as the Chinchilla recipe
        does.  A number k screens instead: every start gets SCREEN_EVALS
        evaluations, then only each curve's k lowest continue (with their
        curvature estimates).  Much faster on big grids, and it finds the
        recipe's optimum whenever that start is among the k after screening.
    varpro: search only the exponents, with the coefficients by non-negative
        least squares inside the objective, then polish with a full fit
        (`scaling.fitting.varpro`; saturating and chinchilla).
    starts: fitted-space starting points per curve [n_curves, n_starts, n_free]
        (free parameters in law order), replacing the grid.
    resample: "cases" draws each curve's points with replacement; "residuals"
        keeps every x and draws the full-data fit's log residuals (a fixed
        design, such as the positions of a per-token curve).
    """
    law = get_law(law)
    x, y, mask = as_curves(law, x, y, mask)
    check_settings(objective, delta, bootstrap, max_iter, tol, confidence, keep_starts)
    if resample not in RESAMPLES:
        raise UserError(f"resample {resample!r} is not one of {', '.join(RESAMPLES)}")
    log_s = _input_scale(law, x, mask, fixed, init_grid, starts)
    if log_s is not None:
        scaled = fit(
            law,
            x / np.exp(log_s),
            y,
            mask,
            objective=objective,
            delta=delta,
            bootstrap=bootstrap,
            seed=seed,
            max_iter=max_iter,
            tol=tol,
            confidence=confidence,
            keep_starts=keep_starts,
            varpro=varpro,
            resample=resample,
        )
        return _unscaled(scaled, log_s)
    if resample == "residuals" and bootstrap:
        n_starts = len(law.grid_points(None, merged_grid(law, init_grid)))
        check_memory(len(y), n_starts, int(bootstrap), len(law.param_names), x.size + y.size, True)
        options = dict(
            objective=objective,
            delta=delta,
            max_iter=max_iter,
            tol=tol,
            init_grid=init_grid,
            fixed=fixed,
            confidence=confidence,
            keep_starts=keep_starts,
            varpro=varpro,
            starts=starts,
        )
        point = fit(law, x, y, mask, **options)
        return _residual_bootstrap(point, x, y, mask, bootstrap, seed, options)
    fixed_values = check_fixed(law, fixed, len(y))
    free = tuple(k for k in law.param_names if k not in fixed_values)
    n_points = mask.sum(axis=1)
    short = np.flatnonzero(n_points < len(free))
    if short.size:
        c = int(short[0])
        raise UserError(
            f"curve {c} has {n_points[c]} valid points but law {law.name!r} has "
            f"{len(free)} free parameters; give it more points, pin some with "
            "fixed=, or drop the curve"
        )
    if varpro:
        if keep_starts is not None:
            raise UserError(
                "keep_starts screens the start grid of a full fit; varpro searches "
                "only the exponents from every start: use one or the other"
            )
        return _fit_varpro(
            law,
            x,
            y,
            mask,
            fixed_values,
            objective=objective,
            delta=delta,
            bootstrap=bootstrap,
            seed=seed,
            max_iter=max_iter,
            tol=tol,
            init_grid=init_grid,
            confidence=confidence,
        )
    if starts is None:
        starts = law.grid_points(free, merged_grid(law, init_grid))
    starts = np.broadcast_to(
        np.asarray(starts, float).reshape(-1, *np.shape(starts)[-2:]),
        (len(y), np.shape(starts)[-2], len(free)),
    )
    check_memory(len(y), starts.shape[1], int(bootstrap), len(free), x.size + y.size)
    spec = _Spec(
        law,
        free,
        tuple(fixed_values),
        objective,
        int(max_iter),
        int(bootstrap),
        _chunk_size(y.shape[1]),
        int(keep_starts or 0),
        min(SCREEN_EVALS, max_iter),
        (),
    )
    fixed_array = (
        np.stack([fixed_values[k] for k in spec.fixed], axis=1)
        if fixed_values
        else np.zeros((len(y), 0))
    )
    with jax.enable_x64(True):
        out = _compiled_program()(
            spec,
            np.log(x),
            np.log(y),
            mask,
            fixed_array,
            starts,
            float(tol),
            float(delta),
            jax.random.key(seed),
        )
        out = jax.tree.map(np.asarray, out)
    return _result(spec, out, fixed_values, n_points, confidence, starts.shape[1])


# Inputs whose geometric mean lies beyond this factor of 1 are fitted rescaled to it.
# Every law's init grid and the float32 search are made for inputs from about 1 to 1e12
# (parameters, tokens, steps, positions); far outside, the scale of A or x_c is past the
# grid, and powers of the inputs overflow float32.
RESCALE_BEYOND = 1e12


def _input_scale(law: Law, x, mask, fixed, init_grid, starts) -> np.ndarray | None:
    """log_s [n_inputs] to divide the inputs by, or None to fit them as they are: inputs
    near 1, a law without `rescale`, or starting points or pinned values given in the
    inputs' own scale."""
    if law.rescale is None or fixed or init_grid or starts is not None:
        return None
    valid = np.log(x[mask])  # [n_valid, n_inputs]
    center = valid.mean(axis=0)
    if not (np.abs(center) > np.log(RESCALE_BEYOND)).any():
        return None
    return np.where(np.abs(center) > np.log(RESCALE_BEYOND), center, 0.0)


def _unscaled(result: FitResult, log_s: np.ndarray) -> FitResult:
    """`result` of a fit to x / exp(log_s), in the parameters of x (every one is free)."""
    law = result.law
    params = law.rescale(result.params, log_s)
    boot, intervals, derived_intervals = {}, result.intervals, result.derived_intervals
    if result.bootstrap_params:
        boot = law.rescale(result.bootstrap_params, log_s)
        intervals, derived_intervals = _percentile_intervals(
            law, boot, list(result.intervals), result.confidence
        )
    return dataclasses.replace(
        result,
        params=params,
        intervals=intervals,
        bootstrap_params=boot,
        derived=law.derived(params) if law.derived else {},
        derived_intervals=derived_intervals,
    )


def _fit_varpro(
    law,
    x,
    y,
    mask,
    fixed_values,
    *,
    objective,
    delta,
    bootstrap,
    seed,
    max_iter,
    tol,
    init_grid,
    confidence,
) -> FitResult:
    """Exponents by BFGS with projected coefficients, then a full-fit polish; see scaling.varpro."""
    projected = vp.check_law(law, fixed_values)
    free = tuple(k for k in law.param_names if k not in fixed_values and k not in projected)
    starts = law.grid_points(free, merged_grid(law, init_grid))
    check_memory(len(y), len(starts), int(bootstrap), len(law.param_names), x.size + y.size)
    spec = _Spec(
        law,
        free,
        tuple(fixed_values),
        objective,
        int(max_iter),
        0,
        _chunk_size(y.shape[1]),
        0,
        min(SCREEN_EVALS, max_iter),
        projected,
    )
    fixed_array = (
        np.stack([fixed_values[k] for k in spec.fixed], axis=1)
        if fixed_values
        else np.zeros((len(y), 0))
    )
    with jax.enable_x64(True):
        out = _compiled_program()(
            spec,
            np.log(x),
            np.log(y),
            mask,
            fixed_array,
            np.broadcast_to(starts, (len(y),) + starts.shape),
            float(tol),
            float(delta),
            jax.random.key(seed),
        )
        out = jax.tree.map(np.asarray, out)
        coef = jax.jit(jax.vmap(partial(_projected, spec)))(
            out["theta"], np.log(x), np.log(y), mask.astype(float), fixed_array
        )
        coef = {k: np.asarray(v) for k, v in coef.items()}
    stage = {
        "objective": out["objective"],
        "n_starts": len(starts),
        "n_starts_converged": out["n_starts_converged"].astype(int),
        "n_evaluations": int(out["evaluations"]),
    }
    # The polish: a full fit of every free parameter from the projected optimum.
    full_free = tuple(k for k in law.param_names if k not in fixed_values)
    exponents = _to_natural(spec, out["theta"], {})
    point = []
    for k in full_free:
        if k in projected:
            # A coefficient NNLS put at exactly 0 starts just above it (log space).
            point.append(np.log(np.maximum(coef[k], 1e-12 * y.max(axis=1))))
        else:
            point.append(exponents[k] if k not in law.positive else np.log(exponents[k]))
    polished = fit(
        law,
        x,
        y,
        mask,
        objective=objective,
        delta=delta,
        bootstrap=bootstrap,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        fixed=fixed_values or None,
        confidence=confidence,
        starts=np.stack(point, axis=-1)[:, None, :],
    )
    return dataclasses.replace(polished, varpro=stage)


def _projected(spec: _Spec, theta, log_x, log_y, weight, fixed) -> dict:
    """One curve's projected coefficients at exponents theta (natural units)."""
    params = _natural(spec, theta, fixed)
    return vp.coefficients(spec.law, params, spec.projected, log_x, log_y, weight)


class _Spec(NamedTuple):
    """What the compiled program depends on beyond array shapes."""

    law: Law
    free: tuple[str, ...]
    fixed: tuple[str, ...]
    objective: str
    max_iter: int
    n_boot: int
    chunk: int
    keep: int  # starts per curve that FINISH continues; 0: all of them, no screening
    screen: int  # evaluations per start before screening
    projected: tuple[str, ...]  # coefficients solved by NNLS inside the objective (varpro)


class _Data(NamedTuple):
    """One curve as a task sees it (leading axes added by batching)."""

    log_x: jnp.ndarray  # [n_points, n_inputs]
    log_y: jnp.ndarray  # [n_points]
    weight: jnp.ndarray  # [n_points] 0 for padding; multiplicities in a resample
    fixed: jnp.ndarray  # [n_fixed] pinned values, natural units


def _chunk_size(n_points: int) -> int:
    # About 2^17 point-evaluations per batched step: enough to amortise the
    # loop's fixed cost per step, few enough that finished tasks idle briefly
    # (bench/fit_bench.py compares the neighbours).
    return int(np.clip(2**17 // max(n_points, 1), 16, 1024))


def _natural(spec: _Spec, theta, fixed) -> dict:
    params = {}
    for name in spec.law.param_names:
        if name in spec.free:
            value = theta[..., spec.free.index(name)]
            params[name] = jnp.exp(value) if name in spec.law.positive else value
        elif name in spec.fixed:
            params[name] = fixed[..., spec.fixed.index(name)]
    return params


def _objective(spec: _Spec, delta, theta, data: _Data):
    params = _natural(spec, theta, data.fixed)
    if spec.projected:
        params.update(
            vp.coefficients(spec.law, params, spec.projected, data.log_x, data.log_y, data.weight)
        )
        log_pred = vp.predict_log(spec.law, params, data.log_x)
    else:
        log_pred = spec.law.predict_log(params, data.log_x)
    r = data.log_y - log_pred
    if spec.objective == "huber":
        # r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond, written with min()
        # rather than a select: XLA:CPU then computes the value in half the time.
        a = jnp.abs(r)
        clipped = jnp.minimum(a, delta)
        loss = clipped * (a - 0.5 * clipped)
    else:
        loss = 0.5 * r * r
    return jnp.sum(data.weight * loss)


# The phases of `_fit_program`: a float32 search, then a float64 refinement.
GRID, FINISH, POLISH, BOOT = 0, 1, 2, 3
SEARCH_DTYPE = jnp.float32
# The search's gradient tolerance per valid point never goes below this.
# The search only has to find the basins (the polish makes the answer
# accurate); a tighter one, near float32's rounding of a thousand-point sum,
# costs more evaluations for the same optima.
SEARCH_TOL = 1e-6
# Each curve's best search results (distinct local minima first) that the
# float64 refinement polishes to `tol`: more than one, so that two minima
# whose float32 objectives rank them wrongly are both refined, but only those
# within POLISH_TIE (relative) of the best, since a float32 sum of a thousand
# terms is good to ~1e-6 of itself: polishing clearly worse minima (often
# plateaus running off to infinity) would cost more than the whole search.
POLISH_STARTS = 4
POLISH_TIE = 1e-3


class _Program(NamedTuple):
    """What every phase of one `_fit_program` reads: the data, the starts and the sizes.

    Task t of a phase is member t % members[phase] of group t // members[phase]; a group
    is a curve, or in BOOT a resample of one (resample * n_curves + curve)."""

    spec: _Spec
    log_x: jax.Array
    log_y: jax.Array
    weight: jax.Array  # [n_curves, n_points], the mask as 0/1
    fixed: jax.Array
    starts: jax.Array  # [n_curves, n_starts, n_free]
    tol: jax.Array
    delta: jax.Array
    key: jax.Array
    valid_first: tuple  # `_valid_first(mask)`, for drawing resamples
    n_valid: jax.Array  # [n_curves]
    n_curves: int
    keep: int  # starts of each curve that continue past the screen
    search: list  # the float32 phases
    refine: list  # the float64 phases
    members: dict  # phase -> tasks per group
    groups: dict  # phase -> groups


class _Lanes(NamedTuple):
    """One solver's task lanes: every phase it runs is padded to n_tasks tasks."""

    dtype: jnp.dtype
    n_tasks: int
    task: jax.Array  # arange(n_tasks)
    eye: jax.Array  # [n_tasks, n_free, n_free]
    chunk: int  # tasks the solver runs side by side
    data: _Data  # every curve's data, in dtype

    def pad(self, a):
        a = a.astype(self.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jnp.concatenate([a, jnp.zeros((self.n_tasks - len(a),) + a.shape[1:], a.dtype)])


def _fit_program(spec: _Spec, log_x, log_y, mask, fixed, starts, tol, delta, key):
    """Search every curve from every start (GRID; with screening, only the best
    `spec.keep` starts of each continue, FINISH) in float32, polish each
    curve's best few minima in float64 (POLISH), then refit the resamples (BOOT).

    Why two precisions: an objective evaluation costs about a third in float32
    (XLA:CPU vectorises its exp and log twice as wide and faster), and the
    search only has to find the basins; the polish, warm-started from the
    search's point and curvature estimate, takes the few evaluations that make
    the answer float64-accurate.  Each precision runs one traced solver
    inside a fori_loop over its phases (tasks padded to the largest phase;
    padding is inactive and costs nothing), because each traced copy of the
    solver adds seconds of XLA compile time.
    """
    n_curves = log_y.shape[0]
    n_starts = starts.shape[1]  # starts: [n_curves, n_starts, n_free]
    keep = spec.keep if 0 < spec.keep < n_starts else n_starts
    weight = mask.astype(log_y.dtype)
    p = _Program(
        spec=spec,
        log_x=log_x,
        log_y=log_y,
        weight=weight,
        fixed=fixed,
        starts=starts,
        tol=tol,
        delta=delta,
        key=key,
        valid_first=_valid_first(mask),
        n_valid=weight.sum(axis=1),
        n_curves=n_curves,
        keep=keep,
        search=[GRID] + ([FINISH] if keep < n_starts else []),
        refine=[POLISH] + ([BOOT] if spec.n_boot else []),
        members={
            GRID: n_starts,
            FINISH: keep,
            POLISH: min(POLISH_STARTS, keep),
            BOOT: BOOTSTRAP_STARTS,
        },
        groups={GRID: n_curves, FINISH: n_curves, POLISH: n_curves, BOOT: spec.n_boot * n_curves},
    )
    # The projected objective (varpro) solves a small NNLS inside each
    # evaluation, which wants float64 throughout.
    search_dtype = log_y.dtype if spec.projected else SEARCH_DTYPE
    found = _run_phases(p, p.search, search_dtype, jnp.maximum(tol, SEARCH_TOL))
    found = {
        phase: jax.tree.map(
            lambda a: a.astype(log_y.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, sol
        )
        for phase, sol in found.items()
    }
    results = _run_phases(p, p.refine, log_y.dtype, tol, found)
    return _best_fits(p, results)


def _best_fits(p: _Program, results) -> dict:
    """Each curve's lowest polished minimum (and each resample's lowest refit)."""
    searched = _per_group(p, results[p.search[-1]], p.search[-1])
    fits = _per_group(p, results[POLISH], POLISH)
    rows, best = jnp.arange(p.n_curves), jnp.argmin(fits.f, axis=1)
    out = {
        "theta": fits.x[rows, best],
        "objective": fits.f[rows, best],
        "converged": fits.converged[rows, best],
        "n_starts_converged": searched.converged.sum(axis=1),
        "evaluations": sum(results[phase].evals.sum() for phase in p.search + [POLISH]),
    }
    n_boot = p.spec.n_boot
    if n_boot:
        refits = _per_group(p, results[BOOT], BOOT)
        pairs, best = jnp.arange(n_boot * p.n_curves), jnp.argmin(refits.f, axis=1)
        n_free = p.starts.shape[2]
        out["boot_theta"] = refits.x[pairs, best].reshape(n_boot, p.n_curves, n_free)
        out["boot_objective"] = refits.f[pairs, best].reshape(n_boot, p.n_curves)
    return out


def _per_group(p: _Program, sol: Solution, phase) -> Solution:
    """The phase's results as [groups, members, ...]."""
    size = p.groups[phase] * p.members[phase]
    return jax.tree.map(
        lambda a: a[:size].reshape(p.groups[phase], p.members[phase], *a.shape[1:]), sol
    )


def _best_of(p: _Program, sol: Solution, phase, k) -> Solution:
    """Each curve's k lowest-objective results of `phase`, flattened to tasks."""
    grid = _per_group(p, sol, phase)
    best = jnp.argsort(grid.f, axis=1)[:, :k]
    return jax.tree.map(
        lambda a: jnp.take_along_axis(
            a, best.reshape(best.shape + (1,) * (a.ndim - 2)), axis=1
        ).reshape(-1, *a.shape[2:]),
        grid,
    )


def _run_phases(p: _Program, phases, dtype, gtol_per_point, results=None) -> dict:
    """Run `phases` in order with one solver traced at `dtype`; returns phase -> Solution."""
    n_tasks = max(p.groups[phase] * p.members[phase] for phase in phases)
    n_free = p.starts.shape[2]
    # Lanes no wider than the smallest phase: a few kept starts of a screened grid on
    # lanes sized for the whole grid would pay for every lane every iteration, for
    # hundreds of iterations; a big phase loses little at the narrower width.
    smallest = min(p.groups[phase] * p.members[phase] for phase in phases)
    lanes = _Lanes(
        dtype,
        n_tasks,
        jnp.arange(n_tasks),
        jnp.broadcast_to(jnp.eye(n_free, dtype=dtype), (n_tasks, n_free, n_free)),
        min(p.spec.chunk, max(16, -(-smallest // 8) * 8)),
        _Data(*(a.astype(dtype) for a in (p.log_x, p.log_y, p.weight, p.fixed))),
    )
    empty = Solution(
        jnp.zeros((n_tasks, n_free), dtype),
        jnp.full(n_tasks, jnp.inf, dtype),
        jnp.zeros(n_tasks, bool),
        jnp.zeros(n_tasks, jnp.int32),
        lanes.eye,
        jnp.zeros(n_tasks, bool),
    )
    body = partial(_run_phase, p, tuple(phases), lanes, gtol_per_point)
    return jax.lax.fori_loop(
        0, len(phases), body, {**(results or {}), **{phase: empty for phase in phases}}
    )


def _run_phase(p: _Program, phases: tuple, lanes: _Lanes, gtol_per_point, i, results) -> dict:
    """Phase `phases[i]` (a traced index): its tasks from the results so far, solved."""
    spec, dtype, data = p.spec, lanes.dtype, lanes.data
    phase = jnp.asarray(phases)[i]
    branches = [partial(_TASKS[ph], p, lanes) for ph in phases]
    x0, h0, warm, active, max_evals = jax.lax.switch(i, branches, results)
    group = lanes.task // jnp.asarray([p.members[ph] for ph in phases])[i]
    curve = group % p.n_curves  # in BOOT, group is resample * n_curves + curve
    draw = jax.vmap(partial(_resample, p.key, *p.valid_first))

    def load(ids):
        w = data.weight[curve[ids]]
        if BOOT in phases:
            w = jax.lax.cond(phase == BOOT, lambda: draw(group[ids]).astype(dtype), lambda: w)
        return _Data(data.log_x[curve[ids]], data.log_y[curve[ids]], w, data.fixed[curve[ids]])

    gtol = (gtol_per_point * p.n_valid[curve]).astype(dtype)
    value_and_grad = jax.value_and_grad(partial(_objective, spec, p.delta))
    sol = minimize_tasks(
        value_and_grad, load, x0, gtol, active, h0, warm, max_evals=max_evals, chunk=lanes.chunk
    )
    return {
        **results,
        **{ph: jax.tree.map(partial(jnp.where, phase == ph), sol, results[ph]) for ph in phases},
    }


# Each phase's tasks from the results so far: (x0, h0, warm, active, max_evals).


def _grid_tasks(p: _Program, lanes: _Lanes, results):
    n_free = p.starts.shape[2]
    return (
        lanes.pad(p.starts.reshape(-1, n_free)),
        lanes.eye,
        jnp.zeros(lanes.n_tasks, bool),
        lanes.task < p.n_curves * p.starts.shape[1],
        p.spec.screen if FINISH in p.search else p.spec.max_iter,
    )


def _finish_tasks(p: _Program, lanes: _Lanes, results):
    # Continue each curve's `keep` best screened starts, curvature estimate and all.
    chosen = _best_of(p, results[GRID], GRID, p.keep)
    return (
        lanes.pad(chosen.x),
        lanes.pad(chosen.h),
        lanes.pad(chosen.scaled),
        lanes.pad(jnp.isfinite(chosen.f)),
        p.spec.max_iter,
    )


def _polish_tasks(p: _Program, lanes: _Lanes, results):
    found = _per_group(p, results[p.search[-1]], p.search[-1])
    x0, h0, warm, used = jax.vmap(
        partial(_distinct_minima, k=p.members[POLISH], near_tie=POLISH_TIE, converged_only=False)
    )(found.x, found.f, found.converged, found.h, found.scaled)
    flat = lambda a: lanes.pad(a.reshape(-1, *a.shape[2:]))  # noqa: E731
    return flat(x0), flat(h0), flat(warm), flat(used), p.spec.max_iter


def _boot_tasks(p: _Program, lanes: _Lanes, results):
    fits = _per_group(p, results[POLISH], POLISH)
    x0, h0, warm, used = jax.vmap(partial(_distinct_minima, k=BOOTSTRAP_STARTS, near_tie=NEAR_TIE))(
        fits.x, fits.f, fits.converged, fits.h, fits.scaled
    )

    def tile(a):
        reps = (p.spec.n_boot,) + (1,) * (a.ndim - 2)
        return lanes.pad(jnp.tile(a.reshape(-1, *a.shape[2:]), reps))

    return tile(x0), tile(h0), tile(warm), tile(used), p.spec.max_iter


_TASKS = {GRID: _grid_tasks, FINISH: _finish_tasks, POLISH: _polish_tasks, BOOT: _boot_tasks}


@cache
def _compiled_program():
    """`_fit_program` jitted for the default backend (decided on first use, not at import)."""
    options = {}
    if jax.default_backend() == "cpu":
        # XLA:CPU vectorises for 256-bit registers unless told otherwise; on a
        # CPU with AVX-512 the objective's exp/log loops then run at half
        # width.  A preference only: CPUs without AVX-512 ignore it.
        options["xla_cpu_prefer_vector_width"] = "512"
    return jax.jit(_fit_program, static_argnames=("spec",), compiler_options=options)


def _resample(key, valid_first, n_valid, pair_id):
    """Multiplicities [n_points] of resample pair_id // n_curves of curve pair_id % n_curves.

    Draws n_valid of the curve's valid points uniformly with replacement; a
    pure function of (key, pair_id), so the weights need no memory between
    rounds.  valid_first [n_curves, n_points]: each curve's point indices,
    valid ones first (`_valid_first`); n_valid [n_curves].
    """
    n_curves, n_points = valid_first.shape
    c = pair_id % n_curves
    picks = jax.random.randint(jax.random.fold_in(key, pair_id), (n_points,), 0, n_valid[c])
    counted = jnp.arange(n_points) < n_valid[c]
    return jnp.zeros(n_points).at[valid_first[c, picks]].add(counted)


def _valid_first(mask):
    return jnp.argsort(~mask, axis=1, stable=True), mask.sum(axis=1)


def bootstrap_weights(mask, n_resamples: int, seed: int = 0) -> np.ndarray:
    """The multiplicities `fit(..., bootstrap=n_resamples, seed=seed)` uses: [B, C, n_points]."""
    mask = np.asarray(mask, bool).reshape(-1, np.shape(mask)[-1])
    with jax.enable_x64(True):
        draw = jax.jit(jax.vmap(_resample, in_axes=(None, None, None, 0)))
        weights = draw(
            jax.random.key(seed), *_valid_first(mask), jnp.arange(n_resamples * mask.shape[0])
        )
        return np.asarray(weights).reshape(n_resamples, *mask.shape)


def _distinct_minima(x, f, converged, h, scaled, *, k, near_tie, converged_only=True):
    """Up to k distinct local minima of one curve, best first, from its runs
    [members, ...]: their points x [k, n_free], inverse-Hessian estimates
    [k, n_free, n_free], whether those are estimates [k], and which are used [k].

    Runs whose objectives are 1e-6 relative apart count as one minimum; only
    the best and (converged, with `converged_only`) minima within `near_tie`
    (relative) of it are kept.  The polish refines them (POLISH_TIE).
    Bootstrap refits start from them too (NEAR_TIE): a resample moves the
    optimum only a little, so its refit starts from the full-data best and its
    curvature rather than from the whole grid (the grid is there to find the
    basin, which is known by now), a few dozen evaluations per resample
    instead of the whole grid's worth.  A resample reweights points by
    ~1/sqrt(n), which can reorder local minima whose objectives are close, so
    near-tied minima refit too.
    """
    order = jnp.argsort(f)
    fs = f[order]
    distinct = jnp.concatenate([jnp.array([True]), fs[1:] > fs[:-1] * (1 + 1e-6) + 1e-300])
    best = jnp.arange(len(f)) == 0
    candidate = distinct & jnp.isfinite(fs) & (fs <= fs[0] * (1 + near_tie))
    if converged_only:
        candidate &= converged[order] | best
    (picked,) = jnp.nonzero(candidate, size=k, fill_value=len(f))
    used = picked < len(f)
    chosen = order[jnp.where(used, picked, 0)]
    return x[chosen], h[chosen], scaled[chosen], used


def _result(spec, out, fixed_values, n_points, confidence, n_starts) -> FitResult:
    law = spec.law
    params = _to_natural(spec, out["theta"], fixed_values)
    params = {k: params[k] for k in law.param_names}
    intervals, boot, derived, derived_intervals = {}, {}, {}, {}
    boot_objective = out.get("boot_objective", np.zeros((0, len(out["objective"]))))
    if law.derived is not None:
        derived = {k: np.asarray(v, float) for k, v in law.derived(params).items()}
    if spec.n_boot:
        samples = _to_natural(spec, out["boot_theta"], fixed_values)
        boot = {k: samples[k] for k in spec.free}
        intervals, derived_intervals = _percentile_intervals(law, samples, spec.free, confidence)
    return FitResult(
        law,
        params,
        intervals,
        out["objective"],
        out["converged"],
        n_points.astype(int),
        n_starts,
        out["n_starts_converged"].astype(int),
        int(out["evaluations"]),
        spec.fixed,
        confidence,
        boot,
        boot_objective,
        derived,
        derived_intervals,
    )


def _percentile_intervals(law: Law, samples: dict, free, confidence: float):
    """(intervals of the `free` parameters, intervals of the law's derived quantities), each
    [n_curves, 2], from bootstrap samples {name: [n_resamples, n_curves]} of every parameter."""
    tail = 100 * (1 - confidence) / 2

    def band(values):
        return np.nanpercentile(np.asarray(values, float), [tail, 100 - tail], axis=0).T

    intervals = {k: band(samples[k]) for k in free}
    derived = {k: band(v) for k, v in law.derived(samples).items()} if law.derived else {}
    return intervals, derived


def _residual_bootstrap(
    point: FitResult, x, y, mask, n_resamples: int, seed: int, options: dict
) -> FitResult:
    """`point` with intervals from refits of (fitted curve x resampled residual ratios).

    The resamples are ordinary curves to the fitter (n_resamples x n_curves of
    them, one batch), each drawing its curve's valid log residuals with
    replacement onto the same x; padding stays padding.
    """
    law, n_curves = point.law, len(y)
    # Each curve's parameters, against its points.
    columns = {k: np.asarray(v, float)[:, None] for k, v in point.params.items()}
    log_fitted = np.log(np.asarray(law.predict(columns, x), float))
    residual = np.where(mask, np.log(y) - log_fitted, 0.0)
    rng = np.random.default_rng(seed)
    order, n_valid = (np.asarray(a) for a in _valid_first(mask))
    picks = np.floor(
        rng.random((n_resamples, n_curves, y.shape[1])) * n_valid[None, :, None]
    ).astype(int)
    drawn = np.take_along_axis(
        residual[None],
        np.take_along_axis(np.broadcast_to(order, picks.shape), picks, axis=2),
        axis=2,
    )
    resampled = np.exp(log_fitted[None] + drawn)
    resampled = np.where(mask[None], resampled, y[None])
    tile = lambda a: np.broadcast_to(a, (n_resamples, *a.shape)).reshape(-1, *a.shape[1:])  # noqa: E731
    fixed, starts = options.pop("fixed"), options.pop("starts")
    if fixed:
        fixed = {
            k: np.tile(np.broadcast_to(np.asarray(v, float), (n_curves,)), n_resamples)
            for k, v in fixed.items()
        }
    if starts is not None and np.ndim(starts) == 3:  # one grid per curve
        starts = tile(np.asarray(starts, float))
    refits = fit(
        law,
        tile(x),
        resampled.reshape(-1, y.shape[1]),
        tile(mask),
        fixed=fixed,
        starts=starts,
        **options,
    )
    free = [k for k in law.param_names if k not in point.fixed]
    # Every parameter of every refit, the pinned ones (tiled above) included.
    samples = {k: v.reshape(n_resamples, n_curves) for k, v in refits.params.items()}
    boot = {k: samples[k] for k in free}
    intervals, derived_intervals = _percentile_intervals(law, samples, free, point.confidence)
    return dataclasses.replace(
        point,
        intervals=intervals,
        bootstrap_params=boot,
        bootstrap_objective=refits.objective.reshape(n_resamples, n_curves),
        derived_intervals=derived_intervals,
    )


def _to_natural(spec, theta, fixed_values) -> dict[str, np.ndarray]:
    """Fitted-space theta [..., n_curves, n_free] -> name -> natural values [..., n_curves]."""
    params = {}
    for j, name in enumerate(spec.free):
        params[name] = np.exp(theta[..., j]) if name in spec.law.positive else theta[..., j]
    for name, value in fixed_values.items():
        params[name] = np.broadcast_to(value, theta.shape[:-1]).copy()
    return params
