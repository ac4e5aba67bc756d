"""Variable projection for laws linear in their coefficients once the exponents are fixed.

`saturating` (E + A x^-alpha) and `chinchilla` (E + A/N^alpha + B/D^beta) are
linear in (E, A[, B]) for fixed exponents.  The full fit searches all five
Chinchilla parameters from a 4,500-point grid, and its Hessian mixes scales
(log A ~ 6, alpha ~ 0.35) into a badly conditioned problem.  Here the batched
BFGS searches only the exponents, and inside the objective the coefficients
are the non-negative least-squares solution for those exponents:

    c(theta) = argmin_{c >= 0} sum_i w_i ((y_i - Phi_i(theta) c) / y_i)^2

(Phi the law's basis, w the point weights: 0 for padding, multiplicities in a
bootstrap resample).  The relative residual (y - f)/y is the first-order
expansion of the log residual log y - log f the fit's objective uses, so
c(theta) is close to, but not exactly, the coefficients the log objective
wants; and the Chinchilla objective is Huber on log residuals, not least
squares.  So the reduced objective evaluates the real objective (Huber or
lsq on log residuals) at (c(theta), theta), and once the exponents have
converged, `fit(..., varpro=True)` polishes every curve with a full fit of all
parameters started from the projected solution (a handful of BFGS steps from a
point already in the right basin).  The polish makes the answer the full
objective's optimum; the projection is what finds the basin, from a grid over
the exponents alone.

NNLS under jit/vmap: with at most three coefficients every active set can be
enumerated (2^k - 1 supports).  For each support the unconstrained least
squares solution is one small linear solve; the NNLS optimum is the
feasible (all >= 0) support solution with the smallest residual, because the
optimum is itself the least-squares solution on its support, and every feasible
support solution is a feasible point whose residual is at least the optimum's.
Fixed-size, branch-free, and differentiable almost everywhere, so BFGS can
take gradients through it.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from scaling.errors import UserError

# Added to the diagonal of the (column-normalised) normal equations, so a
# support whose columns coincide (an exponent of 0 next to the constant E)
# gives a finite, merely suboptimal, solution instead of inf or NaN.
RIDGE = 1e-12


def check_law(law, fixed) -> tuple[str, ...]:
    """The law's projected coefficient names (those not pinned); UserError if it has none."""
    if law.linear is None:
        raise UserError(
            f"variable projection needs a law linear in its coefficients "
            f"(saturating, chinchilla); {law.name!r} is not; fit without --varpro"
        )
    names = law.linear[0]
    exponents = [k for k in law.param_names if k not in names and k not in fixed]
    if not exponents:
        raise UserError(
            f"with every exponent of {law.name!r} pinned there is nothing for "
            "variable projection to search; fit without --varpro"
        )
    return tuple(k for k in names if k not in fixed)


def nnls(a, b):
    """argmin_{c >= 0} |a c - b|^2 for a [n, k] with small k (<= 3 or 4), b [n]."""
    k = a.shape[-1]
    norms = jnp.sqrt(jnp.sum(a * a, axis=0)) + 1e-300
    a_s = a / norms[None, :]
    gram = a_s.T @ a_s
    rhs = a_s.T @ b
    best_c, best_sse = jnp.zeros(k), b @ b  # the empty support: c = 0
    for support in itertools.product((0.0, 1.0), repeat=k):
        if not any(support):
            continue
        m = jnp.asarray(support)
        restricted = gram * jnp.outer(m, m) + jnp.diag(1.0 - m) + RIDGE * jnp.eye(k)
        c = jnp.linalg.solve(restricted, rhs * m)
        residual = a_s @ c - b
        sse = residual @ residual
        better = jnp.all(c >= 0) & (sse < best_sse)
        best_c = jnp.where(better, c, best_c)
        best_sse = jnp.where(better, sse, best_sse)
    return best_c / norms


def coefficients(law, params: dict, projected: tuple[str, ...], log_x, log_y, weight) -> dict:
    """The projected coefficients for one curve, given every other parameter in `params`.

    log_x [n, n_inputs], log_y [n], weight [n]; returns name -> scalar.
    """
    names, basis = law.linear
    phi = basis(params, log_x)  # [n, n_coefficients]
    y = jnp.exp(log_y)
    offset = sum(
        (params[k] * phi[:, j] for j, k in enumerate(names) if k not in projected),
        jnp.zeros_like(y),
    )
    columns = jnp.stack([phi[:, names.index(k)] for k in projected], axis=1)
    scale = jnp.sqrt(weight) / y  # relative residuals, weighted
    c = nnls(columns * scale[:, None], (y - offset) * scale)
    return {k: c[j] for j, k in enumerate(projected)}


def predict_log(law, params: dict, log_x):
    """log L through the linear form (no log of a coefficient, which may be exactly 0)."""
    names, basis = law.linear
    coef = jnp.stack([jnp.asarray(params[k]) for k in names])  # [k], one curve's scalars
    return jnp.log(basis(params, log_x) @ coef)
