"""The store as pandas DataFrames, fits of DataFrames, and figures on your own Axes.

For a researcher in Jupyter: nothing here needs the command line or SQL.

    from scaling import notebook as sn

    store = sn.open_store("results/scaling.sqlite")
    runs = sn.runs(store, "local_cpu")              # one row per run
    curves = sn.evals(store, "local_cpu")           # one row per (run, step), a column per metric
    tokens = sn.per_token(store, "local_cpu")       # one row per (run, step, T)
    fits = sn.fits(store, "local_cpu")              # one row per stored fit and parameter
    sn.fit_sweep(store, "local_cpu", "saturating", "per-token")  # fit and store, as the CLI
    final = sn.final_losses(store, "local_cpu").join(runs[["n_params"]])
    sn.fit_frame(final, "power", x="n_params", y="eval_loss", bootstrap=200)
    fig, ax = plt.subplots(); sn.draw(store, "local_cpu", "per-token", ax=ax)

pandas is an optional extra (`pip install -e '.[notebook]'`); the rest of the
suite never imports this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scaling.errors import UserError
from scaling.figures import plots
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law
from scaling.store import Store, sweep_runs
from scaling.studies.analysis import pad_curves
from scaling.studies.fit_study import fit_study

RUN_COLUMNS = (
    "run_id",
    "status",
    "step",
    "n_params",
    "n_params_total",
    "n_layer",
    "d_model",
    "n_heads",
    "n_ctx",
    "tokens",
    "flops",
    "flop_convention",
    "reason",
)


def open_store(path: str | Path) -> Store:
    """An existing store (a typo in the path is an error here, not a new empty store)."""
    if not Path(path).is_file():
        raise UserError(f"no store at {str(path)!r}; train a sweep first, or check the path")
    return Store(path)


def runs(store: Store, sweep: str | None = None) -> pd.DataFrame:
    """The runs (of `sweep`, or all), smallest N first; config values stay in `config`."""
    records = sweep_runs(store, sweep) if sweep is not None else store.runs()
    frame = pd.DataFrame(
        [{k: getattr(r, k) for k in RUN_COLUMNS} | {"config": r.config} for r in records],
        columns=[*RUN_COLUMNS, "config"],
    )
    return frame.set_index("run_id")


def evals(store: Store, sweep: str) -> pd.DataFrame:
    """Every logged metric of the sweep's runs: index (run_id, step), a column per metric."""
    rows = []
    for run in sweep_runs(store, sweep):
        for name in store.metric_names(run.run_id):
            steps, values = store.scalars(run.run_id, name)
            rows += [
                (run.run_id, int(s), name, float(v)) for s, v in zip(steps, values, strict=True)
            ]
    long = pd.DataFrame(rows, columns=["run_id", "step", "metric", "value"])
    wide = long.pivot_table(index=["run_id", "step"], columns="metric", values="value")
    wide.columns.name = None
    return wide


def final_losses(store: Store, sweep: str) -> pd.DataFrame:
    """Each run's last eval: index run_id, columns step and eval_loss."""
    rows = []
    for run in sweep_runs(store, sweep):
        last = store.last_eval(run.run_id)
        if last is not None:
            rows.append((run.run_id, *last))
    return pd.DataFrame(rows, columns=["run_id", "step", "eval_loss"]).set_index("run_id")


def per_token(store: Store, sweep: str, *, last_only: bool = False) -> pd.DataFrame:
    """Per-token eval losses: columns run_id, step, T (1-based position), loss, stderr
    (NaN where the store predates standard errors) and n_sequences."""
    frames = []
    for run in sweep_runs(store, sweep):
        steps, losses = store.per_token(run.run_id)
        if not len(steps):
            continue
        _, errors, n_sequences = store.per_token_stderr(run.run_id)
        rows = range(len(steps) - 1, len(steps)) if last_only else range(len(steps))
        for i in rows:
            n_ctx = losses.shape[1]
            frames.append(
                pd.DataFrame(
                    {
                        "run_id": run.run_id,
                        "step": int(steps[i]),
                        "T": np.arange(1, n_ctx + 1),
                        "loss": losses[i].astype(float),
                        "stderr": errors[i].astype(float),
                        "n_sequences": int(n_sequences[i]),
                    }
                )
            )
    if not frames:
        raise UserError(f"sweep {sweep!r} has no per-token eval losses yet")
    return pd.concat(frames, ignore_index=True)


