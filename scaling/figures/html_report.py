"""One self-contained HTML page per sweep: figures, runs, fits and configs.

`write_report(store, sweep, path)` writes a page that opens from disk in
any browser, with no server and nothing fetched: the figures are embedded
as base64 PNG, the style is inline, and there is no script.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from pathlib import Path

from scaling.errors import UserError
from scaling.figures.plot_common import png_bytes
from scaling.figures.plots import KINDS, make_plot
from scaling.store import Store, sweep_runs
from scaling.studies.analysis import latest_fits, param_cells, warnings_of

DESCRIPTIONS = {
    "per-token": "Per-token eval loss at the last eval against the token's position T in "
    "the context, one line per run, with the fitted L = E + A T^-alpha dashed "
    "(Kaplan et al. 2020, Fig. 20 left).",
    "per-token-steps": "Per-token loss of the largest run over training, one line per token "
    "index T (Kaplan et al. 2020, Fig. 20 right).",
    "learning-curves": "Eval loss against training step (tokens on the top axis).",
    "size": "Final eval loss against non-embedding parameters N, with the fitted law and its "
    "exponent's bootstrap interval.",
    "compute": "Eval loss against training FLOPs for every run, the compute-efficient frontier "
    "(lower envelope) and a power law fitted to it.",
    "isoflop": "IsoFLOP profiles: final loss against N at fixed training compute.",
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; line-height: 1.4; }
h1 { margin-bottom: 0.2em; }
.meta { color: #666; margin-top: 0; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; max-width: 900px; }
figcaption ul { margin: 0.3em 0; padding-left: 1.2em; color: #666; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
.warn { color: #a40; }
.finished { color: #1a7f37; } .failed { color: #c62828; }
.running, .pending { color: #8a6d00; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
details { margin: 0.3em 0; }
"""


def write_report(store: Store, sweep: str, path: str | Path | None = None) -> tuple[Path, list]:
    """Write the report of `sweep` to `path` (default results/reports/SWEEP.html).

    Returns (path, plots): the figures it drew, each with its notes.
    """
    path = Path(path) if path is not None else Path("results/reports") / f"{sweep}.html"
    page, plots = build_report(store, sweep)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise UserError(
            f"cannot write the report to {str(path)!r} ({e.strerror}); "
            "give a writable file with --out FILE"
        ) from None
    return path, plots


def build_report(store: Store, sweep: str) -> tuple[str, list]:
    """(the HTML page, the plots drawn for it)."""
    runs = sweep_runs(store, sweep)
    plots, skipped = [], []
    for kind in KINDS:
        try:
            plots.append(make_plot(store, sweep, kind))
        except UserError as e:
            skipped.append((kind, str(e)))
    try:
        fits = latest_fits(store, sweep)
    except UserError:
        fits = []
    size = {r.run_id: r.n_params for r in runs}
    order = {"final": 0, "per-token": 1, "learning-curve": 2}
    fits.sort(key=lambda f: (order.get(f.what, 3), f.what, f.law, size.get(f.curve, 0), f.curve))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Sweep {_e(sweep)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Sweep {_e(sweep)}</h1>",
        f'<p class="meta">{_summary(runs)}<br>store {_e(str(store.path))}, written {now}</p>',
        "<h2>Figures</h2>",
        *(_figure(p) for p in plots),
    ]
    if skipped:
        parts.append(
            "<p>Not drawn:</p><ul>"
            + "".join(f"<li><b>{_e(k)}</b>: {_e(why)}</li>" for k, why in skipped)
            + "</ul>"
        )
    parts += [
        "<h2>Runs</h2>",
        _runs_table(store, runs),
        "<h2>Fits</h2>",
        _fits_table(fits),
        "<h2>Configs</h2>",
        _configs(runs),
        "</body></html>",
    ]
    return "\n".join(parts), plots


def _summary(runs) -> str:
    counts = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    sizes = sorted({r.n_params for r in runs})
    budgets = sorted({r.tokens for r in runs})
    return (
        f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"N from {sizes[0]:,} to {sizes[-1]:,} non-embedding parameters in {len(sizes)} "
        f"sizes; {len(budgets)} token budget{'s' if len(budgets) > 1 else ''} "
        f"({', '.join(f'{b:,}' for b in budgets[:6])}{', ...' if len(budgets) > 6 else ''})"
    )


