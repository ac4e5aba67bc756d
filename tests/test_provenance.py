"""Provenance of a sweep fit, pinned parameters, and the refusal to mix FLOP conventions."""

import dataclasses
import json

import numpy as np
import pytest

from launch import cli
from scaling.errors import UserError
from scaling.fitting.laws import get_law
from scaling.store import RunRecord, Store
from scaling.studies import analysis
from scaling.studies.provenance import project_version


def _store(path, convention="6N+attention"):
    law = get_law("saturating")
    rng = np.random.default_rng(0)
    with Store(path) as store:
        for i, n in enumerate(np.geomspace(1e3, 1e6, 7).astype(int)):
            counts = {"6N": 6.0 * n * 1e4, "6N+attention": 6.6 * n * 1e4}
            store.register_run(
                RunRecord(
                    f"r{i}",
                    {},
                    int(n),
                    int(n),
                    1,
                    8,
                    1,
                    16,
                    10_000,
                    counts[convention],
                    flops_by_convention=counts,
                    flop_convention=convention,
                ),
                sweep="sw",
            )
            loss = float(law.predict({"E": 1.7, "A": 40.0, "alpha": 0.3}, float(n)))
            store.log_eval(f"r{i}", 10, {"eval_loss": loss * np.exp(rng.normal(0, 3e-3))})
            store.set_status(f"r{i}", "finished", step=10)


def test_a_sweep_fit_records_where_it_came_from(tmp_path):
    path = tmp_path / "s.sqlite"
    _store(path)
    with Store(path) as store:
        (record,) = analysis.fit_sweep(store, "sw", "saturating", bootstrap=0, fixed={"E": 1.7})
        (stored,) = store.fits("sw")
    p = stored.provenance
    assert p == record.provenance
    assert p["runs"] == [f"r{i}" for i in range(7)] and len(p["points"]) == 7
    assert p["points"][0][0] == 1000.0 and p["objective"] == "huber"
    assert p["objective_value"] == pytest.approx(stored.objective)
    assert p["optimizer"]["max_iter"] == 500 and p["n_starts"] == 9  # A x alpha grid
    assert 1 <= p["n_starts_converged"] <= 9 and p["fixed"] == {"E": 1.7}
    assert p["flop_convention"] == "6N+attention" and p["version"] == project_version()
    assert project_version().startswith(("git:", "package:"))
    assert stored.params["E"] == 1.7


def test_a_fit_says_what_its_runs_were_trained_with(tmp_path, capsys):
    path = tmp_path / "s.sqlite"
    _store(path)
    on = {
        "packages": {"jax": "0.10.2", "flax": "0.12.8"},
        "platform": "gpu",
        "device_kind": "NVIDIA H100",
        "device_count": 8,
        "process_count": 1,
    }
    with Store(path) as store:
        for i in range(7):  # r6 was resumed on another JAX: its latest start counts
            store.add_environment(f"r{i}", on, started=1.0)
        store.add_environment("r6", {**on, "packages": {"jax": "0.11.0"}}, started=2.0)
        (record,) = analysis.fit_sweep(store, "sw", "saturating", bootstrap=0)
    by_runs = {e["runs"]: e for e in record.provenance["environments"]}
    assert by_runs[6]["packages"] == on["packages"] and by_runs[1]["packages"]["jax"] == "0.11.0"
    assert cli.main(["query", "--store", str(path), "--sweep", "sw"]) == 0
    out = capsys.readouterr().out
    assert "trained with jax 0.10.2, flax 0.12.8 on 8 NVIDIA H100 (6 runs)" in out
    assert "trained with jax 0.11.0 on 8 NVIDIA H100 (1 runs)" in out


def test_query_refuses_fits_under_different_conventions(tmp_path, capsys):
    path = tmp_path / "s.sqlite"
    _store(path)
    with Store(path) as store:
        a = analysis.fit_sweep(store, "sw", "saturating", bootstrap=0)[0]
        b = analysis.fit_sweep(store, "sw", "saturating", bootstrap=0, convention="6N")[0]
    assert a.provenance["flop_convention"] == "6N+attention"
    assert b.provenance["flop_convention"] == "6N"
    mixed = [a, dataclasses.replace(b, law="power")]
    with pytest.raises(UserError, match=r"different FLOP conventions \(6N, 6N\+attention\)"):
        analysis.same_convention(mixed, None)
    assert analysis.same_convention(mixed, "6N") == [mixed[1]]
    with pytest.raises(UserError, match="no fits made under"):
        analysis.same_convention(mixed, "6N_total")
    assert cli.main(["query", "--sweep", "sw", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "provenance: 7 runs, 7 points, huber" in out and "FLOPs 6N" in out


def test_a_convention_a_run_lacks_is_refused(tmp_path):
    path = tmp_path / "s.sqlite"
    _store(path)
    with Store(path) as store, pytest.raises(UserError, match="no FLOP count under"):
        analysis.fit_sweep(store, "sw", "saturating", bootstrap=0, convention="6N_total")


def test_fit_fix_and_sensitivity_commands(tmp_path, capsys):
    path = tmp_path / "s.sqlite"
    _store(path)
    args = ["fit", "--sweep", "sw", "--law", "saturating", "--store", str(path), "--bootstrap", "0"]
    assert cli.main(args + ["--fix", "E=1.7", "--json"]) == 0
    assert '"E": 1.7' in capsys.readouterr().out
    assert cli.main(args + ["--sensitivity", "E=1.5:1.8:4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["param"] == "E" and out["values"] == pytest.approx([1.5, 1.6, 1.7, 1.8])
    alphas = [f[0]["params"]["alpha"] for f in out["fits"]]
    assert [f[0]["params"]["E"] for f in out["fits"]] == pytest.approx(out["values"])
    # The exponent trades off against the pinned floor monotonically, and the true
    # E = 1.7 fits best.
    assert np.all(np.diff(alphas) > 0) or np.all(np.diff(alphas) < 0)
    objectives = [f[0]["objective"] for f in out["fits"]]
    assert int(np.argmin(objectives)) == 2
    assert cli.main(args + ["--fix", "E=abc"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert cli.main(args + ["--sensitivity", "E=2:1:3"]) == 2
    assert "LOW < HIGH" in capsys.readouterr().err


@pytest.mark.slow  # a pinned fit and a three-point sensitivity scan
def test_csv_fit_with_fix_varpro_and_sensitivity(tmp_path, capsys):
    law = get_law("saturating")
    x = np.logspace(0, 3, 12)
    y = np.asarray(law.predict({"E": 1.7, "A": 4.0, "alpha": 0.5}, x))
    path = tmp_path / "c.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x, y, strict=True)))
    base = [
        "fit",
        "--law",
        "saturating",
        "--csv",
        str(path),
        "--x",
        "x",
        "--y",
        "y",
        "--bootstrap",
        "0",
        "--json",
    ]
    assert cli.main(base + ["--varpro", "--fix", "E=1.7"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["alpha"] == pytest.approx(0.5, rel=1e-4) and out["varpro"]["n_starts"] == 3
    assert cli.main(base + ["--sensitivity", "alpha=0.4:0.6:3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["curves"] == ["csv"] and len(out["fits"]) == 3
    assert int(np.argmin([f[0]["objective"] for f in out["fits"]])) == 1
