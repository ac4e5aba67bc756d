"""The batched BFGS solver: warm starts and the starts it cannot evaluate."""

import jax
import jax.numpy as jnp
import numpy as np

from scaling.fitting.minimize import minimize_tasks

CENTRE = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]])


def quadratic(x, centre):
    return jax.value_and_grad(lambda x: 0.5 * jnp.sum((x - centre) ** 2 * jnp.array([1.0, 4.0])))(x)


def solve(x0, h0=None, warm=False, active=None):
    active = jnp.ones(len(x0), bool) if active is None else active
    run = jax.jit(
        lambda x0, h0: minimize_tasks(
            lambda x, d: quadratic(x, d),
            lambda ids: CENTRE[ids],
            x0,
            jnp.full(len(x0), 1e-6),
            active,
            h0,
            warm,
            max_evals=100,
            chunk=2,
        )
    )
    return run(x0, h0)


def test_every_task_reaches_its_own_minimum():
    sol = solve(jnp.zeros((3, 2)))
    np.testing.assert_allclose(sol.x, CENTRE, atol=1e-5)
    assert sol.converged.all()


def test_a_warm_start_whose_estimate_is_not_finite_starts_cold():
    # A float32 search can hand on an inverse-Hessian estimate holding NaN;
    # the start itself is fine, so the task must still be solved.
    h0 = jnp.stack([jnp.full((2, 2), jnp.nan), jnp.diag(jnp.array([1.0, 0.25])), jnp.eye(2)])
    sol = solve(jnp.zeros((3, 2)), h0, warm=jnp.array([True, True, False]))
    np.testing.assert_allclose(sol.x, CENTRE, atol=1e-5)
    assert sol.converged.all() and np.isfinite(sol.f).all()
    # The exact inverse Hessian, warm, goes straight to the minimum.
    assert sol.evals[1] <= 3


def test_a_start_that_cannot_be_evaluated_is_not_converged():
    x0 = jnp.array([[0.0, 0.0], [jnp.nan, 0.0], [0.0, 0.0]])
    sol = solve(x0)
    assert not sol.converged[1] and sol.f[1] == jnp.inf
    assert sol.converged[0] and sol.converged[2]