def _figure(plot) -> str:
    data = base64.b64encode(png_bytes(plot.figure)).decode("ascii")
    width, height = (int(v * 100) for v in plot.figure.get_size_inches())
    notes = "".join(f"<li>{_e(n)}</li>" for n in plot.notes)
    return (
        f'<figure id="{plot.kind}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(plot.kind)} plot" width="{width * 7 // 6}" height="{height * 7 // 6}">'
        f"<figcaption><b>{_e(plot.kind)}</b>: {_e(DESCRIPTIONS[plot.kind])}"
        f"{f'<ul>{notes}</ul>' if notes else ''}</figcaption></figure>"
    )


def _runs_table(store, runs) -> str:
    head = [
        "run",
        "status",
        "step",
        "N",
        "N (all)",
        "layers",
        "d_model",
        "heads",
        "n_ctx",
        "tokens D",
        "FLOPs C",
        "final eval loss",
        "reason",
    ]
    rows = []
    for r in runs:
        last = store.last_eval(r.run_id)
        steps = r.config.get("train", {}).get("steps", "?")
        rows.append(
            f'<tr><td class="l">{_e(r.run_id)}</td><td class="l {r.status}">{r.status}</td>'
            f"<td>{r.step:,}/{steps if isinstance(steps, str) else f'{steps:,}'}</td>"
            f"<td>{r.n_params:,}</td><td>{r.n_params_total:,}</td><td>{r.n_layer}</td>"
            f"<td>{r.d_model}</td><td>{r.n_heads}</td><td>{r.n_ctx}</td><td>{r.tokens:,}</td>"
            f"<td>{r.flops:.3g}</td><td>{'-' if last is None else f'{last[1]:.4f}'}</td>"
            f'<td class="l">{_e(r.reason or "")}</td></tr>'
        )
    return _table(head, rows, left={0, 1, 12})


def _fits_table(fits) -> str:
    if not fits:
        return "<p>No fits stored; run <code>scaling fit --sweep NAME --law LAW</code>.</p>"
    levels = {f.settings.get("confidence", 0.95) for f in fits}
    level = f"{levels.pop():.0%} " if len(levels) == 1 else ""
    head = [
        "law",
        "fitted to",
        "curve",
        f"parameters [{level}bootstrap interval]",
        "points",
        "converged",
        "objective",
        "fit id",
        "warnings",
    ]
    rows = []
    for f in fits:
        cells = [_e(cell) for cell in param_cells(f, equals=" = ")]
        warnings = "<br>".join(f'<span class="warn">{_e(w)}</span>' for w in warnings_of(f))
        rows.append(
            f'<tr><td class="l">{_e(f.law)}</td><td class="l">{_e(f.what)}</td>'
            f'<td class="l">{_e(f.curve)}</td><td class="l">{"<br>".join(cells)}</td>'
            f"<td>{f.n_points}</td><td>{'yes' if f.converged else 'no'}</td>"
            f'<td>{f.objective:.3g}</td><td>{f.fit_id}</td><td class="l">{warnings}</td></tr>'
        )
    return _table(head, rows, left={0, 1, 2, 3, 8})


def _configs(runs) -> str:
    flat = {r.run_id: _flatten(r.config) for r in runs}
    keys = sorted(set().union(*flat.values()))
    shared = {
        k: flat[runs[0].run_id].get(k)
        for k in keys
        if all(k in f and f[k] == flat[runs[0].run_id][k] for f in flat.values())
    }
    differing = [k for k in keys if k not in shared]
    parts = []
    if differing:
        parts.append("<p>What differs between the runs:</p>")
        parts.append(
            _table(
                ["run", *differing],
                [
                    f'<tr><td class="l">{_e(r.run_id)}</td>'
                    + "".join(
                        f"<td>{_e(_value(flat[r.run_id].get(k, '-')))}</td>" for k in differing
                    )
                    + "</tr>"
                    for r in runs
                ],
            )
        )
    parts.append("<p>Shared by every run:</p>")
    parts.append(
        _table(
            ["key", "value"],
            [
                f'<tr><td class="l">{_e(k)}</td><td class="l">{_e(_value(v))}</td></tr>'
                for k, v in shared.items()
            ],
            left={0, 1},
        )
    )
    for r in runs:
        parts.append(
            f"<details><summary>full config of {_e(r.run_id)}</summary>"
            f"<pre>{_e(json.dumps(r.config, indent=2, sort_keys=True))}</pre>"
            "</details>"
        )
    return "\n".join(parts)


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _table(head, rows, left=frozenset({0})) -> str:
    """A table; the columns in `left` hold text and align left, the rest numbers."""
    cells = "".join(
        f"<th{' class=l' if i in left else ''}>{_e(h)}</th>" for i, h in enumerate(head)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _value(v) -> str:
    return v if isinstance(v, str) and v else json.dumps(v)


def _e(text) -> str:
    return html.escape(str(text), quote=True)
