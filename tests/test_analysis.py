"""`scaling fit` and `scaling query` through the command line, on a store made here."""

import json

import numpy as np
import pytest

from launch.cli import main
from scaling.store import RunRecord, Store


def _synthetic_sweep(path):
    """Five finished runs; at the last step (10) loss = 1.7 + 20 N^-0.3, per-token 2 + 3 T^-0.5."""
    positions = np.arange(1, 65)
    with Store(path) as store:
        for i, n in enumerate([1e3, 4e3, 1.6e4, 6.4e4, 2.56e5]):
            run_id = f"run{i}"
            store.register_run(
                RunRecord(
                    run_id,
                    {"train": {"steps": 10}},
                    int(n),
                    int(n) + 99,
                    1,
                    8,
                    1,
                    64,
                    10_000,
                    6e4 * n,
                ),
                sweep="syn",
            )
            for step in (1, 3, 10):
                loss = 1.5 + 20 * n**-0.3 + 2.0 / step
                per_token = 2.0 + 3.0 * positions**-0.5
                store.log_eval(run_id, step, {"eval_loss": loss}, per_token)
            store.set_status(run_id, "finished", step=10)
        store.register_run(
            RunRecord(
                "bad",
                {"train": {"steps": 10}},
                500,
                600,
                1,
                8,
                1,
                64,
                10_000,
                3e7,
                status="failed",
                reason="diverged",
            ),
            sweep="syn",
        )