FIT_COLUMNS = (
    "fit_id",
    "sweep",
    "law",
    "what",
    "curve",
    "param",
    "value",
    "low",
    "high",
    "n_points",
    "converged",
    "created",
)


def fits(store: Store, sweep: str | None = None, law: str | None = None) -> pd.DataFrame:
    """Stored fits, newest first: one row per (fit, parameter) with its value and interval."""
    return _fit_rows(store.fits(sweep, law))


def fit_sweep(store: Store, sweep: str, law: str, what: str = "final", **options) -> pd.DataFrame:
    """Fit `law` to the selection `what` of `sweep` and store the fits, as `scaling fit
    --sweep` does (`scaling.studies.fit_study`: final, per-token, learning-curve, isoflop,
    critical-batch; `options` are bootstrap, objective, fixed, ...); returns them as `fits`
    does."""
    return _fit_rows(fit_study(store, sweep, law, what, **options))


def _fit_rows(records) -> pd.DataFrame:
    rows = []
    for record in records:
        for name, value in record.params.items():
            low, high = record.intervals.get(name, (np.nan, np.nan))
            rows.append(
                {
                    "fit_id": record.fit_id,
                    "sweep": record.sweep,
                    "law": record.law,
                    "what": record.what,
                    "curve": record.curve,
                    "param": name,
                    "value": value,
                    "low": low,
                    "high": high,
                    "n_points": record.n_points,
                    "converged": record.converged,
                    "created": record.created,
                }
            )
    return pd.DataFrame(rows, columns=list(FIT_COLUMNS))


def fit_frame(
    frame: pd.DataFrame, law: str, x: str | list[str], y: str, *, by: str | None = None, **options
) -> pd.DataFrame:
    """Fit `law` to columns `x` (one per input) and `y` of `frame`, one curve per value of
    column `by` (or one curve); `options` go to `scaling.fitting.fit.fit` (bootstrap, resample,
    fixed, objective, ...). Returns one row per curve: each parameter, and its interval
    as NAME_low and NAME_high when bootstrapped."""
    law = get_law(law)
    x = [x] if isinstance(x, str) else list(x)
    missing = [c for c in [*x, y, *([by] if by else [])] if c not in frame.columns]
    if missing:
        raise UserError(
            f"the frame has no column {missing[0]!r}; its columns are {list(frame.columns)}"
        )
    if len(x) != law.n_inputs:
        raise UserError(
            f"law {law.name!r} ({law.formula}) takes {law.n_inputs} x column(s), got {len(x)}: {x}"
        )
    groups = list(frame.groupby(by, sort=True)) if by else [("all", frame)]
    xs, ys, mask = pad_curves(
        [g[x].to_numpy(float) for _, g in groups], [g[y].to_numpy(float) for _, g in groups]
    )
    result = fit(law, xs, ys, mask, **options)
    rows = []
    for i, (key, _) in enumerate(groups):
        row = {
            "curve": key,
            "n_points": int(result.n_points[i]),
            "converged": bool(result.converged[i]),
            "objective": float(result.objective[i]),
        }
        for name, values in result.params.items():
            row[name] = float(values[i])
            if name in result.intervals:
                row[f"{name}_low"], row[f"{name}_high"] = map(float, result.intervals[name][i])
        rows.append(row)
    return pd.DataFrame(rows).set_index("curve")


def draw(store: Store, sweep: str, kind: str, *, ax=None, run: str | None = None):
    """Draw one figure of the sweep (`plots.KINDS`) onto `ax` (a new figure without one);
    returns the `plots.Plot`, whose `figure`, `legend` and `notes` say what was drawn."""
    return plots.make_plot(store, sweep, kind, run=run, ax=ax)
