"""Compute-optimal exponents from an IsoFLOP grid: Hoffmann et al. 2022, approach 2.

Budgets are counted as the Chinchilla paper states them, C = 6 N D with N
every parameter (embeddings included): the runs' total parameter count and
tokens give each run's C, and runs within 2% of each other share a budget.
Per budget, a parabola in log N through the final losses gives N_opt(C)
(and D_opt = C / (6 N_opt)); straight lines through log N_opt and log D_opt
against log C give the exponents a and b of N_opt ~ C^a and D_opt ~ C^b.
Intervals come from resampling each profile's runs (bootstrap).

Where several runs share a size and a budget (a learning-rate or beta2 sweep at each
point, as Chinchilla and Porian et al. tuned theirs), the profile keeps the one with
the lowest loss: a profile is the best loss each size reaches at that budget.

`scaling fit --sweep S --what isoflop --law compute_optimal` stores the
result as a fit; `scaling plot S --kind isoflop-total` draws the profiles
(scaling/figures/isoflop.py; its `isoflop` kind groups runs by the trainer's
6N + attention FLOPs and non-embedding N instead).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scaling.errors import UserError
from scaling.store import FitRecord, Store, sweep_runs
from scaling.studies.provenance import store_fit

# The names its stored fit carries. "compute_optimal" is not a law of the registry
# (scaling/fitting/laws.py): no curve is fitted, two lines go through the parabolas'
# minima; `laws.chinchilla_optimum` is the same optimum read off a fitted chinchilla law.
WHAT, LAW = "isoflop", "compute_optimal"


@dataclasses.dataclass(frozen=True)
class Profile:
    budget: float  # FLOPs, 6 N_total D, the geometric mean of the group
    n_total: np.ndarray  # total parameters of each run, ascending
    loss: np.ndarray  # final eval loss of each run
    run_ids: tuple = ()  # each run's id, in the same order
    not_best: tuple = ()  # runs of the same size and budget that reached a higher loss


def budget_of(run) -> float:
    return 6.0 * run.n_params_total * run.tokens


def profiles(store: Store, runs) -> list[Profile]:
    """Finished runs grouped by budget (2%), each profile with 3 or more sizes, by budget;
    a size with several runs at one budget is its best run (the others: `not_best`)."""
    points = sorted(
        (budget_of(r), r.n_params_total, store.last_eval(r.run_id)[1], r.run_id)
        for r in runs
        if r.status == "finished" and store.last_eval(r.run_id)
    )
    groups, current = [], []
    for point in points:
        if current and point[0] > current[0][0] * 1.02:
            groups.append(current)
            current = []
        current.append(point)
    if current:
        groups.append(current)
    result = []
    for group in groups:
        best: dict[float, tuple] = {}  # size -> (loss, run_id, budget) of its best run
        for c, n, loss, run_id in group:
            if n not in best or loss < best[n][0]:
                best[n] = (loss, run_id, c)
        if len(best) >= 3:
            sizes = sorted(best)
            kept = {best[n][1] for n in sizes}
            result.append(
                Profile(
                    float(np.exp(np.log([best[n][2] for n in sizes]).mean())),
                    np.array(sizes, float),
                    np.array([best[n][0] for n in sizes], float),
                    tuple(best[n][1] for n in sizes),
                    tuple(point[3] for point in group if point[3] not in kept),
                )
            )
    return result


def parabola_minimum(n_total, loss) -> float | None:
    """argmin over N of a parabola in log N through the points; None if it opens downward."""
    a, b, _ = np.polyfit(np.log(n_total), loss, 2)
    return float(np.exp(-b / (2 * a))) if a > 0 else None


def exponents(budgets, n_opt) -> dict:
    """a, b and the prefactors of N_opt = k_N C^a and D_opt = k_D C^b (least squares in log)."""
    log_c, log_n = np.log(budgets), np.log(n_opt)
    a, log_k_n = np.polyfit(log_c, log_n, 1)
    b, log_k_d = np.polyfit(log_c, np.log(np.asarray(budgets) / (6 * np.asarray(n_opt))), 1)
    return {
        "a": float(a),
        "b": float(b),
        "k_N": float(np.exp(log_k_n)),
        "k_D": float(np.exp(log_k_d)),
    }


def optimum(profile_list) -> tuple[np.ndarray, np.ndarray]:
    """(budgets, N_opt) of the profiles whose parabola has its minimum among their sizes
    (one outside would be an extrapolation, not a measurement)."""
    found = [(p.budget, parabola_minimum(p.n_total, p.loss), p) for p in profile_list]
    found = [(c, n) for c, n, p in found if n is not None and p.n_total[0] <= n <= p.n_total[-1]]
    return np.array([c for c, _ in found]), np.array([n for _, n in found])


def no_minimum(profile) -> str:
    """Why a profile gave no N_opt, for the fit's left-out runs."""
    n = parabola_minimum(profile.n_total, profile.loss)
    where = (
        "its parabola opens downward"
        if n is None
        else f"its parabola's minimum, N_total = {n:.3g}, lies outside its sizes "
        f"{profile.n_total[0]:.3g}-{profile.n_total[-1]:.3g}"
    )
    return f"the profile at C = {profile.budget:.3g} has no minimum: {where}"


def fit_isoflop(store: Store, sweep: str, *, bootstrap: int = 200, seed: int = 0) -> FitRecord:
    """Approach 2 on the sweep's final losses; the fit is saved and returned."""

    found = profiles(store, sweep_runs(store, sweep))
    budgets, n_opt = optimum(found)
    if len(budgets) < 2:
        raise UserError(
            f"sweep {sweep!r} has {len(budgets)} IsoFLOP profiles with a minimum "
            "(3 or more sizes at one budget 6 N_total D, within 2%); approach 2 "
            "needs two or more: give each budget sizes either side of its optimum"
        )
    params = exponents(budgets, n_opt)
    left_out = {
        run_id: "not the best at its size and budget: another run reached a lower loss"
        for p in found
        for run_id in p.not_best
    }
    for p in found:
        if p.budget not in budgets:
            left_out.update(dict.fromkeys(p.run_ids, no_minimum(p)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        resampled = []
        for p in found:
            pick = np.sort(rng.integers(0, len(p.n_total), len(p.n_total)))
            if len(set(pick.tolist())) >= 3:
                resampled.append(Profile(p.budget, p.n_total[pick], p.loss[pick]))
        c, n = optimum(resampled)
        if len(c) >= 2:
            draws.append(exponents(c, n))
    intervals = (
        {
            k: [
                float(np.percentile([d[k] for d in draws], 2.5)),
                float(np.percentile([d[k] for d in draws], 97.5)),
            ]
            for k in params
        }
        if len(draws) >= 10
        else {}
    )
    record = FitRecord(
        sweep=sweep,
        law=LAW,
        what=WHAT,
        curve="all",
        params=params,
        intervals=intervals,
        objective=0.0,
        converged=True,
        n_points=len(budgets),
        selection={
            "budgets": budgets.tolist(),
            "N_opt": n_opt.tolist(),
            "flops": "6 N_total D",
            "left_out": left_out,
        },
        settings={"bootstrap": bootstrap, "seed": seed, "draws": len(draws)},
        provenance={
            "runs": [run_id for p in found for run_id in p.run_ids],
            "points": [
                [p.budget, float(n), float(loss)]
                for p in found
                for n, loss in zip(p.n_total, p.loss, strict=True)
            ],
            "method": "approach 2: a parabola in log N per budget, lines in log C",
        },
    )
    return store_fit(store, record, record.provenance["runs"])
