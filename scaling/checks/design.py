"""Design checks: can a sweep answer its question, before anyone trains it?

`check_design` takes plain arrays, one entry per sweep member (N, D, C and
the eval steps), and returns warnings, each with the numbers behind it and
what to change.  It never refuses: a sweep may have reasons of its own.

The checks:
- N and D (nearly) collinear across members (|corr(log N, log D)| above
  COLLINEAR while both vary): a two-input law cannot tell the N exponent
  from the D exponent.
- IsoFLOP groups (members whose compute agrees within ISO_RATIO) whose sizes
  do not bracket the loss-minimising N: observed losses when given, else the
  Chinchilla fit's compute-optimal N (Epoch's parameters, or `prior`).
- Fewer distinct points than the law's parameters times MARGIN.
- Sizes spanning less than a decade (MIN_SPAN).
- Learning-curve fits: fewer than MIN_EVALS eval steps, or a gap between
  eval steps wider than 1 / MIN_PER_DECADE decades on a log axis.
"""

from __future__ import annotations

import numpy as np

from scaling.fitting.laws import chinchilla_optimum, get_law

COLLINEAR = 0.95
ISO_RATIO = 1.1
MARGIN = 3
MIN_SPAN = 10.0
MIN_EVALS = 8
MIN_PER_DECADE = 3.0
# Epoch AI's replication of Hoffmann et al. (2022), approach 3.
EPOCH_PRIOR = {"E": 1.817, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3659}


def check_design(
    n, d, c, eval_steps=None, *, law: str = "chinchilla", losses=None, prior: dict | None = None
) -> list[str]:
    """Warnings (empty when the design is sound) for members with N [M], D [M], C [M] FLOPs.

    eval_steps: per member, the steps it evaluates at (for learning-curve
    fits); losses: per member, its final loss if known.
    """
    n, d, c = (np.asarray(a, float).reshape(-1) for a in (n, d, c))
    warnings = []
    warnings += _collinear(n, d)
    warnings += _isoflop(n, c, losses, prior or EPOCH_PRIOR)
    warnings += _too_few_points(n, d, get_law(law))
    warnings += _span(n)
    if eval_steps is not None:
        warnings += _eval_points(eval_steps, get_law("saturating"))
    return warnings


def _collinear(n, d):
    ln, ld = np.log(n), np.log(d)
    if len(n) < 3 or np.ptp(ln) < 1e-3 or np.ptp(ld) < 1e-3:
        return []
    r = float(np.corrcoef(ln, ld)[0, 1])
    if abs(r) <= COLLINEAR:
        return []
    return [
        f"N and D are collinear across the {len(n)} members (corr(log N, log D) = {r:.3f}):"
        " the N and D exponents cannot be separated; give some sizes several token budgets"
        " (or an IsoFLOP design) so D varies independently of N"
    ]


def iso_groups(c, ratio: float = ISO_RATIO) -> list[np.ndarray]:
    """Indices of members whose compute agrees within `ratio` (sorted by C)."""
    order = np.argsort(c)
    groups, current = [], [order[0]] if len(c) else []
    for i in order[1:]:
        if c[i] <= c[current[0]] * ratio:
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    if current:
        groups.append(np.array(current))
    return groups


def _isoflop(n, c, losses, prior):
    warnings = []
    for group in iso_groups(c):
        sizes = np.unique(n[group])
        if len(sizes) < 3:
            continue
        compute = float(np.median(c[group]))
        if losses is not None:
            loss = np.asarray(losses, float)[group]
            best = float(n[group][np.argmin(loss)])
            where = f"the lowest observed loss is at N = {best:.3g}"
            inside = sizes[0] < best < sizes[-1]
        else:
            best = float(chinchilla_optimum(prior, compute)[0])
            where = f"the prior's loss-optimal N is {best:.3g}"
            inside = sizes[0] < best < sizes[-1]
        if not inside:
            warnings.append(
                f"IsoFLOP group at C = {compute:.3g} FLOPs has sizes {sizes[0]:.3g} to "
                f"{sizes[-1]:.3g} but {where}: the group does not bracket its minimum; "
                "add sizes beyond it so the parabola's vertex lies inside"
            )
    return warnings


def _too_few_points(n, d, law):
    points = len({(a, b) for a, b in zip(n, d, strict=True)})
    need = MARGIN * len(law.param_names)
    if points >= need:
        return []
    return [
        f"{points} distinct (N, D) points for law {law.name!r} with "
        f"{len(law.param_names)} parameters: fewer than {MARGIN} x {len(law.param_names)} = "
        f"{need}; the fit will follow the noise; add members"
    ]


def _span(n):
    if not len(n):
        return []
    span = float(n.max() / n.min())
    if span >= MIN_SPAN:
        return []
    return [
        f"sizes span only {span:.2g}x (N {n.min():.3g} to {n.max():.3g}), less than a "
        "decade: an exponent fitted over so short a range is poorly determined; widen "
        "the ladder"
    ]


def _eval_points(eval_steps, law):
    want = max(MIN_EVALS, MARGIN * len(law.param_names))
    sparse = []
    for i, steps in enumerate(eval_steps):
        steps = np.unique(np.asarray(steps, float))
        steps = steps[steps > 0]
        decades = float(np.log10(steps[-1] / steps[0])) if len(steps) > 1 else 0.0
        # Density where the axis is sparsest: 1 / the widest gap, in decades.
        gaps = np.diff(np.log10(steps))
        per_decade = 1.0 / gaps.max() if len(gaps) else 0.0
        if len(steps) < want or per_decade < MIN_PER_DECADE:
            sparse.append((i, len(steps), per_decade, decades))
    if not sparse:
        return []
    i, count, per_decade, decades = sparse[0]
    return [
        f"{len(sparse)} of {len(eval_steps)} members evaluate too rarely for a "
        f"learning-curve fit (member {i}: {count} steps over {decades:.1f} decades, "
        f"{per_decade:.1f} per decade where sparsest; want >= {want} and >= "
        f"{MIN_PER_DECADE:g} per decade); raise eval.points"
    ]
