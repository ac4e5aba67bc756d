"""Figures and the HTML report, drawn from small stores written here through the Store API.

The synthetic sweeps follow known laws: per-token loss E_T + 1.5 T^-0.6,
final loss E + 40 N^-0.3 (one budget), or 1.7 + 60 N^-0.34 + 80 D^-0.28
(several budgets per size, IsoFLOP-designed), so every figure has data
and fits to draw without training anything.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib import image

from scaling.errors import UserError
from scaling.figures import plots
from scaling.figures.plot_common import law_formula, num
from scaling.store import FitRecord, RunRecord, Store

SIZES = [10_000, 30_000, 100_000, 300_000, 1_000_000]
N_CTX = 64
TOKENS_PER_STEP = 8 * N_CTX
OFFSET = float(np.mean(-0.4 + 1.5 * np.arange(1, N_CTX + 1) ** -0.6))


def _eval_steps(total):
    return sorted({int(round(s)) for s in np.geomspace(1, total, 12)} | {total})


def _add_run(store, sweep, run_id, n, steps, final_law, status="finished"):
    """A run whose eval loss at step S is final_law(n, D) + 4 (S^-0.4 - steps^-0.4)."""
    tokens = steps * TOKENS_PER_STEP
    d_model = int(round((n / 24) ** 0.5))  # N = 12 n_layer d_model^2 with 2 layers
    store.register_run(
        RunRecord(
            run_id=run_id,
            config={
                "model": {"n_ctx": N_CTX, "n_layer": 2, "d_model": d_model},
                "train": {"steps": steps},
                "seed": 0,
            },
            n_params=n,
            n_params_total=n + 20_000,
            n_layer=2,
            d_model=d_model,
            n_heads=2,
            n_ctx=N_CTX,
            tokens=tokens,
            flops=6.0 * n * tokens,
        ),
        sweep=sweep,
    )
    T = np.arange(1, N_CTX + 1)
    noise = np.random.default_rng(n + steps).normal(0, 0.003, N_CTX)
    for s in _eval_steps(steps) if status != "pending" else []:
        mean = final_law(n, tokens) + 4 * (s**-0.4 - steps**-0.4)
        per_token = mean - OFFSET - 0.4 + 1.5 * T**-0.6 + noise
        store.log_eval(
            run_id,
            s,
            {
                "eval_loss": float(per_token.astype("<f4").mean()),
                "train_loss": mean + 0.01,
                "tokens": s * TOKENS_PER_STEP,
                "flops": 6.0 * n * s * TOKENS_PER_STEP,
                "learning_rate": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1e5,
                "mfu": 0.3,
                "wall_time": 1e9 + s,
            },
            per_token,
        )
    store.set_status(run_id, status, step=steps if status == "finished" else None)
    return final_law(n, tokens) - OFFSET - 0.4


def _fit(sweep, law, what, curve, params, intervals=None):
    return FitRecord(
        sweep,
        law,
        what,
        curve,
        params,
        intervals or {},
        1e-4,
        True,
        10,
        {"runs": [curve]},
        {"objective": "huber", "bootstrap": 100},
    )


def make_single_budget_store(path, with_fits=True):
    """Five sizes, 1000 steps each, one failed run; the per-token and final fits stored."""
    store = Store(path)
    law = lambda n, d: 1.5 + 40 * n**-0.3  # noqa: E731
    for i, n in enumerate(SIZES):
        e_t = _add_run(store, "one", f"run{i}", n, 1000, law)
        if with_fits:
            store.save_fit(
                _fit(
                    "one", "saturating", "per-token", f"run{i}", {"E": e_t, "A": 1.5, "alpha": 0.6}
                )
            )
    _add_run(store, "one", "diverged", 50_000, 1000, lambda n, d: 9.0, status="failed")
    if with_fits:
        store.save_fit(
            _fit(
                "one",
                "saturating",
                "final",
                "all",
                {"E": 1.5, "A": 40.0, "alpha": 0.3},
                {"E": [1.4, 1.6], "A": [30.0, 50.0], "alpha": [0.27, 0.33]},
            )
        )
    return store


CHINCHILLA = {"E": 1.7, "A": 60.0, "B": 80.0, "alpha": 0.34, "beta": 0.28}


def make_isoflop_store(path):
    """Three FLOP budgets, each spread over the five sizes with D = C / 6N."""
    store = Store(path)
    p = CHINCHILLA
    law = lambda n, d: p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]  # noqa: E731
    for budget in (3e11, 3e12, 3e13):
        for n in SIZES:
            steps = int(round(budget / (6 * n) / TOKENS_PER_STEP))
            if 50 <= steps <= 200_000:
                _add_run(store, "iso", f"n{n}-c{budget:.0e}", n, steps, law)
    store.save_fit(_fit("iso", "chinchilla", "final", "all", p))
    return store


@pytest.fixture
def single(tmp_path):
    with make_single_budget_store(tmp_path / "one.sqlite") as store:
        yield store


@pytest.fixture
def isoflop(tmp_path):
    with make_isoflop_store(tmp_path / "iso.sqlite") as store:
        yield store


def _assert_not_blank(path):
    pixels = image.imread(path)[..., :3]
    assert pixels.std() > 0.1, path
    non_white = (pixels.min(axis=-1) < 0.9).mean()
    assert 0.03 < non_white < 0.6, (path, non_white)


def _numbers(text):
    """The numbers of a mathtext legend entry, 1.23\\times10^{4} read as 1.23e4."""
    text = re.sub(r"([\d.]+)\\times10\^\{(-?\d+)\}", r"\1e\2", text)
    text = re.sub(r"(?<![\w.])10\^\{(-?\d+)\}", r"1e\1", text)
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", text)]


def test_isoflop_renders_profiles_with_the_chinchilla_fit(isoflop, tmp_path):
    (plot,) = plots.plot_sweep(isoflop, "iso", "isoflop", tmp_path / "out", vector="pdf")
    assert plot.paths[1].read_bytes().startswith(b"%PDF")
    _assert_not_blank(plot.paths[0])
    (chinchilla,) = [t for t in plot.legend if t.startswith("chinchilla")]
    assert law_formula("chinchilla", CHINCHILLA) in chinchilla
    assert "$L = 1.7 + 60/N^{0.34} + 80/D^{0.28}$" in chinchilla


def test_per_token_legend_shows_each_stored_fit(single):
    plot = plots.make_plot(single, "one", "per-token")
    stored = {f.curve: f for f in single.fits("one") if f.what == "per-token"}
    assert len(plot.legend) == len(stored) == 5  # the failed run is not drawn
    for text in plot.legend:
        run_id = text.split(" ")[0]
        params = stored[run_id].params
        assert law_formula("saturating", params, "T") in text
        E, A, alpha = _numbers(text.split(":", 1)[1])
        assert E == pytest.approx(params["E"], rel=5e-3)
        assert (A, -alpha) == (1.5, 0.6)  # shown as T^{-0.6}
    assert any("stored per-token fits" in n for n in plot.notes)


def test_size_legend_shows_the_exponent_and_its_interval(single):
    plot = plots.make_plot(single, "one", "size")
    (fit_text,) = [t for t in plot.legend if t.startswith("saturating")]
    assert "$L = 1.5 + 40\\,N^{-0.3}$" in fit_text
    assert "$\\alpha = 0.3$, 95% CI [0.27, 0.33]" in fit_text
    assert any("left out diverged (failed)" in n for n in plot.notes)


def test_learning_curves_draw_stored_fits_and_a_token_axis(single):
    single.save_fit(
        _fit("one", "saturating", "learning-curve", "run2", {"E": 2.5, "A": 4.0, "alpha": 0.4})
    )
    plot = plots.make_plot(single, "one", "learning-curves")
    assert plot.legend == ["run2: $L = 2.5 + 4\\,S^{-0.4}$", "failed run"]
    labels = [a.get_xlabel() for ax in plot.figure.axes for a in ax.child_axes]
    assert labels == ["tokens seen (512 per step)"]


def test_compute_frontier_fit_recovers_the_exponent(single):
    plot = plots.make_plot(single, "one", "compute")
    (fit_text,) = [t for t in plot.legend if t.startswith("frontier fit")]
    *_, alpha = _numbers(fit_text)
    # Along the frontier the loss falls like a power of C with a small exponent.
    assert 0.02 < alpha < 0.3
    (frontier,) = [
        line
        for line in plot.figure.axes[0].get_lines()
        if line.get_label().startswith("compute-efficient frontier")
    ]
    assert np.all(np.diff(frontier.get_ydata()) <= 0)  # the best loss within C never rises


def test_per_token_steps_picks_the_largest_run_or_the_one_asked(single):
    plot = plots.make_plot(single, "one", "per-token-steps")
    assert "run4" in plot.notes[0]
    assert (
        "run1"
        in plots.make_plot(single, "one", "per-token-steps", run="run1").figure.axes[0].get_title()
    )
    with pytest.raises(UserError, match="run 'nope' is not in sweep 'one'"):
        plots.make_plot(single, "one", "per-token-steps", run="nope")


def test_all_draws_every_kind_that_applies_and_says_why_not_the_rest(single, tmp_path):
    result = plots.plot_sweep(single, "one", "all", tmp_path / "out")
    assert [p.kind for p in result] == list(plots.KINDS)
    (skipped,) = [p for p in result if p.skipped]
    assert skipped.kind == "isoflop" and "single token budget" in skipped.skipped
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == sorted(
        f"{k}.{ext}" for k in plots.KINDS[:-1] for ext in ("png", "svg")
    )
    for plot in result[:-1]:
        png, svg = plot.paths
        _assert_not_blank(png)
        assert svg.read_text().lstrip().startswith("<?xml")


def test_missing_fits_are_fitted_for_the_figure_and_said_but_not_saved(tmp_path, monkeypatch):
    """The plumbing, with a stand-in fitter; the real one is in the slow test below."""
    from scaling.studies import analysis

    asked = []

    def fake_fit_sweep(store, sweep, law, what, save=True):
        asked.append(save)
        return [_fit(sweep, law, what, "run0", {"E": 3.0, "A": 1.5, "alpha": 0.6})]

    monkeypatch.setattr(analysis, "fit_sweep", fake_fit_sweep)
    with make_single_budget_store(tmp_path / "s.sqlite", with_fits=False) as store:
        plot = plots.make_plot(store, "one", "per-token")
        assert plot.legend == ["run0 (10k): $L = 3 + 1.5\\,T^{-0.6}$"]
        assert (
            "the saturating law was fitted now to 1 curve(s) for this figure only"
            in (plot.notes[0])
        )
        assert "`scaling fit --sweep one --what per-token --law saturating`" in plot.notes[0]
        assert "no fit stored for run1, run2, run3, run4" in plot.notes[1]
        assert asked == [False]
        # Nothing was stored, so the next figure fits again rather than reading a fit.
        assert "fitted now" in plots.make_plot(store, "one", "per-token").notes[0]
        assert store.fits("one") == []


@pytest.mark.slow
def test_plot_fits_with_the_real_fitter_recover_the_laws(tmp_path):
    with make_single_budget_store(tmp_path / "s.sqlite", with_fits=False) as store:
        for text in plots.make_plot(store, "one", "per-token").legend:
            E, A, alpha = _numbers(text.split(":", 1)[1])
            assert A == pytest.approx(1.5, rel=0.02) and -alpha == pytest.approx(0.6, rel=0.02)
        (text,) = [
            t for t in plots.make_plot(store, "one", "size").legend if t.startswith("saturating")
        ]
        E, A, alpha, *_ = _numbers(text.split(":", 1)[1])
        assert (E, A, -alpha) == pytest.approx((1.5, 40, 0.3), rel=0.02)
        assert store.fits("one") == []  # the figures' own fits are not stored


@pytest.mark.parametrize(
    "sweep, kind, message",
    [
        ("nope", "size", "no runs in sweep 'nope'; sweeps in this store: one"),
        ("nope", "all", "no runs in sweep 'nope'; sweeps in this store: one"),
        ("one", "scatter", "unknown plot kind 'scatter'"),
        ("one", "isoflop", "single token budget per model size"),
    ],
)
def test_bad_input_is_a_user_error(single, sweep, kind, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        plots.plot_sweep(single, sweep, kind, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_number_format():
    assert [num(v) for v in (0.3, 40.0, 1.23456, 12345.0, 1e13, 2.5e-5)] == [
        "0.3",
        "40",
        "1.23",
        r"1.23\times10^{4}",
        "10^{13}",
        r"2.5\times10^{-5}",
    ]
    assert _numbers(r"$L = (1.23\times10^{13}/C)^{0.05}$") == [1.23e13, 0.05]
    # A fitted exponent of the wrong sign is written as it is, not as T^{--2.9}.
    assert (
        law_formula("saturating", {"E": 2.5, "A": 1.5, "alpha": -2.9}, "T")
        == "$L = 2.5 + 1.5\\,T^{2.9}$"
    )


# -- the HTML report --------------------------------------------------------------


def test_report_is_one_self_contained_page(tmp_path, capsys):
    from launch.cli import main

    make_single_budget_store(tmp_path / "s.sqlite").close()
    store = ["--store", str(tmp_path / "s.sqlite")]
    assert main(["report", "one", "--out", str(tmp_path / "r" / "one.html"), *store]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {tmp_path / 'r' / 'one.html'}")
    page = (tmp_path / "r" / "one.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 5
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    assert "<b>isoflop</b>: sweep &#x27;one&#x27; has a single token budget" in page
    for text in (
        "run4",
        "1,000,000",
        "failed",
        "alpha = 0.3 [0.27, 0.33]",
        "What differs between the runs",
        "model.d_model",
    ):
        assert text in page, text
    assert main(["report", "nope", *store]) == 2
    assert "error: no runs in sweep 'nope'" in capsys.readouterr().err


_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push(String(e.message || e.target.src)), true);
const realError = console.error;
console.error = (...a) => { __errors.push(a.join(" ")); realError(...a); };
window.addEventListener("load", () => {
  const p = document.createElement("pre"); p.id = "probe";
  p.textContent = JSON.stringify({errors: __errors,
                                  widths: [...document.images].map(i => i.naturalWidth)});
  document.body.appendChild(p);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium package")
def test_report_opens_in_headless_chromium_with_every_figure(single, tmp_path):
    from scaling.figures.html_report import write_report

    path, drawn = write_report(single, "one", tmp_path / "one.html")
    # A copy with a probe that records script errors, console errors, failed
    # loads and each image's natural width into the DOM once the page has loaded.
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text().replace("<head>", "<head>" + _PROBE, 1))
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
    ]
    done = subprocess.run(
        [*command, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    )
    probe = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert probe, done.stderr[-2000:]
    result = json.loads(probe.group(1).replace("&quot;", '"'))
    assert result["errors"] == []
    assert len(result["widths"]) == len(drawn) == 5 and min(result["widths"]) > 0
    assert ":CONSOLE" not in done.stderr
    # And the page itself, unprobed, renders to a screenshot without console output.
    shot = subprocess.run(
        [
            *command,
            "--window-size=1200,3000",
            f"--screenshot={tmp_path / 'page.png'}",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ":CONSOLE" not in shot.stderr
    _assert_not_blank(tmp_path / "page.png")


def test_cli_plot_and_report_leave_the_store_as_it_was(tmp_path, capsys, monkeypatch):
    import hashlib

    from launch.cli import main
    from scaling.studies import analysis

    def fake_fit_sweep(store, sweep, law, what, save=True):
        assert not save
        return [_fit(sweep, law, what, "run0", {"E": 3.0, "A": 1.5, "alpha": 0.6})]

    monkeypatch.setattr(analysis, "fit_sweep", fake_fit_sweep)
    make_single_budget_store(tmp_path / "s.sqlite", with_fits=False).close()
    path = tmp_path / "s.sqlite"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    store = ["--store", str(path)]
    assert main(["plot", "one", "--kind", "per-token", "--out", str(tmp_path / "p"), *store]) == 0
    assert "for this figure only" in capsys.readouterr().out
    assert main(["report", "one", "--out", str(tmp_path / "one.html"), *store]) == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with Store(path) as opened:
        assert opened.fits("one") == []


def test_cli_plot(tmp_path, capsys):
    from launch.cli import main

    make_single_budget_store(tmp_path / "s.sqlite").close()
    store = ["--store", str(tmp_path / "s.sqlite")]
    assert main(["plot", "one", "--kind", "size", "--out", str(tmp_path / "p"), *store]) == 0
    out = capsys.readouterr().out
    assert "drawing the stored final fits" in out and f"wrote {tmp_path / 'p' / 'size.png'}" in out
    assert main(["plot", "one", "--kind", "isoflop", *store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep 'one' has a single token budget") and err.count("\n") == 1
    assert main(["plot", "one", "--kind", "size", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no results store" in capsys.readouterr().err
