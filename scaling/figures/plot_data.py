"""What the figures read from the store: final points, fits (stored or made now),
FLOP budgets, and the numerical helpers the figures share (envelope, power-law fit).

Functions that decide something the reader should know (a run left out, a fit
made now) add a line to the `plot.notes` they are given.
"""

from __future__ import annotations

import numpy as np

from scaling.errors import UserError
from scaling.store import RunRecord
from scaling.studies import analysis


def tokens_per_step(store, runs) -> float | None:
    """Tokens per step if every eval of every run agrees on it, else None."""
    ratios = []
    for r in runs:
        steps, tokens = store.scalars(r.run_id, "tokens")
        if not (steps > 0).any():
            return None
        ratios.extend(tokens[steps > 0] / steps[steps > 0])
    ratios = np.asarray(ratios)
    return float(ratios[0]) if np.allclose(ratios, ratios[0], rtol=1e-9) else None


def final_points(store, runs, plot) -> list[tuple[RunRecord, float]]:
    """(run, last eval loss) of the finished runs; the others are named in the notes."""
    points, left_out = [], []
    for r in runs:
        last = store.last_eval(r.run_id) if r.status == "finished" else None
        if last is None:
            left_out.append(f"{r.run_id} ({r.status})")
        else:
            points.append((r, last[1]))
    if left_out:
        plot.notes.append(f"{plot.kind}: left out {', '.join(left_out)}")
    return points


def flop_levels(points) -> tuple[list[float], float]:
    """(budgets, tolerance): an IsoFLOP design's budgets (those two or more sizes share, up
    to 15%); for a grid of sizes x token budgets, five log-spaced budgets across it (1%)."""
    shared = []
    for group in cluster([r.flops for r, _ in points], ratio=1.15):
        if len({r.n_params for r, _ in points if group[0] <= r.flops <= group[-1]}) >= 2:
            shared.append(float(np.exp(np.log(group).mean())))
    if shared:
        return shared, 1.15
    flops = [r.flops for r, _ in points]
    return list(np.geomspace(min(flops), max(flops), 7)[1:-1]), 1.01


def chinchilla_fit(store, sweep):
    """The newest stored chinchilla fit of the final losses, or None."""
    records = [r for r in stored_fits(store, sweep, "final", law="chinchilla") if r.curve == "all"]
    return records[0] if records else None


def stored_fits(store, sweep, what, law=None) -> list:
    """The newest stored fit of each (law, curve) of `what` (of `law`, or of any law)."""
    try:
        records = analysis.latest_fits(store, sweep, law)
    except UserError:
        return []
    return [r for r in records if r.what == what]


def by_curve(records) -> dict:
    """curve -> its newest fit, whichever law."""
    return {r.curve: r for r in sorted(records, key=lambda r: r.fit_id or 0)}


def stored_or_new_fits(store, sweep, law, what, plot, keep=None) -> list:
    """The stored fits of `what` that `keep` accepts (default: of `law`); if there are none,
    `law` is fitted now for the figure alone: drawing never writes to the store."""
    keep = keep or (lambda r: r.law == law)
    fits = [r for r in stored_fits(store, sweep, what) if keep(r)]
    if fits:
        laws = sorted({f.law for f in fits})
        plot.notes.append(
            f"{plot.kind}: drawing the stored {what} fits ({', '.join(laws)}, {len(fits)} curve(s))"
        )
        return fits
    try:
        records = analysis.fit_sweep(store, sweep, law, what, save=False)
    except UserError as e:
        plot.notes.append(f"{plot.kind}: no {what} fit stored and none could be made ({e})")
        return []
    plot.notes.append(
        f"{plot.kind}: no {what} fit is stored, so the {law} law was fitted now to "
        f"{len(records)} curve(s) for this figure only (`scaling fit --sweep {sweep} "
        f"--what {what} --law {law}` stores it)"
    )
    return records


def log_bins(n: int, count: int) -> list[tuple[int, int]]:
    """About `count` ranges (lo, hi) of token indices 1..n, inclusive, even on a log axis:
    single positions at the start, wider ranges later."""
    edges = np.unique(np.round(np.geomspace(1, n + 1, count + 1)).astype(int))
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def bin_means(y: np.ndarray, bins) -> tuple[np.ndarray, np.ndarray]:
    """(geometric centre, mean of y) of each bin, along y's last axis (index 1 = y[..., 0])."""
    centres = np.array([np.sqrt(lo * hi) for lo, hi in bins])
    means = np.stack([y[..., lo - 1 : hi].mean(axis=-1) for lo, hi in bins], axis=-1)
    return centres, means


def lower_envelope(curves, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The lowest y reached by any curve [(x, y), ...] at or before each x of a log grid,
    each curve interpolated in log-log between its points."""
    lo = min(x.min() for x, _ in curves)
    hi = max(x.max() for x, _ in curves)
    grid = np.geomspace(lo, hi, points)
    best = np.full(points, np.inf)
    for x, y in curves:
        order = np.argsort(x)
        inside = (grid >= x.min()) & (grid <= x.max())
        values = np.exp(np.interp(np.log(grid[inside]), np.log(x[order]), np.log(y[order])))
        best[inside] = np.minimum(best[inside], values)
    finite = np.isfinite(best)
    # A run that stopped at C1 still offers its loss at any C > C1: the
    # frontier is the best loss reachable with at most C, so it never rises.
    return grid[finite], np.minimum.accumulate(best[finite])


def fit_power(x, y) -> tuple[float, float]:
    """(x_c, alpha) of L = (x_c / x)^alpha by least squares in log-log space."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    alpha = -slope
    return float(np.exp(intercept / alpha)), float(alpha)


def cluster(values, ratio: float = 1.15) -> list[np.ndarray]:
    """Group sorted positive values whose neighbours are within `ratio` of each other."""
    values = np.sort(np.asarray(values, float))
    groups, current = [], [values[0]]
    for v in values[1:]:
        if v / current[-1] < ratio:
            current.append(v)
        else:
            groups.append(np.array(current))
            current = [v]
    groups.append(np.array(current))
    return groups
