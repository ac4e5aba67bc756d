"""From the store to fitted laws and back: what `scaling fit` and `scaling query` do.

Three selections of a sweep's data, each a batch of curves fitted at once:
- `final`: one curve over the sweep's finished runs, the last eval loss
  against N (and D or S for two-input laws);
- `per-token`: one curve per run, the last per-token eval loss against the
  token position T = 1..n_ctx (Kaplan et al. 2020, Fig. 20);
- `learning-curve`: one curve per run, eval loss against step.
Failed runs are left out, and the fit's selection says which and why.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from scaling.errors import UserError
from scaling.fitting.fit import OPTIMIZER_DEFAULTS, fit
from scaling.fitting.laws import LAWS, get_law
from scaling.store import FitRecord, Store, sweep_runs
from scaling.studies.fit_warnings import record_warnings
from scaling.studies.provenance import (
    environment_text,
    fit_record,
    run_convention,
    save_fit_result,
)


def fit_sweep(
    store: Store,
    sweep: str,
    law_name: str,
    what: str = "final",
    *,
    bootstrap: int = 200,
    objective: str = "huber",
    seed: int = 0,
    fixed: dict | None = None,
    convention: str | None = None,
    varpro: bool = False,
    keep_starts: int | None = None,
    resample: str | None = None,
    save: bool = True,
) -> list[FitRecord]:
    """Fit `law_name` to the selection `what` of `sweep`; return one record per curve,
    saved to the store unless `save` is False (a figure's own fit, which leaves the store
    as it was).

    fixed: name -> value pinned (not fitted); convention: the FLOP convention
    the runs' compute is read under (default: the one they were recorded in);
    resample: what a bootstrap resample draws (`scaling.fitting.fit.fit`); None picks
    residuals for per-token curves, whose positions are a fixed design, and
    the points (cases) otherwise.
    """
    if resample is None:
        resample = "residuals" if what == "per-token" else "cases"
    law = get_law(law_name)
    runs = sweep_runs(store, sweep)
    finished = [r for r in runs if r.status == "finished"]
    left_out = {
        r.run_id: f"{r.status}: {r.reason}" if r.reason else r.status
        for r in runs
        if r.status != "finished"
    }
    if not finished:
        raise UserError(f"sweep {sweep!r} has no finished runs yet; run `scaling sweep` first")

    convention = run_convention(finished, convention)
    labels, xs, ys, used = select_curves(store, finished, law, what)
    size = {r.run_id: r.n_params for r in finished}
    x, y, mask = pad_curves(xs, ys)
    result = fit(
        law,
        x,
        y,
        mask,
        bootstrap=bootstrap,
        objective=objective,
        seed=seed,
        fixed=fixed,
        varpro=varpro,
        keep_starts=keep_starts,
        resample=resample,
    )
    settings = {
        "objective": objective,
        "bootstrap": bootstrap,
        "seed": seed,
        "resample": resample,
        "n_params": "kaplan_nonembedding",
    }
    if fixed:
        settings["fixed"] = {k: float(v) for k, v in fixed.items()}
    optimizer = {
        "objective": objective,
        "bootstrap": bootstrap,
        "seed": seed,
        "resample": resample,
        **OPTIMIZER_DEFAULTS,
        "keep_starts": keep_starts,
        "varpro": bool(result.varpro),
    }
    record = partial(save_fit_result, store) if save else fit_record
    return [
        record(
            result,
            i,
            sweep=sweep,
            what=what,
            label=label,
            selection={
                "runs": [r.run_id for r in finished] if what == "final" else [label],
                "n_params": size.get(label),
                "left_out": left_out,
            },
            settings=settings,
            x=x,
            y=y,
            mask=mask,
            run_ids=used[i],
            fit_settings=optimizer,
            convention=convention,
        )
        for i, label in enumerate(labels)
    ]


def sweep_arrays(store: Store, sweep: str, law_name: str, what: str = "final"):
    """(labels, x [C, P, n_inputs], y [C, P], mask [C, P]) of a sweep's finished runs."""
    finished = [r for r in sweep_runs(store, sweep) if r.status == "finished"]
    if not finished:
        raise UserError(f"sweep {sweep!r} has no finished runs yet; run `scaling sweep` first")
    labels, xs, ys, _ = select_curves(store, finished, get_law(law_name), what)
    return (labels, *pad_curves(xs, ys))


