"""Fit a scaling law to a batch of curves, with bootstrap confidence intervals.

`fit(law, x, y, mask)` fits every curve of the batch independently, in one
jitted float64 program:

- Objective (Hoffmann et al. 2022; Epoch's replication): the sum over a
  curve's valid points of Huber_delta(log y - log L_predicted), delta = 1e-3,
  or with objective="lsq" the sum of (log y - log L_predicted)^2 / 2.
- Search: BFGS (`scaling.minimize`) from every point of the law's init grid
  (or `init_grid`), batched over starts and curves; the start with the lowest
  objective wins.  Parameters in `law.positive` are searched as logarithms.
  `keep_starts=k` screens the grid instead: a few evaluations per start,
  then only the k best of each curve run to the end.
- Bootstrap: each resample draws a curve's valid points with replacement
  (multinomial counts used as weights, so padding never enters), is refitted
  in the same program from the full-data best and its curvature estimate,
  and percentiles of the refits give the intervals.

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
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scaling import varpro as vp
from scaling.errors import UserError
from scaling.inputs import as_curves, check_fixed, check_settings, merged_grid
from scaling.laws import Law, get_law
from scaling.minimize import Solution, minimize_tasks

# Bootstrap resamples of a curve start from its full-data best and from up to
# this many - 1 other local minima within NEAR_TIE of it (see `_refit_starts`).
BOOTSTRAP_STARTS = 4
NEAR_TIE = 0.25
# With keep_starts, every start first gets this many objective evaluations:
# one round of the solver, so screened tasks leave their lanes together.
SCREEN_EVALS = 8
# The optimizer settings `fit` uses unless told otherwise (recorded in provenance).
OPTIMIZER_DEFAULTS = {"max_iter": 500, "tol": 1e-9, "keep_starts": None}


@dataclass(frozen=True)
class FitResult:
    """Per-curve answers; every array's first axis (after the resample axis) is the curve.

    `params` holds all parameters in natural units, pinned ones included.
    `intervals` holds [low, high] percentile-bootstrap intervals at
    `confidence` for the fitted (not pinned) parameters, and is empty when
    bootstrap=0 (an interval is absent rather than NaN, so JSON stays valid).
    `derived`/`derived_intervals`: the law's derived quantities (chinchilla:
    a = beta/(alpha+beta), b = alpha/(alpha+beta)), likewise.
    `converged`: the winning start met the gradient tolerance.
    """

    law: Law
    params: dict[str, np.ndarray]  # name -> [n_curves]
    intervals: dict[str, np.ndarray]  # name -> [n_curves, 2]
    objective: np.ndarray  # [n_curves]
    converged: np.ndarray  # [n_curves] bool
    n_points: np.ndarray  # [n_curves] valid points
    n_starts: int
    n_starts_converged: np.ndarray  # [n_curves] starts run to the end that met the tolerance
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
            out["derived_intervals"] = {k: [float(v[i, 0]), float(v[i, 1])]
                                        for k, v in self.derived_intervals.items()}
        return out


def fit(law: str | Law, x, y, mask=None, *, objective: str = "huber", delta: float = 1e-3,
        bootstrap: int = 0, seed: int = 0, max_iter: int = 500, tol: float = 1e-9,
        init_grid: Mapping | None = None, fixed: Mapping | None = None,
        confidence: float = 0.95, keep_starts: int | None = None, varpro: bool = False,
        starts=None) -> FitResult:
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
        (`scaling.varpro`; saturating and chinchilla).
    starts: fitted-space starting points per curve [n_curves, n_starts, n_free]
        (free parameters in law order), replacing the grid.
    """
    law = get_law(law)
    x, y, mask = as_curves(law, x, y, mask)
    check_settings(objective, delta, bootstrap, max_iter, tol, confidence, keep_starts)
    fixed_values = check_fixed(law, fixed, len(y))
    free = tuple(k for k in law.param_names if k not in fixed_values)
    n_points = mask.sum(axis=1)
    short = np.flatnonzero(n_points < len(free))
    if short.size:
        c = int(short[0])
        raise UserError(f"curve {c} has {n_points[c]} valid points but law {law.name!r} has "
                        f"{len(free)} free parameters; give it more points, pin some with "
                        "fixed=, or drop the curve")
    if varpro:
        return _fit_varpro(law, x, y, mask, fixed_values, objective=objective, delta=delta,
                           bootstrap=bootstrap, seed=seed, max_iter=max_iter, tol=tol,
                           init_grid=init_grid, confidence=confidence)
    if starts is None:
        starts = law.grid_points(free, merged_grid(law, init_grid))
    starts = np.broadcast_to(np.asarray(starts, float).reshape(-1, *np.shape(starts)[-2:]),
                             (len(y), np.shape(starts)[-2], len(free)))
    spec = _Spec(law, free, tuple(fixed_values), objective, int(max_iter), int(bootstrap),
                 _chunk_size(y.shape[1]), int(keep_starts or 0), min(SCREEN_EVALS, max_iter),
                 ())
    fixed_array = np.stack([fixed_values[k] for k in spec.fixed], axis=1) if fixed_values \
        else np.zeros((len(y), 0))
    with jax.enable_x64(True):
        out = _fit_program(spec, np.log(x), np.log(y), mask, fixed_array, starts,
                           float(tol), float(delta), jax.random.key(seed))
        out = jax.tree.map(np.asarray, out)
    return _result(spec, out, fixed_values, n_points, confidence, starts.shape[1])


