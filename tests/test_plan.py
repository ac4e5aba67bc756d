"""`scaling plan`: per-member counts by hand, totals that add up, accelerators, the MFU."""

import json

import pytest

from launch import plan
from launch.cli import main
from scaling.store import RunRecord, Store

KAPLAN = "experiments/kaplan2020.py"


@pytest.mark.parametrize(
    "name, family, chips",
    [
        ("v4-32", "v4", 16),
        ("v5litepod-16", "v5litepod", 16),
        ("v5e-8", "v5litepod", 8),
        ("v5p-32", "v5p", 16),
        ("v6e-8", "v6e", 8),
        ("h100-8", "h100", 8),
    ],
)
def test_chips_from_the_type_name(name, family, chips):
    acc, count = plan.parse_accelerator(name)
    assert (acc.family, count) == (family, chips)


def test_plan_by_hand_for_one_member_and_totals_that_add_up(tmp_path):
    result = plan.make_plan(
        KAPLAN, {"store": str(tmp_path / "none.sqlite")}, accelerator="v4-32", mfu=0.5
    )
    # GPT-2 small's shape: 12 layers of width 768, 250k steps of 512 x 1024 tokens.
    run = next(r for r in result["runs"] if r["params"] == 12 * 12 * 768**2)
    tokens = 250_000 * 512 * 1024
    assert run["tokens"] == tokens
    assert run["flops"] == 6 * 84_934_656 * tokens  # the study's convention: 6N, N non-embedding
    trainer_flops = (6 * 84_934_656 + 6 * 12 * 1024 * 768) * tokens  # 6N + attention
    hours = trainer_flops / (16 * 275e12 * 0.5) / 3600  # v4-32 = 16 chips at 275 TFLOP/s
    assert run["wall_hours"] == pytest.approx(hours, rel=1e-12)
    assert run["chip_hours"] == pytest.approx(16 * hours, rel=1e-12)
    assert result["total_flops"] == pytest.approx(sum(r["flops"] for r in result["runs"]))
    assert result["chip_hours"] == pytest.approx(sum(r["chip_hours"] for r in result["runs"]))
    assert result["total_tokens"] == 10 * tokens
    assert result["mfu_source"] == "--mfu"


def test_isoflop_plan_counts_flops_as_chinchilla_does(capsys):
    assert (
        main(
            [
                "plan",
                "experiments/chinchilla_isoflop.py:local",
                "--json",
                "--mfu",
                "0.3",
                "--accelerator",
                "v5p-8",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["flop_convention"] == "6N_total"
    for run in result["runs"]:
        assert run["flops"] == 6 * run["params_total"] * run["tokens"]
        assert set(run) >= {"run_id", "params", "tokens", "flops"}
    budgets = (2.5e10, 5e10, 1e11, 2e11, 4e11)
    assert result["total_flops"] == pytest.approx(5 * sum(budgets), rel=0.01)


def test_default_mfu_is_the_median_measured_in_the_store(tmp_path):
    path = str(tmp_path / "store.sqlite")
    with Store(path) as store:
        for i, mfu in enumerate((0.2, 0.35, 0.5, 0.9)):
            run_id = f"run{i}"
            store.register_run(RunRecord(run_id, {}, 10, 20, 1, 8, 1, 16, 100, 1e3), sweep="s")
            store.log_eval(run_id, 10, {"eval_loss": 3.0, "mfu": mfu})
            store.set_status(run_id, "finished" if i < 3 else "running")
    result = plan.make_plan(KAPLAN, {"store": path}, accelerator="v6e-4")
    assert result["mfu"] == pytest.approx(0.35)  # the running run's 0.9 is left out
    assert "median" in result["mfu_source"]
    empty = plan.make_plan(KAPLAN, {"store": str(tmp_path / "empty.sqlite")})
    assert empty["mfu"] == plan.DEFAULT_MFU and empty["chip_hours"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator", "v4-31"], "multiple of 2"),
        (["--accelerator", "tpu9-8"], "unknown accelerator"),
        (["--accelerator", "v4"], "TYPE-COUNT"),
        (["--mfu", "1.5"], "--mfu"),
        (["--storage-price", "-1"], "--storage-price"),
        (["--config.data.manifest=/nonexistent/corpus"], "cannot read its counts"),
    ],
)
def test_bad_plan_input_is_one_line(args, message, capsys):
    assert main(["plan", KAPLAN, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_price_per_chip_hour_costs_every_run_and_the_total(capsys):
    argv = ["plan", "experiments/kaplan_fig20_gpu.py", "--accelerator", "h100-8", "--mfu", "0.35"]
    assert main([*argv, "--json", "--price", "2.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["price_per_chip_hour"] == 2.5
    for run in result["runs"]:
        assert run["cost"] == pytest.approx(2.5 * run["chip_hours"], rel=1e-12)
    assert result["cost"] == pytest.approx(2.5 * result["chip_hours"], rel=1e-12)
    assert main([*argv, "--price", "2.5"]) == 0
    table = capsys.readouterr().out
    assert "USD" in table.splitlines()[0]
    assert f"USD {result['cost']:,.2f} at 2.5 per chip-hour" in table
    assert main([*argv]) == 0 and "USD" not in capsys.readouterr().out  # unpriced: no cost


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--price", "2"], "give the chips too, with --accelerator"),
        (["--accelerator", "a100-8", "--price", "-1"], "must be a finite price"),
        (["--accelerator", "a100-8", "--price", "nan"], "must be a finite price"),
    ],
)
def test_a_price_without_chips_or_below_zero_is_one_line(capsys, argv, message):
    assert main(["plan", "experiments/local_cpu.py", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_remote_sweep_states_its_cost_before_it_starts(tmp_path, capsys):
    flags = ["--backend", "tpu", "--zone", "us-central2-b", "--accelerator", "v4-32"]
    flags += ["--tpu-name", "s", "--bucket", str(tmp_path / "bucket")]
    flags += ["--price", "1.5", "--dry-run"]
    assert main(["sweep", "experiments/local_cpu.py:tiny", *flags]) == 0
    err = capsys.readouterr().err
    assert "chip-hours, USD " in err and "at 1.5 per chip-hour" in err
    assert main(["sweep", "experiments/local_cpu.py:tiny", *flags[:-3], "--price", "-2"]) == 2
    assert "config.launch.price=-2.0" in capsys.readouterr().err


def test_the_plan_counts_the_corpus_once_from_its_manifest_or_the_largest_member(tmp_path):
    from test_shards import prepare

    none = {"store": str(tmp_path / "none.sqlite")}
    result = plan.make_plan(KAPLAN, none, storage_price=0.02)["data"]
    tokens = 250_000 * 512 * 1024  # one epoch of what each member trains on
    assert result["tokens"] == tokens and result["gigabytes"] == 2 * tokens / 1e9  # uint16 ids
    assert result["storage_cost_per_month"] == pytest.approx(2 * tokens / 1e9 * 0.02)
    assert result["tokenise_core_hours"] == tokens / plan.DEFAULT_TOKENISE_RATE / 3600

    out, manifest = prepare(tmp_path)
    result = plan.make_plan(KAPLAN, none | {"data.manifest": str(out)})["data"]
    splits = manifest["splits"].values()
    assert result["tokens"] == sum(s["tokens"] for s in splits)
    assert result["gigabytes"] * 1e9 == sum(x["size"] for s in splits for x in s["shards"])
    seconds = manifest["prepare"]["tokenise_seconds"] * manifest["prepare"]["workers"]
    assert result["tokens_per_core_s"] == pytest.approx(result["tokens"] / seconds)
    assert "storage_cost_per_month" not in result
