"""Backtests: fit on the smaller runs, predict the largest, and see whether the law held.

`backtest_arrays` does it for a batch of curves at once (one jitted fit with
bootstrap): each curve is fitted on its points outside `holdout`, and each
held-out point gets a prediction and a bootstrap prediction interval.  The
interval combines the two sources of error a prediction has:

- the parameters' uncertainty: every bootstrap refit predicts the point;
- the point's own noise: each refit's prediction is shifted by a residual
  drawn from the fit's log residuals, inflated by sqrt(n / (n - p)) because
  residuals of a fitted curve understate the noise (they were fitted to).

Percentiles of those give the interval.  `backtest_sweep` runs it on a
sweep's final losses, holding out the K largest runs by N or by compute,
and stores the fit with the outcome in its provenance.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from scaling.errors import UserError
from scaling.fitting.fit import OPTIMIZER_DEFAULTS, fit
from scaling.fitting.laws import get_law
from scaling.store import Store
from scaling.studies import analysis
from scaling.studies.provenance import run_convention, run_flops, save_fit_result

BY = ("n", "compute")


def backtest_arrays(
    law,
    x,
    y,
    mask,
    holdout,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.9,
    objective: str = "huber",
    fixed=None,
    varpro: bool = False,
) -> dict:
    """Fit each curve on mask & ~holdout, predict its holdout points.

    x [C, P, n_inputs], y [C, P], mask and holdout [C, P] bool.  Returns
    {"result": FitResult, "predicted" [C, P], "low" [C, P], "high" [C, P],
    "inside" [C, P] bool, "rel_error" [C, P]} (entries outside holdout are NaN
    or False).
    """
    law = get_law(law)
    if bootstrap < 20:
        raise UserError(
            f"bootstrap = {bootstrap}: a prediction interval needs at least 20 "
            "resamples (200 or more for a 90% interval)"
        )
    x, y = np.asarray(x, float), np.asarray(y, float)
    mask, holdout = np.asarray(mask, bool), np.asarray(holdout, bool) & np.asarray(mask, bool)
    train = mask & ~holdout
    result = fit(
        law,
        x,
        y,
        train,
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
        objective=objective,
        fixed=fixed,
        varpro=varpro,
    )
    log_x = np.log(x)
    point = np.asarray(
        law.predict_log({k: jnp.asarray(v)[:, None] for k, v in result.params.items()}, log_x)
    )  # [C, P]
    samples = {
        k: result.bootstrap_params.get(k, np.broadcast_to(v, (bootstrap, len(v))))
        for k, v in result.params.items()
    }
    boot = np.asarray(
        law.predict_log({k: jnp.asarray(v)[:, :, None] for k, v in samples.items()}, log_x[None])
    )  # [B, C, P]

    # Residual noise: per curve, draw from its inflated training residuals.
    rng = np.random.default_rng(seed)
    residual = np.log(y) - point
    n_train = train.sum(axis=1)
    n_free = len(law.param_names) - len(result.fixed)
    inflate = np.sqrt(n_train / np.maximum(n_train - n_free, 1))
    noise = np.zeros_like(boot)
    for c in range(len(y)):
        pool = residual[c, train[c]] * inflate[c]
        noise[:, c, :] = rng.choice(pool, size=(bootstrap, y.shape[1]))
    tail = 100 * (1 - confidence) / 2
    low, high = np.exp(np.nanpercentile(boot + noise, [tail, 100 - tail], axis=0))
    predicted = np.exp(point)
    nan = np.full_like(predicted, np.nan)
    inside = holdout & (low <= y) & (y <= high)
    return {
        "result": result,
        "predicted": np.where(holdout, predicted, nan),
        "low": np.where(holdout, low, nan),
        "high": np.where(holdout, high, nan),
        "inside": inside,
        "rel_error": np.where(holdout, predicted / y - 1, nan),
    }


def backtest_sweep(
    store: Store,
    sweep: str,
    law_name: str,
    holdout_largest: int,
    *,
    by: str = "n",
    bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.9,
    objective: str = "huber",
    convention: str | None = None,
    fixed: dict | None = None,
) -> dict:
    """Hold out the `holdout_largest` largest finished runs (by N or compute) and predict them.

    Saves the fit (what="backtest") with the outcome in its provenance, and
    returns the outcome: {"fit_id", "law", "by", "holdout": [per run: run_id,
    n_params, tokens, flops, observed, predicted, low, high, rel_error, inside],
    "confidence", "inside_fraction", "params"}.
    """
    law = get_law(law_name)
    if by not in BY:
        raise UserError(f"--by {by!r} is not one of {', '.join(BY)}")
    runs = [r for r in analysis.sweep_runs(store, sweep) if r.status == "finished"]
    convention = run_convention(runs, convention)
    labels, xs, ys, used = analysis.select_curves(store, runs, law, "final")
    by_id = {r.run_id: r for r in runs}
    ids = used[0]
    size = np.array(
        [by_id[i].n_params if by == "n" else run_flops(by_id[i], convention) for i in ids], float
    )
    n_free = len(law.param_names) - len(fixed or {})
    k = int(holdout_largest)
    if k < 1 or len(ids) - k < n_free + 1:
        raise UserError(
            f"--holdout-largest {holdout_largest}: sweep {sweep!r} has {len(ids)} "
            f"finished runs and law {law.name!r} needs {n_free + 1} to fit on; hold "
            f"out 1 to {max(len(ids) - n_free - 1, 0)} runs"
        )
    held = np.zeros(len(ids), bool)
    held[np.argsort(size, kind="stable")[-k:]] = True
    x, y = xs[0][None], ys[0][None]
    out = backtest_arrays(
        law,
        x,
        y,
        np.ones_like(y, bool),
        held[None],
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
        objective=objective,
        fixed=fixed,
    )
    rows = []
    for j in np.flatnonzero(held):
        run = by_id[ids[j]]
        rows.append(
            {
                "run_id": run.run_id,
                "n_params": run.n_params,
                "tokens": run.tokens,
                "flops": run_flops(run, convention),
                "observed": float(y[0, j]),
                "predicted": float(out["predicted"][0, j]),
                "low": float(out["low"][0, j]),
                "high": float(out["high"][0, j]),
                "rel_error": float(out["rel_error"][0, j]),
                "inside": bool(out["inside"][0, j]),
            }
        )
    result = out["result"]
    train_ids = [i for i, h in zip(ids, held, strict=True) if not h]
    settings = {
        "objective": objective,
        "bootstrap": bootstrap,
        "seed": seed,
        "n_params": "kaplan_nonembedding",
    }
    optimizer = {"objective": objective, "bootstrap": bootstrap, "seed": seed, **OPTIMIZER_DEFAULTS}
    outcome = {
        "law": law.name,
        "by": by,
        "holdout_largest": k,
        "confidence": confidence,
        "holdout": rows,
        "inside_fraction": float(np.mean([r["inside"] for r in rows])),
    }
    record = save_fit_result(
        store,
        result,
        0,
        sweep=sweep,
        what="backtest",
        label="all",
        selection={
            "runs": train_ids,
            "held_out": [r["run_id"] for r in rows],
            "n_params": None,
            "left_out": {},
        },
        settings=settings,
        x=x,
        y=y,
        mask=~held[None],
        run_ids=train_ids,
        fit_settings=optimizer,
        convention=convention,
        extra={"backtest": outcome},
    )
    return {"fit_id": record.fit_id, **outcome, "params": record.params}


def backtest_table(outcome: dict) -> str:
    """A text table of a backtest: one line per held-out run."""
    pct = round(100 * outcome["confidence"])
    lines = [
        f"{outcome['law']} fitted without the {outcome['holdout_largest']} largest runs "
        f"(by {outcome['by']}); {pct}% prediction intervals:"
    ]
    for r in outcome["holdout"]:
        lines.append(
            f"  {r['run_id']:<14} N={r['n_params']:,}  observed {r['observed']:.4f}  "
            f"predicted {r['predicted']:.4f} [{r['low']:.4f}, {r['high']:.4f}]  "
            f"error {100 * r['rel_error']:+.2f}%  " + ("inside" if r["inside"] else "OUTSIDE")
        )
    lines.append(
        f"  {sum(r['inside'] for r in outcome['holdout'])} of "
        f"{len(outcome['holdout'])} inside their interval"
    )
    return "\n".join(lines)
