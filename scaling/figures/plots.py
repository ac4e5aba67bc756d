"""Figures of a sweep, drawn from the store, sized and labelled for a paper.

    per-token        per-token eval loss (last eval) against token index T, one
                     line per model size with its fitted L = E + A T^-alpha
                     (Kaplan et al. 2020, Fig. 20 left)
    per-token-steps  one run's per-token loss against step, one line per token
                     index T (Fig. 20 right)
    learning-curves  eval loss against step, tokens on the top axis, one line per size
    size             final loss against N with the stored final fits and their exponent
    compute          loss against training FLOPs for every run, the compute-efficient
                     frontier and a power law fitted to it
    isoflop          final loss against N at fixed FLOP budgets (sweeps with several
                     token budgets per size), scaling/figures/isoflop.py
    isoflop-total    the same at budgets 6 N_total D of an IsoFLOP grid (by name only)

`plot_sweep(store, sweep, kind, out_dir)` writes KIND.png and KIND.svg (or
.pdf) and returns what it drew; `make_plot` builds one figure without
saving it. Each `Plot` carries its legend texts (the fitted formulas) and
notes for the user: where the fits came from, what was left out and why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from scaling.errors import UserError
from scaling.figures import isoflop
from scaling.figures.plot_common import (
    CMAP,
    STYLE,
    add_legend,
    colorbar,
    drawing_on,
    interval_text,
    law_formula,
    legend_texts,
    log_norm,
    new_figure,
    num,
    one_input,
    plain_log_axis,
    plain_ticks,
    predict,
    save,
    short,
)
from scaling.figures.plot_data import (
    bin_means,
    by_curve,
    final_points,
    fit_power,
    log_bins,
    lower_envelope,
    stored_fits,
    stored_or_new_fits,
    tokens_per_step,
)
from scaling.store import Store, sweep_runs

KINDS = ("per-token", "per-token-steps", "learning-curves", "size", "compute", "isoflop")
# Drawn when asked for by name, not by "all": the same profiles as "isoflop", under
# Chinchilla's count of budgets and parameters, for a grid designed for it.
BY_NAME = ("isoflop-total",)
VECTOR_FORMATS = ("svg", "pdf")
N_LABEL = "non-embedding parameters $N$"
LOSS_LABEL = "eval loss (nats/token)"


@dataclasses.dataclass
class Plot:
    kind: str
    figure: Figure | None = None
    legend: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    paths: list[Path] = dataclasses.field(default_factory=list)
    skipped: str | None = None  # why `all` left this kind out


def plot_sweep(
    store: Store,
    sweep: str,
    kind: str,
    out_dir: str | Path | None = None,
    *,
    run: str | None = None,
    vector: str = "svg",
) -> list[Plot]:
    """Draw `kind` (or every kind that applies, for "all") and save each as PNG + vector."""
    if kind != "all":
        _check_kind(kind)
    if vector not in VECTOR_FORMATS:
        raise UserError(f"vector format {vector!r} is not one of {', '.join(VECTOR_FORMATS)}")
    runs = sweep_runs(store, sweep)
    if run is not None and run not in {r.run_id for r in runs}:
        raise UserError(
            f"run {run!r} is not in sweep {sweep!r}; its runs: " + ", ".join(r.run_id for r in runs)
        )
    out = Path(out_dir) if out_dir is not None else Path("results/plots") / sweep
    plots = []
    for k in KINDS if kind == "all" else (kind,):
        try:
            plot = make_plot(store, sweep, k, run=run)
        except UserError as e:
            if kind != "all":
                raise
            plots.append(Plot(k, skipped=str(e)))
            continue
        plot.paths = save(plot.figure, out, k, vector)
        plots.append(plot)
    return plots


def make_plot(store: Store, sweep: str, kind: str, *, run: str | None = None, ax=None) -> Plot:
    """One figure of `sweep` (drawn onto `ax` when given); raises UserError when the
    sweep's data does not allow it."""
    _check_kind(kind)
    runs = sweep_runs(store, sweep)
    plot = Plot(kind)
    with matplotlib.rc_context(STYLE), drawing_on(ax):
        plot.figure = _BUILDERS[kind](store, sweep, runs, plot, run)
    plot.legend = legend_texts(plot.figure)
    return plot


