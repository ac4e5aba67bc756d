"""The IsoFLOP figure: final loss against model size at fixed training budgets, one profile
per budget, each with its parabola in log N and that parabola's minimum N_opt(C).

Two ways to count a budget give its two kinds, drawn alike:

    isoflop        the trainer's FLOPs (6N + attention) and non-embedding N (Kaplan's
                   count); a size's final losses at several token budgets are
                   interpolated in log C to the shared levels, and the stored chinchilla
                   fit is drawn along each profile
    isoflop-total  C = 6 N_total D and every parameter (Chinchilla's count) on a grid
                   designed for it (scaling/studies/isoflop.py), with the exponents of
                   N_opt ~ C^a and D_opt ~ C^b
"""

from __future__ import annotations

import dataclasses

import numpy as np

from scaling.errors import UserError
from scaling.figures.plot_common import (
    CMAP,
    add_legend,
    colorbar,
    law_formula,
    log_norm,
    new_figure,
    predict,
    short,
)
from scaling.figures.plot_data import chinchilla_fit, final_points, flop_levels
from scaling.studies.isoflop import exponents, no_minimum, optimum, parabola_minimum, profiles


@dataclasses.dataclass(frozen=True)
class Curve:
    """One budget's profile as drawn: sizes ascending, their losses, which were measured
    (the others interpolated between a size's budgets)."""

    budget: float
    n: np.ndarray
    loss: np.ndarray
    measured: np.ndarray


def draw_kaplan(store, sweep, runs, plot, _run):
    """The `isoflop` kind: profiles at the trainer's FLOPs against non-embedding N."""
    curves = kaplan_curves(store, sweep, runs, plot)
    record = chinchilla_fit(store, sweep)
    fig, ax = _draw(
        curves,
        # The stored fit along each profile, with D = C / (6 N).
        law=None if record is None else ("chinchilla", record.params),
        n_label="non-embedding parameters $N$",
        budget_label="training compute $C$ (FLOPs)",
    )
    if record is not None:
        ax.plot(
            [],
            [],
            color="grey",
            ls="--",
            lw=1.0,
            label="chinchilla, $D = C/6N$: " + law_formula("chinchilla", record.params),
        )
    ax.set_title(f"{sweep}: IsoFLOP profiles (final loss at a fixed training budget)")
    add_legend(fig, ax)
    return fig


def draw_total(store, sweep, runs, plot, _run):
    """The `isoflop-total` kind: profiles at 6 N_total D against every parameter."""
    found = profiles(store, runs)
    if not found:
        raise UserError(f"sweep {sweep!r} has no budget 6 N_total D shared by 3 or more sizes")
    curves = [Curve(p.budget, p.n_total, p.loss, np.ones(len(p.n_total), bool)) for p in found]
    not_best = sum(len(p.not_best) for p in found)
    if not_best:
        plot.notes.append(
            f"isoflop-total: each size's best run per budget; {not_best} other run(s) of the "
            "same size and budget reached higher losses"
        )
    fig, ax = _draw(
        curves,
        law=None,
        n_label="parameters $N$ (total, embeddings included)",
        budget_label="training compute $C = 6ND$ (FLOPs)",
    )
    budgets, n_opt = optimum(found)
    plot.notes.extend(
        f"isoflop-total: {no_minimum(p)}; the exponents leave it out"
        for p in found
        if p.budget not in budgets
    )
    if len(budgets) >= 2:
        e = exponents(budgets, n_opt)
        plot.notes.append(f"isoflop-total: N_opt ~ C^{e['a']:.3f}, D_opt ~ C^{e['b']:.3f}")
        ax.plot(
            [],
            [],
            " ",
            label=f"$N_{{opt}} \\propto C^{{{e['a']:.2f}}}$, "
            f"$D_{{opt}} \\propto C^{{{e['b']:.2f}}}$",
        )
    ax.set_title(f"{sweep}: IsoFLOP profiles, $C = 6ND$")
    add_legend(fig, ax)
    return fig


