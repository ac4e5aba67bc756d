"""The one entry point that fits a sweep of the store and saves the fits: what `scaling fit
--sweep` and `notebook.fit_sweep` both call.

`what` picks the selection and the method: final, per-token and learning-curve fit a law to
curves (analysis.py); isoflop is Chinchilla's approach 2 on a grid (isoflop.py, law
compute_optimal); critical-batch fits B_crit(L) from the noise scale, then L(N, S_min)
(critical_batch.py, law b_crit).
"""

from __future__ import annotations

from scaling.errors import UserError
from scaling.store import FitRecord, Store
from scaling.studies import analysis, critical_batch, isoflop


def kind_of(law: str, what: str) -> str:
    """ "isoflop", "critical-batch" or "curves"; UserError for a law and selection that do not
    go together."""
    if "isoflop" in (what, law) or law == isoflop.LAW:
        if law != isoflop.LAW or what != isoflop.WHAT:
            raise UserError(f"--what isoflop goes with --law {isoflop.LAW}")
        return "isoflop"
    if "critical-batch" in (what, law) or law == "b_crit":
        if law != "b_crit":
            raise UserError(
                "--what critical-batch fits law b_crit (then kaplan_ns on S_min); give --law b_crit"
            )
        return "critical-batch"
    return "curves"


def fit_study(
    store: Store,
    sweep: str,
    law: str,
    what: str = "final",
    *,
    bootstrap: int = 200,
    objective: str = "huber",
    fixed: dict | None = None,
    convention: str | None = None,
    varpro: bool = False,
    keep_starts: int | None = None,
    resample: str | None = None,
) -> list[FitRecord]:
    """Fit `law` to the selection `what` of `sweep`; saves and returns the records. The
    isoflop and critical-batch methods take `bootstrap` (and critical-batch `objective`)
    only; the rest are `analysis.fit_sweep`'s."""
    kind = kind_of(law, what)
    if kind == "isoflop":
        return [isoflop.fit_isoflop(store, sweep, bootstrap=bootstrap)]
    if kind == "critical-batch":
        return critical_batch.fit_critical_batch(
            store, sweep, bootstrap=bootstrap, objective=objective
        )
    return analysis.fit_sweep(
        store,
        sweep,
        law,
        what,
        bootstrap=bootstrap,
        objective=objective,
        fixed=fixed,
        convention=convention,
        varpro=varpro,
        keep_starts=keep_starts,
        resample=resample,
    )
