"""Fits a researcher must not read as results: the checks beside every printed fit.

A fit can converge and still say nothing: an irreducible loss driven to its
bound 0 (E = 1e-11 means "the data cannot separate E from the power law",
not "the loss goes to zero"), an interval spanning more than a factor of ten,
too few points for the parameters, or a per-token curve that rises with the
position T, where no `E + A T^-alpha` is the law the model follows.
`fit_warnings` returns one line for each, for `scaling fit`, `scaling query`
(text and JSON) and the HTML report.

`per_token_bins` and `rises` are the monotonicity check of a per-token loss
curve over log2 bins of T; the tests, the fit warnings and the study's own
checks all use these two functions.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# A coefficient (E, A, B) below this fraction of the largest loss is at its bound 0.
AT_BOUND = 1e-4
# An interval [lo, hi] with hi / lo above this says the data do not pin the parameter.
WIDE_RATIO = 10.0
MIN_POINTS_PER_PARAM = 3
# A per-token bin may sit this far above the one before it (nats) before the curve "rises";
# bins from the one starting at RISE_FROM on are checked.
RISE_TOLERANCE = 0.03
RISE_FROM = 4


@dataclasses.dataclass(frozen=True)
class Bin:
    """Positions T in [lo, hi] (inclusive), their mean loss and its standard error."""

    lo: int
    hi: int
    mean: float
    stderr: float

    @property
    def label(self) -> str:
        return f"T={self.lo}" if self.lo == self.hi else f"T={self.lo}-{self.hi}"


def per_token_bins(losses_L, stderr_L=None) -> list[Bin]:
    """Log2 bins of the positions T = 1..L: [1], [2, 3], [4, 7], ...

    A last bin narrower than half of the one before it is merged into it, so
    for L = 128 the last bin is T = 64..128. The standard error of a bin's
    mean treats its positions' errors as independent (NaN when unknown).
    """
    losses = np.asarray(losses_L, float)
    errors = np.full_like(losses, np.nan) if stderr_L is None else np.asarray(stderr_L, float)
    n = len(losses)
    edges = [1]
    while edges[-1] * 2 <= n:
        edges.append(edges[-1] * 2)
    edges.append(n + 1)
    if len(edges) > 2 and edges[-1] - edges[-2] < (edges[-2] - edges[-3]) / 2:
        del edges[-2]
    bins = []
    for lo, end in zip(edges[:-1], edges[1:], strict=True):
        part = slice(lo - 1, end - 1)
        k = end - lo
        bins.append(
            Bin(
                lo,
                end - 1,
                float(losses[part].mean()),
                float(np.sqrt(np.sum(errors[part] ** 2)) / k),
            )
        )
    return bins


def rises(
    bins: list[Bin], tolerance: float = RISE_TOLERANCE, start: int = RISE_FROM
) -> list[tuple[Bin, Bin]]:
    """(bin before, bin) pairs where a bin from T >= start on is more than `tolerance`
    nats above the bin before it: the curve rises with T there."""
    return [
        (before, after)
        for before, after in zip(bins[:-1], bins[1:], strict=True)
        if after.lo >= start and after.mean > before.mean + tolerance
    ]


def fit_warnings(
    law, params: dict, intervals: dict, n_points: int, y=None, what: str | None = None, x=None
) -> list[str]:
    """One line per reason not to read the fit as a result (none: the fit is determined).

    law: the fitted `scaling.fitting.laws.Law`; params, intervals: the fit's values
    and 95% intervals by name; y: the losses it was fitted to (for the bound
    check); what: the selection ("per-token" also checks that the curve falls
    with T, from x and y).
    """
    warnings = []
    fitted = [k for k in law.param_names if k in intervals or k in params]
    y_max = float(np.max(y)) if y is not None and len(y) else None
    coefficients = set(law.linear[0]) if law.linear else set()
    for name in fitted:
        value = params.get(name)
        if value is None or not math.isfinite(value):
            warnings.append(f"{name} is not finite: the fit did not find a minimum")
            continue
        if name in coefficients and y_max and value < AT_BOUND * y_max:
            warnings.append(
                f"{name} = {value:.3g} is at its bound 0: the data do not identify "
                f"it; fit a law without {name} (e.g. power) or add points"
            )
            continue
        low, high = intervals.get(name, (None, None))
        if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
            continue
        if name in law.positive or (low > 0 and high > 0):
            if low <= 0 or high / low > WIDE_RATIO:
                span = "reaches 0" if low <= 0 else f"spans {high / low:.0f}x"
                warnings.append(
                    f"{name}'s 95% interval [{low:.3g}, {high:.3g}] {span}: the data do not pin it"
                )
        elif low < 0 < high and abs(value) > 0 and max(-low, high) / abs(value) > WIDE_RATIO:
            warnings.append(f"{name}'s 95% interval [{low:.3g}, {high:.3g}] spans zero")
    n_fitted = len(fitted)
    if n_fitted and n_points < MIN_POINTS_PER_PARAM * n_fitted:
        warnings.append(
            f"{n_points} points for {n_fitted} parameters (fewer than "
            f"{MIN_POINTS_PER_PARAM} per parameter): the fit can follow the noise"
        )
    if what == "per-token" and y is not None and len(y) >= 2 * RISE_FROM:
        order = (
            np.argsort(np.asarray(x, float).reshape(len(y), -1)[:, 0])
            if x is not None
            else np.arange(len(y))
        )
        up = rises(per_token_bins(np.asarray(y, float)[order]))
        if up:
            before, after = up[0]
            warnings.append(
                f"the per-token loss rises with T ({after.label} is "
                f"{after.mean - before.mean:+.3f} nats against {before.label}): "
                "no E + A T^-alpha describes it"
            )
    return warnings


def record_warnings(record, law) -> list[str]:
    """`fit_warnings` of a stored fit (`scaling.store.FitRecord`), from its provenance."""
    points = np.asarray(record.provenance.get("points") or [], float)
    x = points[:, :-1] if points.size else None
    y = points[:, -1] if points.size else None
    return fit_warnings(
        law, record.params, record.intervals, record.n_points, y=y, what=record.what, x=x
    )