def _fit_varpro(law, x, y, mask, fixed_values, *, objective, delta, bootstrap, seed, max_iter,
                tol, init_grid, confidence) -> FitResult:
    """Exponents by BFGS with projected coefficients, then a full-fit polish; see scaling.varpro."""
    projected = vp.check_law(law, fixed_values)
    free = tuple(k for k in law.param_names if k not in fixed_values and k not in projected)
    starts = law.grid_points(free, merged_grid(law, init_grid))
    spec = _Spec(law, free, tuple(fixed_values), objective, int(max_iter), 0,
                 _chunk_size(y.shape[1]), 0, min(SCREEN_EVALS, max_iter), projected)
    fixed_array = np.stack([fixed_values[k] for k in spec.fixed], axis=1) if fixed_values \
        else np.zeros((len(y), 0))
    with jax.enable_x64(True):
        out = _fit_program(spec, np.log(x), np.log(y), mask,
                           fixed_array, np.broadcast_to(starts, (len(y),) + starts.shape),
                           float(tol), float(delta), jax.random.key(seed))
        out = jax.tree.map(np.asarray, out)
        coef = jax.jit(jax.vmap(partial(_projected, spec)))(
            out["theta"], np.log(x), np.log(y), mask.astype(float), fixed_array)
        coef = {k: np.asarray(v) for k, v in coef.items()}
    stage = {"objective": out["objective"], "n_starts": len(starts),
             "n_starts_converged": out["n_starts_converged"].astype(int),
             "n_evaluations": int(out["evaluations"])}
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
    polished = fit(law, x, y, mask, objective=objective, delta=delta, bootstrap=bootstrap,
                   seed=seed, max_iter=max_iter, tol=tol, fixed=fixed_values or None,
                   confidence=confidence, starts=np.stack(point, axis=-1)[:, None, :])
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
    # About 2^15 point-evaluations per batched step: enough to amortise the
    # loop's fixed cost per step, few enough that finished tasks idle briefly.
    return int(np.clip(2**15 // max(n_points, 1), 16, 1024))


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
        params.update(vp.coefficients(spec.law, params, spec.projected, data.log_x, data.log_y,
                                      data.weight))
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


# The phases of `_fit_program`.
GRID, FINISH, BOOT = 0, 1, 2


@partial(jax.jit, static_argnames=("spec",))
def _fit_program(spec: _Spec, log_x, log_y, mask, fixed, starts, tol, delta, key):
    """Fit every curve from every start (GRID), optionally only the best
    `spec.keep` starts of each to the end (FINISH), then refit the resamples (BOOT).

    All phases run one traced solver inside a fori_loop (tasks padded to the
    largest phase; padding is inactive and costs nothing), because each traced
    copy of the solver adds seconds of XLA compile time.
    """
    n_curves, n_points = log_y.shape
    n_starts, n_free = starts.shape[1:]  # starts: [n_curves, n_starts, n_free]
    keep = spec.keep if 0 < spec.keep < n_starts else n_starts
    phases = [GRID] + ([FINISH] if keep < n_starts else []) + ([BOOT] if spec.n_boot else [])
    members = {GRID: n_starts, FINISH: keep, BOOT: BOOTSTRAP_STARTS}  # tasks per group
    groups = {GRID: n_curves, FINISH: n_curves, BOOT: spec.n_boot * n_curves}
    n_tasks = max(groups[p] * members[p] for p in phases)
    task = jnp.arange(n_tasks)
    weight = mask.astype(log_y.dtype)
    n_valid = weight.sum(axis=1)
    value_and_grad = jax.value_and_grad(partial(_objective, spec, delta))
    draw = jax.vmap(partial(_resample, key, mask))
    eye = jnp.broadcast_to(jnp.eye(n_free), (n_tasks, n_free, n_free))

    def pad(a):
        return jnp.concatenate([a, jnp.zeros((n_tasks - len(a),) + a.shape[1:], a.dtype)])

    def per_group(sol: Solution, phase):
        """The phase's results as [groups, members, ...] (task t is member t % members
        of group t // members; a group is a curve, or in BOOT a resample of one)."""
        size = groups[phase] * members[phase]
        return jax.tree.map(lambda a: a[:size].reshape(groups[phase], members[phase],
                                                       *a.shape[1:]), sol)

    full_data = FINISH if FINISH in phases else GRID

    # Each phase's tasks: (x0, h0, warm, active, max_evals).
    def grid_tasks(results):
        return (pad(starts.reshape(-1, n_free)), eye, jnp.zeros(n_tasks, bool),
                task < n_curves * n_starts, spec.screen if FINISH in phases else spec.max_iter)

    def finish_tasks(results):
        # Continue each curve's `keep` best screened starts, curvature estimate and all.
        grid = per_group(results[GRID], GRID)
        best = jnp.argsort(grid.f, axis=1)[:, :keep]
        chosen = jax.tree.map(lambda a: jnp.take_along_axis(
            a, best.reshape(best.shape + (1,) * (a.ndim - 2)), axis=1).reshape(
            -1, *a.shape[2:]), grid)
        return (pad(chosen.x), pad(chosen.h), pad(chosen.scaled),
                pad(jnp.isfinite(chosen.f)), spec.max_iter)

    def boot_tasks(results):
        fits = per_group(results[full_data], full_data)
        x0, h0, warm, used = jax.vmap(_refit_starts)(fits.x, fits.f, fits.converged, fits.h,
                                                     fits.scaled)
        tile = lambda a: pad(jnp.tile(a.reshape(-1, *a.shape[2:]),  # noqa: E731
                                      (spec.n_boot,) + (1,) * (a.ndim - 2)))
        return tile(x0), tile(h0), tile(warm), tile(used), spec.max_iter

    def run_phase(i, results):
        phase = jnp.asarray(phases)[i]
        branches = [{GRID: grid_tasks, FINISH: finish_tasks, BOOT: boot_tasks}[p]
                    for p in phases]
        x0, h0, warm, active, max_evals = jax.lax.switch(i, branches, results)
        group = task // jnp.asarray([members[p] for p in phases])[i]
        curve = group % n_curves  # in BOOT, group is resample * n_curves + curve

        def load(ids):
            w = weight[curve[ids]]
            if spec.n_boot:
                w = jax.lax.cond(phase == BOOT, lambda: draw(group[ids]), lambda: w)
            return _Data(log_x[curve[ids]], log_y[curve[ids]], w, fixed[curve[ids]])

        sol = minimize_tasks(value_and_grad, load, x0, tol * n_valid[curve], active, h0, warm,
                             max_evals=max_evals, chunk=spec.chunk)
        return {p: jax.tree.map(partial(jnp.where, phase == p), sol, results[p]) for p in phases}

    empty = Solution(jnp.zeros((n_tasks, n_free)), jnp.full(n_tasks, jnp.inf),
                     jnp.zeros(n_tasks, bool), jnp.zeros(n_tasks, jnp.int32), eye,
                     jnp.zeros(n_tasks, bool))
    results = jax.lax.fori_loop(0, len(phases), run_phase, {p: empty for p in phases})

    fits = per_group(results[full_data], full_data)
    rows, best = jnp.arange(n_curves), jnp.argmin(fits.f, axis=1)
    out = {"theta": fits.x[rows, best], "objective": fits.f[rows, best],
           "converged": fits.converged[rows, best],
           "n_starts_converged": fits.converged.sum(axis=1),
           "evaluations": results[GRID].evals.sum() + (results[FINISH].evals.sum()
                                                        if FINISH in phases else 0)}
    if spec.n_boot:
        refits = per_group(results[BOOT], BOOT)
        pairs, best = jnp.arange(spec.n_boot * n_curves), jnp.argmin(refits.f, axis=1)
        out["boot_theta"] = refits.x[pairs, best].reshape(spec.n_boot, n_curves, n_free)
        out["boot_objective"] = refits.f[pairs, best].reshape(spec.n_boot, n_curves)
    return out


def _resample(key, mask, pair_id):
    """Multiplicities [n_points] of resample pair_id // n_curves of curve pair_id % n_curves.

    Draws n_valid of the curve's valid points uniformly with replacement; a
    pure function of (key, pair_id), so the weights need no memory between rounds.
    """
    n_curves, n_points = mask.shape
    c = pair_id % n_curves
    n_valid = mask[c].sum()
    valid_first = jnp.argsort(~mask[c], stable=True)
    picks = jax.random.randint(jax.random.fold_in(key, pair_id), (n_points,), 0, n_valid)
    counted = jnp.arange(n_points) < n_valid
    return jnp.zeros(n_points).at[valid_first[picks]].add(counted)


def bootstrap_weights(mask, n_resamples: int, seed: int = 0) -> np.ndarray:
    """The multiplicities `fit(..., bootstrap=n_resamples, seed=seed)` uses: [B, C, n_points]."""
    mask = np.asarray(mask, bool).reshape(-1, np.shape(mask)[-1])
    with jax.enable_x64(True):
        draw = jax.jit(jax.vmap(_resample, in_axes=(None, None, 0)))
        weights = draw(jax.random.key(seed), mask, jnp.arange(n_resamples * mask.shape[0]))
        return np.asarray(weights).reshape(n_resamples, *mask.shape)


def _refit_starts(x, f, converged, h, scaled):
    """Starts for one curve's bootstrap refits, from its full-data runs [members, ...]:
    x [K, n_free], their inverse-Hessian estimates [K, n_free, n_free] and
    whether those are estimates [K], and which of the K starts are used [K].

    A resample moves the optimum only a little, so its refit starts from the
    full-data best and its curvature estimate rather than from the whole grid
    (the grid is there to find the basin, which is known by now): for Chinchilla
    about 20 evaluations per resample instead of 4,500 starts' worth.  A
    resample reweights points by ~1/sqrt(n), which can reorder local minima
    whose objectives are close, so other minima (converged starts whose
    objectives are 1e-6 relative apart) within NEAR_TIE of the best start refits too.
    """
    order = jnp.argsort(f)
    fs = f[order]
    distinct = jnp.concatenate([jnp.array([True]), fs[1:] > fs[:-1] * (1 + 1e-6) + 1e-300])
    candidate = distinct & (fs <= fs[0] * (1 + NEAR_TIE)) & jnp.isfinite(fs)
    candidate = candidate & (converged[order] | (jnp.arange(len(f)) == 0))
    (picked,) = jnp.nonzero(candidate, size=BOOTSTRAP_STARTS, fill_value=len(f))
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
        tail = 100 * (1 - confidence) / 2
        samples = _to_natural(spec, out["boot_theta"], fixed_values)
        boot = {k: samples[k] for k in spec.free}
        intervals = {k: np.nanpercentile(v, [tail, 100 - tail], axis=0).T for k, v in boot.items()}
        if law.derived is not None:
            derived_intervals = {
                k: np.nanpercentile(np.asarray(v, float), [tail, 100 - tail], axis=0).T
                for k, v in law.derived(samples).items()}
    return FitResult(law, params, intervals, out["objective"], out["converged"],
                     n_points.astype(int), n_starts, out["n_starts_converged"].astype(int),
                     int(out["evaluations"]), spec.fixed, confidence, boot, boot_objective,
                     derived, derived_intervals)


def _to_natural(spec, theta, fixed_values) -> dict[str, np.ndarray]:
    """Fitted-space theta [..., n_curves, n_free] -> name -> natural values [..., n_curves]."""
    params = {}
    for j, name in enumerate(spec.free):
        params[name] = np.exp(theta[..., j]) if name in spec.law.positive else theta[..., j]
    for name, value in fixed_values.items():
        params[name] = np.broadcast_to(value, theta.shape[:-1]).copy()
    return params