def select_curves(store, runs, law, what):
    """(labels, xs, ys, used): per curve, inputs [n, n_inputs], losses [n] and the run ids."""
    if what == "final":
        columns = {"power": ["N"], "saturating": ["N"], "kaplan_ns": ["N", "S"]}.get(
            law.name, ["N", "D"] if law.n_inputs == 2 else ["N"]
        )
        rows, losses, used = [], [], []
        for run in runs:
            last = store.last_eval(run.run_id)
            if last is None:
                continue
            values = {"N": run.n_params, "D": run.tokens, "S": last[0]}
            rows.append([values[c] for c in columns])
            losses.append(last[1])
            used.append(run.run_id)
        if not rows:
            raise UserError(
                f"none of the {len(runs)} finished runs has an eval in this store "
                "(were they trained with another --config.store?)"
            )
        return ["all"], [np.array(rows, float)], [np.array(losses, float)], [used]
    if law.n_inputs != 1:
        raise UserError(
            f"--what {what} fits one input per curve; law {law.name!r} takes "
            f"{law.n_inputs}: use power or saturating"
        )
    labels, xs, ys = [], [], []
    for run in runs:
        if what == "per-token":
            steps, losses = store.per_token(run.run_id)
            if not len(steps):
                continue
            y = losses[-1].astype(float)
            x = np.arange(1, len(y) + 1, dtype=float)
        elif what == "learning-curve":
            x, y = store.scalars(run.run_id, "eval_loss")
            x = x.astype(float)
        else:
            raise UserError(f"--what {what!r} is not one of final, per-token, learning-curve")
        labels.append(run.run_id)
        xs.append(x[:, None])
        ys.append(y)
    if not labels:
        raise UserError(f"no {what} data in the store for these runs")
    return labels, xs, ys, [[label] for label in labels]


def pad_curves(xs, ys):
    """Stack ragged curves: x [C, P, I], y [C, P], mask [C, P] (padding is ones, masked out)."""
    longest = max(len(y) for y in ys)
    n_inputs = xs[0].shape[1]
    x = np.ones((len(ys), longest, n_inputs))
    y = np.ones((len(ys), longest))
    mask = np.zeros((len(ys), longest), bool)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        x[i, : len(yi)], y[i, : len(yi)], mask[i, : len(yi)] = xi, yi, True
    return x, y, mask


def latest_fits(store: Store, sweep: str, law: str | None = None) -> list[FitRecord]:
    """The newest fit of each (law, selection, curve) of a sweep's current runs."""
    # Fits of runs the sweep no longer has (an earlier version of the study) are history.
    former = {r.run_id for r in store.runs()} - {r.run_id for r in store.runs(sweep)}
    seen, latest = set(), []
    for record in store.fits(sweep, law):
        key = (record.law, record.what, record.curve)
        if record.curve not in former and key not in seen:
            seen.add(key)
            latest.append(record)
    if not latest:
        raise UserError(
            f"no fits stored for sweep {sweep!r}"
            + (f" and law {law!r}" if law else "")
            + "; run `scaling fit --sweep NAME --law LAW` first"
        )
    return sorted(latest, key=lambda r: (r.law, r.what, r.selection.get("n_params") or 0))


def same_convention(records: list[FitRecord], convention: str | None) -> list[FitRecord]:
    """The fits made under `convention`; without one, all of them if they agree.

    Fits whose runs count compute under different FLOP conventions are not
    comparable, so a mix is refused rather than shown side by side.  Fits
    stored before provenance was recorded have no convention and pass.
    """
    found = sorted({r.provenance.get("flop_convention") for r in records} - {None})
    if convention is None:
        if len(found) > 1:
            raise UserError(
                f"these fits were made under different FLOP conventions "
                f"({', '.join(found)}) and are not comparable; pass --convention "
                "CONV to see the fits of one"
            )
        return records
    chosen = [r for r in records if r.provenance.get("flop_convention") == convention]
    if not chosen:
        raise UserError(
            f"no fits made under FLOP convention {convention!r}; these fits use: "
            f"{', '.join(found) or 'none recorded'}"
        )
    return chosen


