"""Where a fit came from, recorded with it: what `FitRecord.provenance` holds.

A fit is only as believable as what went into it, so every stored fit says:
the run ids and the points it used, the objective and its value, the
optimizer's settings, how many starts converged, the FLOP convention of the
runs' compute, and the project version (the git commit when the code is a
checkout, else the package version).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from scaling.errors import UserError
from scaling.store import FitRecord, Store


@functools.cache
def project_version() -> str:
    """`git:<commit>` of the checkout this code runs from, else `package:<version>`."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "package:" + metadata.version("scaling-suite")
    except metadata.PackageNotFoundError:
        return "unknown"


def fit_provenance(
    result, curve: int, *, x, y, mask, run_ids, fit_settings: dict, convention: str | None
) -> dict:
    """JSON-ready provenance of curve `curve` of a `scaling.fitting.fit.FitResult`.

    x [C, P, n_inputs], y [C, P], mask [C, P] are the arrays the fit saw;
    run_ids labels the curve's points (one id per valid point, or one for all).
    """
    valid = np.asarray(mask[curve], bool)
    return {
        "runs": list(run_ids),
        "points": [
            [*map(float, xi), float(yi)]
            for xi, yi in zip(np.asarray(x[curve])[valid], np.asarray(y[curve])[valid], strict=True)
        ],
        "objective": fit_settings.get("objective", "huber"),
        "objective_value": float(result.objective[curve]),
        "optimizer": {
            "method": "bfgs",
            **{k: v for k, v in fit_settings.items() if k != "objective"},
        },
        "n_starts": int(result.n_starts),
        "n_starts_converged": int(result.n_starts_converged[curve]),
        "converged": bool(result.converged[curve]),
        "fixed": {k: float(result.params[k][curve]) for k in result.fixed},
        "flop_convention": convention,
        "version": project_version(),
    }


def run_environments(store: Store, run_ids) -> list[dict]:
    """What the runs were trained with: each distinct environment of their latest starts
    (launch/environment.py), with how many of the runs it holds; runs that recorded none
    (trained before environments were recorded) are left out."""
    groups: dict[str, dict] = {}
    for run_id in dict.fromkeys(run_ids):
        starts = store.environments(run_id)
        if not starts:
            continue
        key = json.dumps(starts[-1], sort_keys=True)
        groups.setdefault(key, {**starts[-1], "runs": 0})["runs"] += 1
    return list(groups.values())


def environment_text(environment: dict) -> str:
    """'jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, ... on 1 cpu' for a line of output."""
    packages = ", ".join(f"{k} {v}" for k, v in environment.get("packages", {}).items())
    return f"{packages} on {environment.get('device_count')} {environment.get('device_kind')}"


def run_convention(runs, convention: str | None) -> str:
    """The one FLOP convention the runs' compute is read under; UserError when ambiguous."""
    if convention is not None:
        missing = [r.run_id for r in runs if convention not in (r.flops_by_convention or {})]
        if missing:
            known = sorted({c for r in runs for c in (r.flops_by_convention or {})})
            raise UserError(
                f"run {missing[0]} has no FLOP count under convention "
                f"{convention!r} (it has: {', '.join(known) or 'none'}); pick one "
                "of those with --convention"
            )
        return convention
    found = sorted({r.flop_convention for r in runs})
    if len(found) > 1:
        raise UserError(
            f"the runs count FLOPs under different conventions ({', '.join(found)});"
            " pass --convention CONV to read every run's compute under one"
        )
    return found[0] if found else None


def run_flops(run, convention: str) -> float:
    """The run's training FLOPs under `convention` (its own `flops` when that is its convention)."""
    if convention == run.flop_convention:
        return float(run.flops)
    return float(run.flops_by_convention[convention])


def fit_record(
    result,
    curve: int,
    *,
    sweep: str,
    what: str,
    label: str,
    selection: dict,
    settings: dict,
    x,
    y,
    mask,
    run_ids,
    fit_settings: dict,
    convention: str | None,
    extra: dict | None = None,
) -> FitRecord:
    """Curve `curve` of a `FitResult` as one FitRecord with its provenance (and `extra`
    provenance keys), not yet stored. Every curve fit is recorded through here, so no
    stored fit lacks where it came from."""
    provenance = fit_provenance(
        result,
        curve,
        x=x,
        y=y,
        mask=mask,
        run_ids=run_ids,
        fit_settings=fit_settings,
        convention=convention,
    )
    return FitRecord(
        sweep=sweep,
        law=result.law.name,
        what=what,
        curve=label,
        params={k: float(v[curve]) for k, v in result.params.items()},
        intervals={
            k: [float(v[curve][0]), float(v[curve][1])] for k, v in result.intervals.items()
        },
        objective=float(result.objective[curve]),
        converged=bool(result.converged[curve]),
        n_points=int(result.n_points[curve]),
        selection=selection,
        settings=settings,
        provenance=provenance | (extra or {}),
    )


def save_fit_result(store: Store, result, curve: int, *, run_ids, **record) -> FitRecord:
    """`fit_record` of curve `curve`, stored; returns the record with its fit id."""
    return store_fit(store, fit_record(result, curve, run_ids=run_ids, **record), run_ids)


def store_fit(store: Store, record: FitRecord, run_ids) -> FitRecord:
    """Save `record` with what every stored fit says of itself besides its method: the
    project version and what its runs were trained with; returns it with its fit id. Every
    fit reaches the store through here (curve fits through `save_fit_result`)."""
    provenance = {
        **record.provenance,
        "version": project_version(),
        "environments": run_environments(store, run_ids),
    }
    record = dataclasses.replace(record, provenance=provenance)
    return dataclasses.replace(record, fit_id=store.save_fit(record))