def kaplan_curves(store, sweep, runs, plot) -> list[Curve]:
    """Each shared FLOP level's profile: a size's final loss at that level, measured when a
    run is within the level's tolerance, else interpolated in log C between its budgets."""
    points = final_points(store, runs, plot)
    by_size: dict[int, list] = {}
    for r, loss in points:
        by_size.setdefault(r.n_params, []).append((r.flops, loss, r.tokens))
    if not any(len({t for _, _, t in v}) > 1 for v in by_size.values()):
        budgets = sorted({short(r.tokens) for r, _ in points})
        raise UserError(
            f"sweep {sweep!r} has a single token budget per model size "
            f"(D = {', '.join(budgets) or 'none'}); isoflop needs several budgets "
            "per size: train each size for a few train.steps values"
        )
    levels, tolerance = flop_levels(points)
    curves = []
    for level in levels:
        profile = []  # (N, loss, measured?)
        for n, values in by_size.items():
            values = sorted(values)
            c = np.array([v[0] for v in values])
            y = np.array([v[1] for v in values])
            near = np.abs(np.log(c / level)) < np.log(tolerance)
            if near.any():
                profile.append((n, float(y[near][0]), True))
            elif c[0] < level < c[-1]:  # interpolate log L in log C between budgets
                profile.append(
                    (n, float(np.exp(np.interp(np.log(level), np.log(c), np.log(y)))), False)
                )
        if len(profile) >= 2:
            profile.sort()
            n, y, measured = (np.array(v) for v in zip(*profile, strict=True))
            curves.append(Curve(level, n, y, measured.astype(bool)))
    if not curves:
        raise UserError(
            f"sweep {sweep!r}: no FLOP budget is reached by two model sizes, so "
            "there is no IsoFLOP profile; give the sizes overlapping budgets"
        )
    return curves


def _draw(curves: list[Curve], *, law, n_label: str, budget_label: str):
    """Points (hollow where interpolated), each profile's parabola in log N through 3 or
    more points (a line through 2) and its minimum where it lies among the sizes, and
    `law` = (name, params) along each profile when given."""
    fig, ax = new_figure()
    norm = log_norm([c.budget for c in curves])
    for curve in curves:
        color = CMAP(norm(curve.budget))
        n, y, measured = curve.n, curve.loss, curve.measured
        ax.scatter(n[measured], y[measured], color=color, s=28, zorder=3)
        ax.scatter(n[~measured], y[~measured], facecolors="white", edgecolors=color, s=28, zorder=3)
        if len(n) < 3:
            ax.plot(n, y, color=color, lw=1.2)
        else:
            coeffs = np.polyfit(np.log(n), y, 2)
            grid = np.geomspace(n[0], n[-1], 100)
            ax.plot(grid, np.polyval(coeffs, np.log(grid)), color=color, lw=1.2)
            best = parabola_minimum(n, y)
            if best is not None and n[0] <= best <= n[-1]:
                ax.scatter(
                    [best],
                    [np.polyval(coeffs, np.log(best))],
                    marker="*",
                    s=120,
                    color=color,
                    edgecolors="black",
                    linewidths=0.5,
                    zorder=4,
                )
        if law is not None:
            grid = np.geomspace(n[0], n[-1], 100)
            xs = np.stack([grid, curve.budget / (6 * grid)], 1)
            ax.plot(grid, predict(law[0], law[1], xs), color=color, ls="--", lw=1.0)
    ax.scatter([], [], color="grey", s=28, label="final loss of a run")
    if not all(c.measured.all() for c in curves):
        ax.scatter(
            [],
            [],
            facecolors="white",
            edgecolors="grey",
            s=28,
            label="interpolated in log C between a size's budgets",
        )
    ax.plot([], [], color="grey", lw=1.2, label="parabola in $\\log N$ per budget")
    ax.scatter(
        [],
        [],
        marker="*",
        s=120,
        color="grey",
        edgecolors="black",
        linewidths=0.5,
        label="its minimum, $N_{opt}(C)$",
    )
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("final eval loss (nats/token)")
    colorbar(fig, ax, norm, budget_label)
    return fig, ax