def _check_kind(kind):
    if kind not in KINDS + BY_NAME:
        raise UserError(
            f"unknown plot kind {kind!r}; use one of {', '.join(KINDS + BY_NAME)}, or all"
        )


# -- per-token loss (Kaplan Fig. 20) ------------------------------------------


def _per_token(store, sweep, runs, plot, _run):
    curves = []
    for r in runs:
        steps, losses = store.per_token(r.run_id)
        if len(steps) and r.status != "failed":
            curves.append((r, losses[-1].astype(float)))
    if not curves:
        raise UserError(
            f"sweep {sweep!r} has no per-token eval losses yet; "
            "train it with `scaling sweep CONFIG`"
        )
    fits = by_curve(stored_or_new_fits(store, sweep, "saturating", "per-token", plot))
    fig, ax = new_figure()
    norm = log_norm([r.n_params for r, _ in curves])
    unfitted = []
    for r, y in curves:
        color = CMAP(norm(r.n_params))
        T = np.arange(1, len(y) + 1)
        # A finite eval set leaves each position noisy: the mean over log-spaced
        # bins of T shows the trend, every position stays faint behind it.
        bins = log_bins(len(y), 24)
        if len(bins) < len(y):
            ax.plot(T, y, color=color, lw=0.5, alpha=0.25)
        ax.plot(*bin_means(y, bins), color=color, lw=1.4, marker="o", ms=2.5)
        record = fits.get(r.run_id)
        if record is None:
            unfitted.append(r.run_id)
            continue
        ax.plot(
            T,
            predict("saturating", record.params, T),
            color=color,
            ls="--",
            lw=1.6,
            label=f"{r.run_id} ({short(r.n_params)}): "
            + law_formula("saturating", record.params, "T"),
        )
    if unfitted:
        plot.notes.append(f"per-token: no fit stored for {', '.join(unfitted)} (data only)")
    ax.set_xscale("log")
    ax.set_xlim(1, max(len(y) for _, y in curves))
    plain_ticks(ax.xaxis)
    ax.set_xlabel("token index $T$ (position in the context)")
    ax.set_ylabel("per-token " + LOSS_LABEL)
    ax.set_title(
        f"{sweep}: per-token loss at the last eval\n"
        r"solid: mean over log-spaced bins of $T$; faint: each $T$; dashed: fitted "
        r"$L = E + A\,T^{-\alpha}$",
        fontsize="small",
    )
    colorbar(fig, ax, norm, N_LABEL)
    add_legend(fig, ax, max_inside=3, title="run (N): fitted law")
    return fig


