"""What every figure of `scaling.figures.plots` shares: style, colours, law formulas, saving.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot), so
nothing global changes and no display is needed: PNG and SVG/PDF files are
written through the Agg-family canvases.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colors, ticker
from matplotlib.figure import Figure

from scaling.fitting.laws import LAWS, get_law

# Sized for a paper: 6.4 x 4.2 inches is a full text width; at that size the
# fonts below read as 8-10 pt.
FIGSIZE = (6.4, 4.2)
PNG_DPI = 160
STYLE = {
    "font.size": 10,
    "axes.labelsize": 10.5,
    "axes.titlesize": 10.5,
    "legend.fontsize": 8,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.framealpha": 0.9,
    "svg.fonttype": "none",  # text stays text in the SVG
    "pdf.fonttype": 42,
}
# Viridis without its last, pale yellow tenth, which vanishes on white.
CMAP = colors.ListedColormap(
    matplotlib.colormaps["viridis"](np.linspace(0.0, 0.88, 256)), name="viridis_dark"
)


# Axes a caller gave to draw on (`drawing_on`): builders draw there instead of
# on a new figure, and keep their legend inside it.
_TARGET_AXES = contextvars.ContextVar("target_axes", default=None)


@contextlib.contextmanager
def drawing_on(ax):
    """Within the block, `new_figure` returns (ax.figure, ax) when ax is not None."""
    token = _TARGET_AXES.set(ax)
    try:
        yield
    finally:
        _TARGET_AXES.reset(token)


def new_figure(figsize=FIGSIZE) -> tuple[Figure, object]:
    ax = _TARGET_AXES.get()
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def log_norm(values) -> colors.LogNorm:
    """A log colour scale over `values` (widened when they are all equal)."""
    values = np.asarray(values, float)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo * 1.0001:
        lo, hi = lo / 1.5, hi * 1.5
    return colors.LogNorm(vmin=lo, vmax=hi)


def colorbar(fig, ax, norm, label: str):
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=CMAP)
    bar = fig.colorbar(mappable, ax=ax, pad=0.02, fraction=0.05)
    bar.set_label(label)
    return bar


_NICE = (
    (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
    (1, 1.5, 2, 3, 4, 5, 6, 8),
    (1, 2, 3, 5, 7),
    (1, 2, 5),
)


def plain_log_axis(axis):
    """Log-scale ticks as plain numbers (2, 3, 5; or 2.2, 2.4 on a narrow range) where the
    range is under two decades."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi / lo < 100):
        return
    decades = 10.0 ** np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    choices = [[d * s for d in decades for s in subs if lo <= d * s <= hi] for subs in _NICE]
    choices = [t for t in choices if len(t) >= 2]
    if choices:
        ticks = next((t for t in choices if len(t) <= 8), choices[-1])
    else:  # a narrow range: evenly spaced round numbers, as on a linear axis
        ticks = [
            t
            for t in ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
            if lo <= t <= hi
        ]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plain_ticks(axis):
    """1, 10, 100 instead of 10^0, 10^1, 10^2 on a log axis of small counts."""
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))


def add_legend(fig, ax, loc: str = "best", max_inside: int = 6, **kwargs):
    """The axes' legend inside (at `loc`) when short; below the axes, in two columns, when
    long. Curves that fall from upper left to lower right leave the lower left free."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= max_inside or _TARGET_AXES.get() is not None:  # not the caller's figure
        ax.legend(loc=loc, **kwargs)
        return
    rows = -(-len(handles) // 2)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.17 * rows + 0.25)
    fig.legend(handles, labels, loc="outside lower center", ncol=2, **kwargs)


def legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    return [t.get_text() for legend in legends if legend for t in legend.get_texts()]


# Vector files without a creation date, so the same data gives the same file.
_NO_DATE = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def save(fig: Figure, out_dir: Path, name: str, vector: str = "svg") -> list[Path]:
    """Write `name`.png and `name`.`vector` into out_dir; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", vector):
        path = out_dir / f"{name}.{ext}"
        with matplotlib.rc_context(STYLE):
            fig.savefig(path, dpi=PNG_DPI if ext == "png" else None, metadata=_NO_DATE.get(ext))
        # The layout is solved once, by the first save; the second reuses it.
        fig.set_layout_engine("none")
        paths.append(path)
    return paths


def png_bytes(fig: Figure) -> bytes:

    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


# -- numbers and formulas ---------------------------------------------------


def num(v: float, digits: int = 3) -> str:
    """A number for mathtext: 3 significant digits, powers of ten for big or small ones."""
    if v is None or not math.isfinite(v):
        return "nan"
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits}g}"
    mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    exponent = int(exponent)
    if mantissa == "1":
        return f"10^{{{exponent}}}"
    return rf"{mantissa}\times10^{{{exponent}}}"


def law_formula(law: str, params: dict, var: str = "x") -> str:
    """The fitted law as a mathtext formula with its numbers, e.g. $L = 1.7 + 4.2\\,T^{-0.5}$.

    `var` names the input of one-input laws (N, T, S, C); two-input laws use
    their own names (N, D or N, S).
    """
    p = {k: num(v) for k, v in params.items()}
    if law == "saturating":
        # The exponent is written as fitted: a negative alpha shows as var^{+|alpha|}.
        body = rf"{p['E']} + {p['A']}\,{var}^{{{num(-params['alpha'])}}}"
    elif law == "power":
        body = rf"({p['x_c']}/{var})^{{{p['alpha']}}}"
    elif law == "chinchilla":
        body = rf"{p['E']} + {p['A']}/N^{{{p['alpha']}}} + {p['B']}/D^{{{p['beta']}}}"
    elif law == "kaplan_nd":
        ratio = num(params["alpha_N"] / params["alpha_D"])
        body = rf"[({p['N_c']}/N)^{{{ratio}}} + {p['D_c']}/D]^{{{p['alpha_D']}}}"
    elif law == "kaplan_ns":
        body = rf"({p['N_c']}/N)^{{{p['alpha_N']}}} + ({p['S_c']}/S)^{{{p['alpha_S']}}}"
    else:
        return f"{law}: " + ", ".join(f"{k} = ${v}$" for k, v in p.items())
    return f"$L = {body}$"


GREEK = {
    "alpha": r"\alpha",
    "beta": r"\beta",
    "alpha_N": r"\alpha_N",
    "alpha_D": r"\alpha_D",
    "alpha_S": r"\alpha_S",
}


def interval_text(record, name: str) -> str:
    """`α = 0.34, 95% CI [0.30, 0.38]` for parameter `name` of a stored fit."""
    value = record.params[name]
    text = f"${GREEK.get(name, name)} = {num(value)}$"
    if name in record.intervals:
        lo, hi = record.intervals[name]
        confidence = record.settings.get("confidence", 0.95)
        text += f", {confidence:.0%} CI [{num(lo)}, {num(hi)}]"
    return text


def predict(law: str, params: dict, x) -> np.ndarray:
    """The law's loss at inputs x ([n] for one-input laws, [n, 2] for two), as numpy."""
    return np.asarray(get_law(law).predict(params, np.asarray(x, float)), float)


def one_input(law: str) -> bool:
    return law in LAWS and LAWS[law].n_inputs == 1


# -- data helpers -----------------------------------------------------------


def short(n: float) -> str:
    """786k, 1.2M, 3.4B: a count for a label."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"
