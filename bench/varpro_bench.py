"""Variable projection against the full fit, on Epoch AI's Chinchilla data.

    python bench/varpro_bench.py [--data PATH]

Fits `chinchilla` (Huber, delta 1e-3, on log residuals) to Epoch's
reconstruction of Hoffmann et al.'s Figure 4 (240 runs after dropping the
five highest losses) twice:

- full: the 4,500-start grid over (log E, log A, log B, alpha, beta);
- varpro: the 25-start grid over (alpha, beta), E/A/B by NNLS inside the
  objective, then a full-fit polish from the projected optimum.

and prints, for each: the optimum (objective and parameters), how many
starts failed to converge, objective evaluations, wall time (compile
included on the first call, not on the second; on whatever the machine is
doing), and the condition number of
the Hessian of the objective at the optimum in the space each one searches
(full: 5x5 over log E, log A, log B, alpha, beta; varpro: the 2x2 reduced
objective over alpha, beta, both at the full optimum).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scaling.fitting import varpro as vp
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data")


def epoch_data(path: Path):
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n = np.array([float(r["Model Size"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    d = np.array([float(r["Training FLOP"]) for r in rows]) / (6 * n)
    keep = np.argsort(loss)[:-5]
    return np.stack([n[keep], d[keep]], axis=1), loss[keep]


def huber(r, delta=1e-3):
    a = jnp.abs(r)
    c = jnp.minimum(a, delta)
    return jnp.sum(c * (a - 0.5 * c))


def condition_numbers(law, params, x, y):
    """Hessian condition numbers at the optimum: full space, and the reduced varpro space."""
    log_x, log_y = jnp.log(x), jnp.log(y)

    def full(theta):
        p = {
            "E": jnp.exp(theta[0]),
            "A": jnp.exp(theta[1]),
            "B": jnp.exp(theta[2]),
            "alpha": theta[3],
            "beta": theta[4],
        }
        return huber(log_y - law.predict_log(p, log_x))

    def reduced(theta):
        p = {"alpha": theta[0], "beta": theta[1]}
        p.update(vp.coefficients(law, p, ("E", "A", "B"), log_x, log_y, jnp.ones_like(log_y)))
        return huber(log_y - vp.predict_log(law, p, log_x))

    theta_full = jnp.array(
        [
            np.log(params["E"]),
            np.log(params["A"]),
            np.log(params["B"]),
            params["alpha"],
            params["beta"],
        ]
    )
    theta_red = jnp.array([params["alpha"], params["beta"]])
    out = {}
    for name, f, theta in (("full", full, theta_full), ("varpro", reduced, theta_red)):
        eig = np.linalg.eigvalsh(np.asarray(jax.hessian(f)(theta)))
        out[name] = (float(eig.max() / eig.min()) if eig.min() > 0 else float("inf"), eig)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=next(
            (p / "chinchilla_fig4_epoch.csv" for p in CANDIDATES if p.is_dir()),
            CANDIDATES[0] / "chinchilla_fig4_epoch.csv",
        ),
    )
    args = parser.parse_args()
    x, y = epoch_data(args.data)
    law = get_law("chinchilla")
    results = {}
    for name, varpro in (("full", False), ("varpro", True)):
        start = time.perf_counter()
        r = fit(law, x, y, varpro=varpro)
        first = time.perf_counter() - start
        start = time.perf_counter()
        r = fit(law, x, y, varpro=varpro)  # compiled now: the fit's own time
        results[name] = (r, first, time.perf_counter() - start)
    print(
        f"{'':8} {'objective':>14} {'E':>7} {'A':>8} {'B':>8} {'alpha':>7} {'beta':>7} "
        f"{'starts':>7} {'failed':>7} {'evals':>8} {'s, 1st':>7} {'s, 2nd':>7}"
    )
    for name, (r, first, seconds) in results.items():
        p = {k: float(v[0]) for k, v in r.params.items()}
        if name == "varpro":
            starts, conv = r.varpro["n_starts"], int(r.varpro["n_starts_converged"][0])
            evals = r.varpro["n_evaluations"] + r.n_evaluations
        else:
            starts, conv, evals = r.n_starts, int(r.n_starts_converged[0]), r.n_evaluations
        print(
            f"{name:8} {r.objective[0]:14.10g} {p['E']:7.4f} {p['A']:8.2f} {p['B']:8.1f} "
            f"{p['alpha']:7.4f} {p['beta']:7.4f} {starts:7d} {starts - conv:7d} "
            f"{evals:8d} {first:7.1f} {seconds:7.1f}"
        )
    r = results["varpro"][0]
    print(
        f"varpro before its polish: objective {r.varpro['objective'][0]:.10g} (NNLS fits "
        "relative residuals, not the Huber objective on log residuals)"
    )
    gap = results["varpro"][0].objective[0] / results["full"][0].objective[0] - 1
    print(f"polished varpro vs full objective: {gap:+.2e} relative")
    params = {k: float(v[0]) for k, v in results["full"][0].params.items()}
    for name, (cond, eig) in condition_numbers(law, params, x, y).items():
        print(
            f"Hessian at the optimum, {name:6}: condition number {cond:.3g} "
            f"(eigenvalues {', '.join(f'{e:.3g}' for e in eig)})"
        )


if __name__ == "__main__":
    with jax.enable_x64(True):
        main()