def _per_token_steps(store, sweep, runs, plot, run):
    if run is None:
        candidates = [r for r in runs if len(store.per_token(r.run_id)[0])]
        if not candidates:
            raise UserError(
                f"sweep {sweep!r} has no per-token eval losses yet; "
                "train it with `scaling sweep CONFIG`"
            )
        target = candidates[-1]  # runs come smallest N first
        plot.notes.append(
            f"per-token-steps: run {target.run_id}, the largest with per-token "
            "data (choose another with --run RUN_ID)"
        )
    else:
        target = next((r for r in runs if r.run_id == run), None)
        if target is None:
            raise UserError(
                f"run {run!r} is not in sweep {sweep!r}; its runs: "
                + ", ".join(r.run_id for r in runs)
            )
    steps, losses = store.per_token(target.run_id)
    keep = steps > 0
    steps, losses = steps[keep], losses[keep].astype(float)
    if not len(steps):
        raise UserError(f"run {target.run_id!r} has no per-token eval losses yet")
    n_ctx = losses.shape[1]
    centres, means = bin_means(losses, log_bins(n_ctx, 10))
    norm = log_norm([1, n_ctx])
    fig, ax = new_figure()
    for centre, curve in zip(centres, means.T, strict=True):
        ax.plot(steps, curve, color=CMAP(norm(centre)), lw=1.3, marker="o", ms=2.5)
    ax.plot(
        steps,
        losses.mean(axis=1),
        color="black",
        ls="--",
        lw=1.2,
        label="mean over all $T$ (the eval loss)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("training step")
    ax.set_ylabel("per-token " + LOSS_LABEL)
    ax.set_title(
        f"{sweep}: run {target.run_id}, N = {short(target.n_params)}, per-token loss over training"
    )
    add_legend(fig, ax, "lower left")
    plain_ticks(colorbar(fig, ax, norm, "token index $T$ (mean over log-spaced bins)").ax.yaxis)
    return fig


# -- learning curves ----------------------------------------------------------


def _learning_curves(store, sweep, runs, plot, _run):
    curves = [(r, *store.scalars(r.run_id, "eval_loss")) for r in runs]
    curves = [(r, s[s > 0], y[s > 0]) for r, s, y in curves if (s > 0).any()]
    if not curves:
        raise UserError(
            f"sweep {sweep!r} has no eval losses yet; train it with `scaling sweep CONFIG`"
        )
    fits = by_curve(stored_fits(store, sweep, "learning-curve"))
    fig, ax = new_figure()
    norm = log_norm([r.n_params for r, _, _ in curves])
    for r, steps, y in curves:
        color = CMAP(norm(r.n_params))
        ax.plot(
            steps,
            y,
            color=color,
            lw=1.5,
            ls=":" if r.status == "failed" else "-",
            marker="o",
            ms=2.5,
        )
        record = fits.get(r.run_id)
        if record is not None and one_input(record.law):
            s = np.geomspace(steps[0], steps[-1], 200)
            ax.plot(
                s,
                predict(record.law, record.params, s),
                color=color,
                ls="--",
                lw=1.1,
                label=f"{r.run_id}: " + law_formula(record.law, record.params, "S"),
            )
    if any(r.status == "failed" for r, _, _ in curves):
        ax.plot([], [], color="grey", ls=":", label="failed run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("training step $S$")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"{sweep}: learning curves")
    per_step = tokens_per_step(store, [r for r, _, _ in curves])
    if per_step is None:
        plot.notes.append(
            "learning-curves: the runs differ in tokens per step (or did not "
            "log tokens), so there is no token axis"
        )
    else:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel(f"tokens seen ({short(per_step)} per step)")
    colorbar(fig, ax, norm, N_LABEL)
    add_legend(fig, ax, "lower left", max_inside=3)
    return fig


# -- final loss against model size ------------------------------------------


def _size(store, sweep, runs, plot, _run):
    points = final_points(store, runs, plot)
    if len(points) < 2:
        raise UserError(
            f"sweep {sweep!r} has {len(points)} finished run(s) with an eval loss; "
            "the size plot needs two or more"
        )
    N = np.array([r.n_params for r, _ in points], float)
    L = np.array([loss for _, loss in points])
    D = np.array([r.tokens for r, _ in points], float)
    keep = lambda r: one_input(r.law) and r.curve == "all"  # noqa: E731
    fig, ax = new_figure()
    if len(np.unique(D)) > 1:
        # A law of N alone would mix the budgets: draw stored fits, fit none.
        fits = [r for r in stored_fits(store, sweep, "final") if keep(r)]
        norm = log_norm(D)
        ax.scatter(
            N, L, c=D, cmap=CMAP, norm=norm, s=30, zorder=3, edgecolors="black", linewidths=0.4
        )
        colorbar(fig, ax, norm, "token budget $D$ (tokens)")
        plot.notes.append(
            "size: the runs have several token budgets, which a law of N alone "
            "mixes; "
            + ("drawing the stored fits anyway" if fits else "no fit drawn (see the isoflop plot)")
        )
    else:
        fits = stored_or_new_fits(store, sweep, "saturating", "final", plot, keep=keep)
        ax.scatter(
            N, L, color="black", s=30, zorder=3, label=f"finished runs (D = {short(D[0])} tokens)"
        )
    grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 200)
    for record, color, ls in zip(
        fits,
        ("tab:red", "tab:blue", "tab:green", "tab:orange"),
        ("-", "--", "-.", ":"),
        strict=False,
    ):
        label = f"{record.law}: {law_formula(record.law, record.params, 'N')}"
        if "alpha" in record.params:
            label += "\n" + interval_text(record, "alpha")
        ax.plot(
            grid, predict(record.law, record.params, grid), color=color, ls=ls, lw=1.5, label=label
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_axis(ax.yaxis)
    ax.set_xlabel(N_LABEL)
    ax.set_ylabel("final " + LOSS_LABEL)
    ax.set_title(f"{sweep}: final loss against model size")
    add_legend(fig, ax, "lower left")
    return fig


# -- compute ------------------------------------------------------------------


def _compute(store, sweep, runs, plot, _run):
    curves = []
    for r in runs:
        f_steps, flops = store.scalars(r.run_id, "flops")
        l_steps, loss = store.scalars(r.run_id, "eval_loss")
        _, fi, li = np.intersect1d(f_steps, l_steps, return_indices=True)
        keep = flops[fi] > 0
        if keep.any():
            curves.append((r, flops[fi][keep], loss[li][keep]))
    if not curves:
        raise UserError(
            f"sweep {sweep!r} has no eval losses with FLOPs yet; train it with "
            "`scaling sweep CONFIG`"
        )
    fig, ax = new_figure()
    norm = log_norm([r.n_params for r, _, _ in curves])
    for r, c, y in curves:
        ax.plot(
            c,
            y,
            color=CMAP(norm(r.n_params)),
            lw=1.2,
            alpha=0.9,
            ls=":" if r.status == "failed" else "-",
        )
    healthy = [(c, y) for r, c, y in curves if r.status != "failed"] or [
        (c, y) for _, c, y in curves
    ]
    fx, fy = lower_envelope(healthy)
    ax.plot(
        fx,
        fy,
        color="black",
        lw=4,
        alpha=0.2,
        solid_capstyle="round",
        label="compute-efficient frontier (lower envelope)",
    )
    # Fit where the frontier is made of trained models: from the cheapest
    # run's final budget on (before it, the frontier is early training).
    region = fx >= min(c[-1] for c, _ in healthy)
    if region.sum() < 10:
        region = np.arange(len(fx)) >= len(fx) // 2
    c_c, alpha = fit_power(fx[region], fy[region])
    grid = fx[region]
    ax.plot(
        grid,
        (c_c / grid) ** alpha,
        color="tab:red",
        ls="--",
        lw=1.5,
        label=f"frontier fit for $C \\geq {num(grid[0])}$: "
        + law_formula("power", {"x_c": c_c, "alpha": alpha}, "C"),
    )
    plot.notes.append(
        f"compute: power law fitted to the frontier for C >= {grid[0]:.3g} "
        f"(least squares in log-log): alpha_C = {alpha:.4g}"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.autoscale_view()
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("training compute $C$ (FLOPs)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(f"{sweep}: loss against compute")
    colorbar(fig, ax, norm, N_LABEL)
    add_legend(fig, ax, "lower left")
    return fig


_BUILDERS = {
    "per-token": _per_token,
    "per-token-steps": _per_token_steps,
    "learning-curves": _learning_curves,
    "size": _size,
    "compute": _compute,
    "isoflop": isoflop.draw_kaplan,
    "isoflop-total": isoflop.draw_total,
}
