"""B_crit(L), S_min and E_min, and L(N, S_min) from a store, on synthetic sweeps with known
parameters (Kaplan et al. 2020's values)."""

import json

import numpy as np
import pytest

from launch.cli import main
from scaling.fitting.fit import fit
from scaling.fitting.laws import get_law
from scaling.store import RunRecord, Store
from scaling.studies import critical_batch

B_STAR, ALPHA_B = 2e8, 0.21  # Kaplan et al. 2020, equation 5.3
NS = {"N_c": 8.8e13, "alpha_N": 0.076, "S_c": 2.1e3, "alpha_S": 0.76}  # equation 5.6 / table


def test_b_crit_law_recovers_b_star_and_alpha_b():
    rng = np.random.default_rng(0)
    loss = np.linspace(2.0, 6.0, 40)
    b_noise = B_STAR / loss ** (1 / ALPHA_B) * np.exp(rng.normal(0, 0.05, loss.shape))
    result = fit("b_crit", loss[:, None], b_noise, bootstrap=50)
    assert float(result.params["B_star"][0]) == pytest.approx(B_STAR, rel=0.05)
    assert float(result.params["alpha_B"][0]) == pytest.approx(ALPHA_B, rel=0.05)
    low, high = result.intervals["alpha_B"][0]
    assert low < ALPHA_B < high


def test_min_steps_and_tokens_by_hand():
    s_min, e_min = critical_batch.min_steps_and_tokens(
        [1e6, 3e6], [1e6, 1e6], [100, 400], [1e8, 4e8]
    )
    # B = B_crit halves both; B_crit = 3B: S_min = S/4 and E_min = E/(4/3).
    np.testing.assert_allclose(s_min, [50, 100])
    np.testing.assert_allclose(e_min, [5e7, 3e8])


def _synthetic_sweep(path, sweep="kaplan"):
    """Three sizes whose learning curves follow L(N, S_min) and whose logged noise scale
    is B_crit(L); built backwards from S_min, so no equation is solved."""
    b_crit = get_law("b_crit")
    ns = get_law("kaplan_ns")
    batch_size, n_ctx = 512, 1024
    with Store(path) as store:
        for i, n in enumerate((1e6, 1e7, 1e8)):
            run_id = f"run{i}"
            config = {"train": {"batch_size": batch_size, "warmup_steps": 100}}
            store.register_run(
                RunRecord(run_id, config, int(n), int(n) + 1, 4, 64, 4, n_ctx, 0, 0.0), sweep=sweep
            )
            s_min = np.geomspace(300, 3e4, 12)
            loss = np.asarray(ns.predict(NS, np.stack([np.full_like(s_min, n), s_min], 1)))
            noise = np.asarray(b_crit.predict({"B_star": B_STAR, "alpha_B": ALPHA_B}, loss))
            steps = np.round(s_min * (1 + noise / (batch_size * n_ctx))).astype(int)
            for step, value, b in zip(steps, loss, noise, strict=True):
                store.log_eval(
                    run_id, int(step), {"eval_loss": float(value), "noise_scale": float(b)}
                )
            store.log_eval(run_id, 50, {"eval_loss": 9.0, "noise_scale": 1.0})  # in warmup
            store.set_status(run_id, "finished")
        store.add_sweep(sweep, {}, ["run0", "run1", "run2"])


@pytest.mark.slow  # a bootstrap fit over a sweep of stores
def test_sweep_fit_recovers_b_crit_and_l_of_n_s_min_and_query_shows_them(tmp_path, capsys):
    path = str(tmp_path / "store.sqlite")
    _synthetic_sweep(path)
    with Store(path) as store:
        points = critical_batch.eval_points(store, store.runs("kaplan"))
    assert len(points.loss) == 36 and points.step.min() > 100  # warmup left out
    assert (
        main(["fit", "--sweep", "kaplan", "--law", "b_crit", "--store", path, "--bootstrap", "20"])
        == 0
    )
    capsys.readouterr()
    assert main(["query", "--sweep", "kaplan", "--store", path]) == 0
    table = capsys.readouterr().out
    assert "B_star=" in table and "alpha_B=" in table and "S_c=" in table
    assert main(["query", "--sweep", "kaplan", "--store", path, "--json"]) == 0
    fits = {f["law"]: f for f in json.loads(capsys.readouterr().out)}
    b_fit, ns_fit = fits["b_crit"], fits["kaplan_ns"]
    assert b_fit["params"]["B_star"] == pytest.approx(B_STAR, rel=0.01)
    assert b_fit["params"]["alpha_B"] == pytest.approx(ALPHA_B, rel=0.01)
    # Rounding S to whole steps is the only error left.
    assert ns_fit["params"]["alpha_N"] == pytest.approx(NS["alpha_N"], rel=0.02)
    assert ns_fit["params"]["alpha_S"] == pytest.approx(NS["alpha_S"], rel=0.02)
    assert ns_fit["selection"]["S_min"][0] == pytest.approx(300, rel=0.01)
    assert set(b_fit["intervals"]) == {"B_star", "alpha_B"}
    assert ns_fit["what"] == "critical-batch"
    low, high = ns_fit["intervals"]["alpha_S"]
    assert low <= ns_fit["params"]["alpha_S"] <= high


def test_sweep_without_noise_scale_is_refused(one_run_store, capsys):
    path = one_run_store
    assert main(["fit", "--sweep", "s", "--law", "b_crit", "--store", path]) == 2
    assert "noise_scale" in capsys.readouterr().err