def test_fit_and_query_a_sweep(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    _synthetic_sweep(store)
    assert (
        main(
            [
                "fit",
                "--store",
                store,
                "--sweep",
                "syn",
                "--law",
                "saturating",
                "--what",
                "final",
                "--bootstrap",
                "20",
                "--json",
            ]
        )
        == 0
    )
    (final,) = json.loads(capsys.readouterr().out)
    assert abs(final["params"]["alpha"] - 0.3) < 0.02 and abs(final["params"]["E"] - 1.7) < 0.05
    assert final["selection"]["left_out"] == {"bad": "failed: diverged"}
    assert (
        main(
            [
                "fit",
                "--store",
                store,
                "--sweep",
                "syn",
                "--law",
                "saturating",
                "--what",
                "per-token",
                "--bootstrap",
                "0",
                "--json",
            ]
        )
        == 0
    )
    per_token = json.loads(capsys.readouterr().out)
    assert len(per_token) == 5
    for fit in per_token:
        assert abs(fit["params"]["alpha"] - 0.5) < 1e-3 and abs(fit["params"]["A"] - 3) < 1e-2
    assert main(["query", "--store", store, "--sweep", "syn", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert {(f["what"], f["curve"]) for f in stored} == (
        {("final", "all")} | {("per-token", f"run{i}") for i in range(5)}
    )
    assert main(["query", "--store", store, "--sweep", "syn"]) == 0
    table = capsys.readouterr().out
    assert "saturating fitted to final" in table and "left out: bad (failed: diverged)" in table


def test_fit_csv_prints_the_documented_json(tmp_path, capsys):
    csv = tmp_path / "curve.csv"
    x = np.geomspace(1, 1000, 30)
    rows = "\n".join(f"{v},{1.2 + 4 * v**-0.4}" for v in x)
    csv.write_text("tokens,loss\n" + rows + "\n")
    assert (
        main(
            [
                "fit",
                "--law",
                "saturating",
                "--csv",
                str(csv),
                "--x",
                "tokens",
                "--y",
                "loss",
                "--bootstrap",
                "10",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"law", "params", "intervals", "objective", "converged", "n_points"}
    assert out["law"] == "saturating" and out["n_points"] == 30 and out["converged"] is True
    assert set(out["params"]) == {"E", "A", "alpha"} and abs(out["params"]["alpha"] - 0.4) < 1e-3


@pytest.mark.slow  # the same fit twice, with and without screening the starts
def test_fit_csv_with_screened_starts_finds_the_same_fit(tmp_path, capsys):
    csv = tmp_path / "curve.csv"
    x = np.geomspace(1, 1000, 40)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.01, len(x)))
    csv.write_text(
        "tokens,loss\n"
        + "\n".join(f"{v},{(1.2 + 4 * v**-0.4) * n}" for v, n in zip(x, noise, strict=True))
        + "\n"
    )
    args = [
        "fit",
        "--law",
        "saturating",
        "--csv",
        str(csv),
        "--x",
        "tokens",
        "--y",
        "loss",
        "--bootstrap",
        "0",
        "--json",
    ]
    assert main(args) == 0
    every = json.loads(capsys.readouterr().out)
    assert main(args + ["--keep-starts", "2"]) == 0
    screened = json.loads(capsys.readouterr().out)
    assert screened["objective"] <= every["objective"] * (1 + 1e-9)
    for name, value in every["params"].items():
        assert screened["params"][name] == pytest.approx(value, rel=1e-6)
    assert main(args + ["--keep-starts", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "keep_starts = 0" in err and len(err.splitlines()) == 1
    assert main(args + ["--keep-starts", "2", "--varpro"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one or the other" in err and len(err.splitlines()) == 1


def test_fit_of_an_unknown_sweep_is_one_line(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    _synthetic_sweep(store)
    assert main(["fit", "--store", store, "--sweep", "nope", "--law", "power"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no runs in sweep 'nope'") and "\n" not in err
    assert main(["fit", "--store", store, "--sweep", "syn", "--law", "powr"]) == 2
    assert "powr" in capsys.readouterr().err


def test_fit_of_finished_runs_without_evals_is_one_line(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    with Store(store) as s:  # finished, but its evals went to another store
        s.register_run(RunRecord("r", {}, 1000, 1100, 1, 8, 1, 64, 10_000, 6e7), sweep="e")
        s.set_status("r", "finished", step=10)
    assert main(["fit", "--store", store, "--sweep", "e", "--law", "saturating"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: none of the 1 finished runs has an eval") and "\n" not in err


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("N,loss\n1000,52,05\n2000,40,1\n", [], "decimal commas"),
        ("N,loss\n1000,2e40\n2000,1.9e40\n3000,1.8e40\n", [], "outside"),
        ("N,loss\n1e301,2.0\n1e302,1.9\n1e303,1.8\n", [], "outside"),
        ("N,loss\n1000,nan\n2000,1.9\n3000,1.8\n", [], "outside"),
        ("N,loss\n1000,3.0\n2000,2.5\n4000,2.2\n", ["--bootstrap", "100000000"], "bootstrap"),
        ("N,loss\n1000,3.0\n2000,2.5\n4000,2.2\n", ["--x", "[N]" + " + [N]" * 5000], "characters"),
    ],
)
def test_fit_csv_refuses_bad_files_with_one_line(content, extra, message, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    args = ["fit", "--law", "power", "--csv", str(path), "--y", "loss", *extra]
    if "--x" not in extra:
        args += ["--x", "N"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_fit_csv_reads_a_byte_order_mark_and_refuses_latin_1(tmp_path, capsys):
    path = tmp_path / "bom.csv"
    x = np.geomspace(1e3, 1e6, 8)
    path.write_bytes(
        b"\xef\xbb\xbf" + ("N,loss\n" + "".join(f"{v},{(1e4 / v) ** 0.1}\n" for v in x)).encode()
    )
    assert (
        main(["fit", "--law", "power", "--csv", str(path), "--x", "N", "--y", "loss", "--json"])
        == 0
    )
    assert abs(json.loads(capsys.readouterr().out)["params"]["alpha"] - 0.1) < 1e-3
    path.write_bytes("N,loss,note\n1000,3.0,caf\xe9\n".encode("latin-1"))
    assert main(["fit", "--law", "power", "--csv", str(path), "--x", "N", "--y", "loss"]) == 2
    assert "is not UTF-8" in capsys.readouterr().err


def test_a_csv_of_inputs_far_past_the_grid_fits_the_law_it_holds(tmp_path, capsys):
    N = np.geomspace(1e36, 1e40, 10)
    rows = "\n".join(f"{n:.6e},{1.7 + 50 * (n / 1e36) ** -0.3:.9f}" for n in N)
    path = tmp_path / "far.csv"
    path.write_text("C,loss\n" + rows + "\n")
    args = ["fit", "--csv", str(path), "--x", "C", "--y", "loss", "--law", "saturating"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["E"] == pytest.approx(1.7, rel=1e-4) and out["converged"]
    assert out["params"]["alpha"] == pytest.approx(0.3, rel=1e-4)
