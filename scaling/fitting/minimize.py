"""Many small smooth minimisations at once, inside one jitted program.

`minimize_tasks` runs quasi-Newton (BFGS) on T independent tasks of P
parameters each (P is small: a scaling law has 2 to 5).  It is a building
block of `scaling.fitting.fit`, traced inside its jit.

Why not `optax.lbfgs` with its zoom line search under `jax.vmap`?  Both loops
(iterations and line-search steps) become batched while-loops that run until
the slowest member of the batch is done, every member paying for every step
(the README gives the cost on the 4,500-start Chinchilla grid).  The design
here costs about the sum of the work the tasks need instead:

- One objective evaluation per iteration.  The line search is spread over
  iterations: a trial point that fails the Armijo condition is rejected and
  the next iteration tries a shorter step (quadratic interpolation, clipped to
  [0.1, 0.5] of the last step), so no inner loop waits on the slowest task.
- Dense BFGS: with P <= ~10 the full P x P inverse-Hessian estimate is smaller
  than L-BFGS's history and gives the exact BFGS update.  Its first update is
  scaled by y.s / y.y (Nocedal & Wright, eq. 6.20); pairs without positive
  curvature are skipped, so the estimate stays positive definite.
- Continuous batching: `chunk` lanes run `round_iters` iterations at a time;
  between rounds, lanes whose task finished take the next task from a queue,
  so finished tasks stop costing compute and no lane waits for the slowest.
- Warm starts: a task may start from an inverse-Hessian estimate (a refit
  near an earlier optimum, or a screened start that continues), which saves
  most of the evaluations BFGS spends learning the curvature.

A task stops when its gradient norm is at most its `gtol` (converged), when a
rejected step has shrunk below ~1e-12 of the parameters (stalled: no finite
step decreases the objective), when `window` evaluations lowered the
objective by less than a fraction `ftol` of it (crawling along a plateau,
typically towards a minimum at infinity such as a vanishing term), when the
objective or gradient is not finite at the start, or after `max_evals`
objective evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

ARMIJO = 1e-4  # sufficient-decrease constant (Nocedal & Wright's usual c1)
STALL = 1e-12  # relative step length below which a rejected step means "stalled"


class TaskState(NamedTuple):
    x: jnp.ndarray  # [T, P] parameters
    f: jnp.ndarray  # [T] objective at x
    g: jnp.ndarray  # [T, P] gradient at x
    h: jnp.ndarray  # [T, P, P] inverse-Hessian estimate
    step: jnp.ndarray  # [T] step length to try next along -h g
    scaled: jnp.ndarray  # [T] bool: h has had its first curvature scaling
    evals: jnp.ndarray  # [T] objective evaluations spent
    f_window: jnp.ndarray  # [T] objective at the start of the current progress window
    done: jnp.ndarray  # [T] bool
    gtol: jnp.ndarray  # [T] gradient-norm tolerance


class Solution(NamedTuple):
    x: jnp.ndarray  # [T, P]
    f: jnp.ndarray  # [T] (inf where the start was not finite)
    converged: jnp.ndarray  # [T] bool: gradient norm <= gtol at x
    evals: jnp.ndarray  # [T] objective evaluations spent
    h: jnp.ndarray  # [T, P, P] inverse-Hessian estimate at x
    scaled: jnp.ndarray  # [T] bool: h is a curvature estimate (not the identity)


def _iterate(value_and_grad, max_evals, window, ftol, s: TaskState, data) -> TaskState:
    """One objective evaluation for one task: try a step, accept or shorten it.

    The first evaluation (evals == 0, step 0) evaluates the start itself.
    """
    first = s.evals == 0
    eye = jnp.eye(s.x.shape[-1], dtype=s.x.dtype)
    direction = -s.h @ s.g
    slope = s.g @ direction
    # Rounding can cost h its positive definiteness; then fall back to -g.
    uphill = slope >= 0
    direction = jnp.where(uphill, -s.g, direction)
    slope = jnp.where(uphill, -(s.g @ s.g), slope)
    # The first evaluation is of the start itself, whatever h holds.
    trial = jnp.where(first, s.x, s.x + s.step * direction)
    f_new, g_new = value_and_grad(trial, data)
    finite = jnp.isfinite(f_new) & jnp.all(jnp.isfinite(g_new))
    accept = finite & (first | (f_new <= s.f + ARMIJO * s.step * slope))

    dx, dg = trial - s.x, g_new - s.g
    curvature = dg @ dx
    h0 = jnp.where(s.scaled, s.h, (curvature / (dg @ dg)) * eye)
    rho = 1.0 / curvature
    # (I - rho s y^T) H (I - rho y s^T) + rho s s^T, expanded to avoid matrix products.
    h_dg = h0 @ dg
    h_new = (
        h0
        - rho * (jnp.outer(h_dg, dx) + jnp.outer(dx, h_dg))
        + (rho + rho**2 * (dg @ h_dg)) * jnp.outer(dx, dx)
    )
    # In float32 a curvature pair of rounding noise can overflow rho: skip it.
    update = (
        accept
        & ~first
        & (curvature > 1e-10 * jnp.linalg.norm(dx) * jnp.linalg.norm(dg))
        & jnp.all(jnp.isfinite(h_new))
    )

    # Minimum of the quadratic through f(x), slope and f(trial), kept in [0.1, 0.5] step.
    excess = f_new - s.f - slope * s.step
    shorter = jnp.where(excess > 0, -slope * s.step**2 / (2 * excess), 0.5 * s.step)
    shorter = jnp.clip(jnp.nan_to_num(shorter, nan=0.1 * s.step), 0.1 * s.step, 0.5 * s.step)
    # Without a curvature estimate the first step is steepest descent no longer
    # than 1 in parameter space (as optax.lbfgs does); with one, and after an
    # accepted step, the full quasi-Newton step.
    first_step = jnp.where(s.scaled, 1.0, jnp.minimum(1.0, 1.0 / jnp.linalg.norm(g_new)))
    first_step = jnp.where(finite, first_step, 0.0)
    step = jnp.where(first, first_step, jnp.where(accept, 1.0, shorter))

    x = jnp.where(accept, trial, s.x)
    g = jnp.where(accept, g_new, s.g)
    f = jnp.where(accept, f_new, s.f)
    stalled = ~accept & (step * jnp.linalg.norm(direction) <= STALL * (1 + jnp.linalg.norm(x)))
    evals = s.evals + 1
    window_end = evals % window == 0
    crawling = window_end & (s.f_window - f <= ftol * jnp.abs(f))
    done = (jnp.linalg.norm(g) <= s.gtol) | stalled | crawling | (evals >= max_evals)
    new = TaskState(
        x,
        f,
        g,
        jnp.where(update, h_new, s.h),
        step,
        s.scaled | update,
        evals,
        jnp.where(window_end, f, s.f_window),
        done,
        s.gtol,
    )
    # A finished task keeps its state; its lane in the batch computes and discards.
    return jax.tree.map(lambda a, b: jnp.where(s.done, a, b), s, new)


def minimize_tasks(
    value_and_grad: Callable,
    load: Callable,
    x0: jnp.ndarray,
    gtol: jnp.ndarray,
    active: jnp.ndarray,
    h0: jnp.ndarray | None = None,
    warm: jnp.ndarray | bool = False,
    *,
    max_evals,
    chunk: int,
    round_iters: int = 8,
    window: int = 50,
    ftol: float = 1e-6,
) -> Solution:
    """Minimise T independent objectives; call inside jit.

    value_and_grad(x [P], data) -> (f, g [P]) for one task, where `data` is one
    task's slice of what `load(ids [M] int) -> pytree of [M, ...]` returns.
    x0: [T, P] starting points; gtol: [T] gradient-norm tolerances; active: [T]
    bool, false for padding tasks (never evaluated, f = inf).  h0: [T, P, P]
    inverse-Hessian estimates to start from where `warm` ([T] bool) is true,
    e.g. from an earlier solve near the same point; identity elsewhere.
    max_evals may be traced.
    """
    n_tasks, n_free = x0.shape
    chunk = min(chunk, n_tasks)
    step = jax.vmap(lambda s, d: _iterate(value_and_grad, max_evals, window, ftol, s, d))
    eye = jnp.broadcast_to(jnp.eye(n_free, dtype=x0.dtype), (n_tasks, n_free, n_free))
    warm = jnp.broadcast_to(warm, (n_tasks,))
    if h0 is None:
        h0, warm = eye, jnp.zeros_like(warm)
    # An estimate that is not finite is no estimate: such a task starts cold.
    warm = warm & jnp.all(jnp.isfinite(h0), axis=(1, 2))
    h0 = jnp.where(warm[:, None, None], h0, eye)
    # The work is a queue of the active tasks' ids feeding `chunk` lanes: when a
    # lane's task finishes, its result is written out and the lane takes the
    # next task, so every round's cost is independent of T.
    (queue,) = jnp.nonzero(active, size=n_tasks, fill_value=n_tasks)
    n_queued = active.sum()

    def fresh(ids):
        safe = jnp.minimum(ids, n_tasks - 1)
        return TaskState(
            x=x0[safe],
            f=jnp.full(len(ids), jnp.inf, x0.dtype),
            g=jnp.zeros_like(x0[safe]),
            h=h0[safe],
            step=jnp.zeros(len(ids), x0.dtype),
            scaled=warm[safe],
            evals=jnp.zeros(len(ids), jnp.int32),
            f_window=jnp.full(len(ids), jnp.inf, x0.dtype),
            done=ids >= n_tasks,
            gtol=gtol[safe],
        )

    def write(out: Solution, ids, lanes: TaskState) -> Solution:
        # Ids >= n_tasks (empty lanes, or lanes whose task is still running) are dropped.
        converged = (jnp.linalg.norm(lanes.g, axis=-1) <= lanes.gtol) & jnp.isfinite(lanes.f)
        new = Solution(lanes.x, lanes.f, converged, lanes.evals, lanes.h, lanes.scaled)
        return jax.tree.map(lambda a, b: a.at[ids].set(b, mode="drop"), out, new)

    def run_round(carry):
        out, lanes, lane_task, next_in_queue = carry
        # Finished lanes hand in their results and take the next queued tasks.
        free = lanes.done
        out = write(out, jnp.where(free, lane_task, n_tasks), lanes)
        position = next_in_queue + jnp.cumsum(free) - 1
        taken = free & (position < n_queued)
        new_task = jnp.where(taken, queue[jnp.minimum(position, n_tasks - 1)], n_tasks)
        lane_task = jnp.where(free, new_task, lane_task)
        lanes = jax.tree.map(
            lambda a, b: jnp.where(free.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
            fresh(new_task),
            lanes,
        )
        data = load(jnp.minimum(lane_task, n_tasks - 1))

        def more(c):
            k, s = c
            return (k < round_iters) & ~jnp.all(s.done)

        _, lanes = jax.lax.while_loop(more, lambda c: (c[0] + 1, step(c[1], data)), (0, lanes))
        return out, lanes, lane_task, next_in_queue + taken.sum()

    def unfinished(carry):
        _, lanes, _, next_in_queue = carry
        return (next_in_queue < n_queued) | ~jnp.all(lanes.done)

    out = Solution(
        x0,
        jnp.full(n_tasks, jnp.inf, x0.dtype),
        jnp.zeros(n_tasks, bool),
        jnp.zeros(n_tasks, jnp.int32),
        h0,
        warm,
    )
    empty = jnp.full(chunk, n_tasks)
    out, lanes, lane_task, _ = jax.lax.while_loop(
        unfinished, run_round, (out, fresh(empty), empty, jnp.asarray(0, n_queued.dtype))
    )
    return write(out, lane_task, lanes)
