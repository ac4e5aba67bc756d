"""The IsoFLOP profiles of a grid at budgets C = 6 N_total D (Chinchilla's count): final
loss against total N per budget, each budget's parabola in log N and its minimum, and the
exponents of N_opt(C) and D_opt(C) (scaling/studies/isoflop.py computes them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scaling.errors import UserError
from scaling.figures.plot_common import CMAP, add_legend, colorbar, log_norm, new_figure, save
from scaling.store import Store, sweep_runs
from scaling.studies.isoflop import exponents, optimum, parabola_minimum, profiles


def plot_isoflop(store: Store, sweep: str, out_dir, vector: str = "svg") -> tuple[list, list]:
    """Draw the profiles into out_dir/isoflop-total.png (+ vector); returns (paths, notes)."""
    notes: list[str] = []
    fig = draw(store, sweep, sweep_runs(store, sweep), notes)
    return save(fig, Path(out_dir), "isoflop-total", vector), notes


def draw(store, sweep, runs, notes: list):
    """Figure: final loss against total N per budget, parabolas, minima and N_opt(C)."""
    found = profiles(store, runs)
    if not found:
        raise UserError(f"sweep {sweep!r} has no budget 6 N_total D shared by 3 or more sizes")
    fig, ax = new_figure()
    norm = log_norm([p.budget for p in found])
    for p in found:
        color = CMAP(norm(p.budget))
        ax.scatter(p.n_total, p.loss, color=color, s=28, zorder=3)
        coeffs = np.polyfit(np.log(p.n_total), p.loss, 2)
        grid = np.geomspace(p.n_total[0], p.n_total[-1], 100)
        ax.plot(grid, np.polyval(coeffs, np.log(grid)), color=color, lw=1.2)
        best = parabola_minimum(p.n_total, p.loss)
        if best is not None and p.n_total[0] <= best <= p.n_total[-1]:
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
    ax.scatter([], [], color="grey", s=28, label="final loss of a run")
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
    budgets, n_opt = optimum(found)
    if len(budgets) >= 2:
        e = exponents(budgets, n_opt)
        notes.append(f"isoflop-total: N_opt ~ C^{e['a']:.3f}, D_opt ~ C^{e['b']:.3f}")
        ax.plot(
            [],
            [],
            " ",
            label=f"$N_{{opt}} \\propto C^{{{e['a']:.2f}}}$, "
            f"$D_{{opt}} \\propto C^{{{e['b']:.2f}}}$",
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters $N$ (total, embeddings included)")
    ax.set_ylabel("final eval loss (nats/token)")
    ax.set_title(f"{sweep}: IsoFLOP profiles, $C = 6ND$")
    colorbar(fig, ax, norm, "training compute $C = 6ND$ (FLOPs)")
    add_legend(fig, ax)
    return fig
