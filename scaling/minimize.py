"""Many small smooth minimisations at once, inside one jitted program.

`minimize_tasks` runs quasi-Newton (BFGS) on T independent tasks of P
parameters each (P is small: a scaling law has 2 to 5).  It is a building
block of `scaling.fit`, traced inside its jit.

Why not `optax.lbfgs` with its zoom line search under `jax.vmap`?  Both loops
(iterations and line-search steps) become batched while-loops that run until
the slowest member of the batch is done, every member paying for every step;
for the 4,500-start Chinchilla grid that took 18 minutes on a 2-core CPU.  The
design here costs about the sum of the work the tasks need instead:

- One objective evaluation per iteration.  The line search is spread over
  iterations: a trial point that fails the Armijo condition is rejected and
  the next iteration tries a shorter step (quadratic interpolation, clipped to
  [0.1, 0.5] of the last step), so no inner loop waits on the slowest task.
- Dense BFGS: with P <= ~10 the full P x P inverse-Hessian estimate is smaller
  than L-BFGS's history and gives the exact BFGS update.  Its first update is
  scaled by y.s / y.y (Nocedal & Wright, eq. 6.20); pairs without positive
  curvature are skipped, so the estimate stays positive definite.
- Compaction: the tasks run in rounds of `round_iters` iterations on chunks of
  `chunk` tasks that are still running, so finished tasks stop costing compute
  and the working set stays in cache.

A task stops when its gradient norm is at most its `gtol` (converged), when a
rejected step has shrunk below ~1e-12 of the parameters (stalled: no finite
step decreases the objective), when the objective or gradient is not finite
at the start, or after `max_evals` objective evaluations.
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
    trial = s.x + s.step * direction
    f_new, g_new = value_and_grad(trial, data)
    finite = jnp.isfinite(f_new) & jnp.all(jnp.isfinite(g_new))
    accept = finite & (first | (f_new <= s.f + ARMIJO * s.step * slope))

    dx, dg = trial - s.x, g_new - s.g
    curvature = dg @ dx
    h0 = jnp.where(s.scaled, s.h, (curvature / (dg @ dg)) * eye)
    rho = 1.0 / curvature
    # (I - rho s y^T) H (I - rho y s^T) + rho s s^T, expanded to avoid matrix products.
    h_dg = h0 @ dg
    h_new = (h0 - rho * (jnp.outer(h_dg, dx) + jnp.outer(dx, h_dg))
             + (rho + rho**2 * (dg @ h_dg)) * jnp.outer(dx, dx))
    update = accept & ~first & (curvature > 1e-10 * jnp.linalg.norm(dx) * jnp.linalg.norm(dg))

    # Minimum of the quadratic through f(x), slope and f(trial), kept in [0.1, 0.5] step.
    excess = f_new - s.f - slope * s.step
    shorter = jnp.where(excess > 0, -slope * s.step**2 / (2 * excess), 0.5 * s.step)
    shorter = jnp.clip(jnp.nan_to_num(shorter, nan=0.1 * s.step), 0.1 * s.step, 0.5 * s.step)
    # The first step is steepest descent no longer than 1 in parameter space
    # (as optax.lbfgs does); after an accepted step, the full quasi-Newton step.
    first_step = jnp.where(finite, jnp.minimum(1.0, 1.0 / jnp.linalg.norm(g_new)), 0.0)
    step = jnp.where(first, first_step, jnp.where(accept, 1.0, shorter))

    x = jnp.where(accept, trial, s.x)
    g = jnp.where(accept, g_new, s.g)
    f = jnp.where(accept, f_new, s.f)
    stalled = ~accept & (step * jnp.linalg.norm(direction) <= STALL * (1 + jnp.linalg.norm(x)))
    evals = s.evals + 1
    window_end = evals % window == 0
    crawling = window_end & (s.f_window - f <= ftol * jnp.abs(f))
    done = (jnp.linalg.norm(g) <= s.gtol) | stalled | crawling | (evals >= max_evals)
    new = TaskState(x, f, g, jnp.where(update, h_new, s.h), step, s.scaled | update, evals,
                    jnp.where(window_end, f, s.f_window), done, s.gtol)
    # A finished task keeps its state; its lane in the batch computes and discards.
    return jax.tree.map(lambda a, b: jnp.where(s.done, a, b), s, new)


def minimize_tasks(value_and_grad: Callable, load: Callable, x0: jnp.ndarray,
                   gtol: jnp.ndarray, active: jnp.ndarray, *, max_evals: int, chunk: int,
                   round_iters: int = 16, window: int = 50, ftol: float = 1e-6) -> Solution:
    """Minimise T independent objectives; call inside jit.

    value_and_grad(x [P], data) -> (f, g [P]) for one task, where `data` is one
    task's slice of what `load(ids [M] int) -> pytree of [M, ...]` returns.
    x0: [T, P] starting points; gtol: [T] gradient-norm tolerances; active: [T]
    bool, false for padding tasks (never evaluated, f = inf).
    """
    n_tasks = x0.shape[0]
    chunk = min(chunk, n_tasks)
    step = jax.vmap(lambda s, d: _iterate(value_and_grad, max_evals, window, ftol, s, d))
    n_free = x0.shape[1]
    state = TaskState(
        x=x0, f=jnp.full(n_tasks, jnp.inf, x0.dtype), g=jnp.zeros_like(x0),
        h=jnp.broadcast_to(jnp.eye(n_free, dtype=x0.dtype), (n_tasks, n_free, n_free)),
        step=jnp.zeros(n_tasks, x0.dtype), scaled=jnp.zeros(n_tasks, bool),
        evals=jnp.zeros(n_tasks, jnp.int32), f_window=jnp.full(n_tasks, jnp.inf, x0.dtype),
        done=~active, gtol=gtol)

    def run_round(state: TaskState) -> TaskState:
        # The first `chunk` running tasks; missing slots get the out-of-range id
        # n_tasks, read as a finished task and dropped when written back.
        (picked,) = jnp.nonzero(~state.done, size=chunk, fill_value=n_tasks)
        safe = jnp.minimum(picked, n_tasks - 1)
        sub = jax.tree.map(lambda a: a[safe], state)
        sub = sub._replace(done=sub.done | (picked == n_tasks))
        data = load(safe)

        def more(carry):
            k, s = carry
            return (k < round_iters) & ~jnp.all(s.done)

        _, sub = jax.lax.while_loop(more, lambda c: (c[0] + 1, step(c[1], data)), (0, sub))
        return jax.tree.map(lambda a, b: a.at[picked].set(b, mode="drop"), state, sub)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), run_round, state)
    return Solution(state.x, state.f, jnp.linalg.norm(state.g, axis=-1) <= state.gtol)