def provenance_line(record: FitRecord) -> str:
    """One line: where the fit came from."""
    p = record.provenance
    if not p:
        return "  provenance: not recorded (fit stored before schema 2)"
    trained = "".join(
        f"\n    trained with {environment_text(e)} ({e.get('runs')} runs)"
        for e in p.get("environments") or []
    )
    if "method" in p:  # not a curve fit (isoflop's approach 2): its method in words
        return (
            f"  provenance: {len(p.get('runs', []))} runs, {len(p.get('points', []))} points, "
            f"{p['method']}, {p.get('version')}" + trained
        )
    starts = f"{p.get('n_starts_converged')}/{p.get('n_starts')} starts converged"
    fixed = "".join(f", {k} pinned at {fmt_number(v)}" for k, v in (p.get("fixed") or {}).items())
    method = "varpro + full polish" if (p.get("optimizer") or {}).get("varpro") else "bfgs"
    return (
        f"  provenance: {len(p.get('runs', []))} runs, {len(p.get('points', []))} points, "
        f"{p.get('objective')} = {fmt_number(p.get('objective_value'))}, {method}, "
        f"{starts}{fixed}, FLOPs {p.get('flop_convention') or 'unknown'}, {p.get('version')}"
        + trained
    )


def warnings_of(record: FitRecord) -> list[str]:
    """`scaling.studies.fit_warnings.record_warnings` of a fit of a registered law (else none)."""
    law = LAWS.get(record.law)
    return record_warnings(record, law) if law is not None else []


def fit_as_dict(record: FitRecord) -> dict:
    return {
        "sweep": record.sweep,
        "law": record.law,
        "what": record.what,
        "curve": record.curve,
        "params": record.params,
        "intervals": record.intervals,
        "objective": record.objective,
        "converged": record.converged,
        "n_points": record.n_points,
        "selection": record.selection,
        "settings": record.settings,
        "provenance": record.provenance,
        "warnings": warnings_of(record),
    }


def fits_table(records: list[FitRecord], provenance: bool = False) -> str:
    """A text table: one row per curve, each parameter with its interval (and provenance)."""
    lines = []
    for (law, what), group in _group(records).items():
        lines.append(f"{law} fitted to {what}:")
        for r in group:
            cells = param_cells(r)
            flag = "" if r.converged else "  (not converged)"
            size = r.selection.get("n_params")
            label = f"{r.curve} N={size:,}" if size else r.curve
            lines.append(f"  {label:<24} " + "  ".join(cells) + f"  n={r.n_points}{flag}")
            lines.extend(f"    warning: {w}" for w in warnings_of(r))
            if provenance:
                lines.append(provenance_line(r))
        left_out = group[0].selection.get("left_out") or {}
        lines.extend(_left_out_lines(left_out))
    return "\n".join(lines)


def _left_out_lines(left_out: dict) -> list[str]:
    """One line per reason, naming its runs: a tuned grid leaves out dozens for one reason."""
    by_reason: dict[str, list[str]] = {}
    for run_id, reason in left_out.items():
        by_reason.setdefault(reason, []).append(run_id)
    return [
        f"  left out: {', '.join(ids)} ({reason})"
        if len(ids) == 1
        else f"  left out, {len(ids)} runs ({reason}): {', '.join(ids)}"
        for reason, ids in by_reason.items()
    ]


def _group(records):
    groups: dict = {}
    for r in records:
        groups.setdefault((r.law, r.what), []).append(r)
    return groups


def param_cells(record: FitRecord, equals: str = "=") -> list[str]:
    """'name=value [low, high]' for each fitted parameter (the interval where there is one)."""
    cells = []
    for k, v in record.params.items():
        cell = f"{k}{equals}{fmt_number(v)}"
        if k in record.intervals:
            low, high = record.intervals[k]
            cell += f" [{fmt_number(low)}, {fmt_number(high)}]"
        cells.append(cell)
    return cells


def fmt_number(v: float | None) -> str:
    """Four significant digits; 'nan' for a missing or non-finite value."""
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v:.4g}"
