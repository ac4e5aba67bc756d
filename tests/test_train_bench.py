"""The training benchmark runs end to end on a tiny ladder and writes the JSON it promises."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # compiles four step variants per row
def test_train_bench_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _load_bench().main(
        [
            "--d-models",
            "32,64",
            "--aspect",
            "32",
            "--head-dim",
            "16",
            "--n-ctx",
            "16",
            "--batch",
            "4",
            "--repeats",
            "1",
            "--peak-size",
            "512",
            "--e2e-steps",
            "0",
            "--torch-python",
            "",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["peak_flops"] > 1e8
    assert result["device"]
    assert [row["d_model"] for row in result["rows"]] == [32, 64]
    for row in result["rows"]:
        assert row["n_layer"] == row["d_model"] // 32
        assert row["params"] == 12 * row["n_layer"] * row["d_model"] ** 2
        assert math.isclose(row["tokens_per_s"], 4 * 16 / row["step_s"])
        # MFU is a fraction of a peak measured in the same run: positive, and a
        # tiny model cannot exceed the machine's matmul peak.
        assert 0 < row["mfu"] < 1
        assert row["compile_s"] > 0
        assert row["eval_overhead"] > 0 and row["eval_vs_train"] > 0
        assert row["noise_scale_cost"] > -1 and row["noise_step_cost"] > -1
        assert row["attention"] == "chunked"  # float32 on one CPU device
        assert "torch_tokens_per_s" not in row and "e2e_tokens_per_s" not in row
    # Narrow models keep the layer loop and recompute all but the projections.
    assert [row["remat"] for row in result["rows"]] == ["none", "dots_no_batch"]
    table = capsys.readouterr().out
    assert "MFU" in table and "matmul peak" in table


@pytest.mark.slow  # a `scaling run` per shape on the real corpus, and two pinned workers
def test_train_bench_reads_a_study_and_runs_the_trainer_end_to_end(
    tmp_path, data_cache, monkeypatch, capsys
):
    monkeypatch.setenv("SCALING_CACHE", data_cache)
    study = tmp_path / "study.py"
    study.write_text(
        "from launch.config import base_config\n"
        "def get_config(arg=None):\n"
        "    c = base_config()\n"
        "    c.model.n_ctx, c.train.batch_size = 16, 4\n"
        "    return c\n"
        "def get_sweep(arg=None):\n"
        "    return [{'model.n_layer': 1, 'model.d_model': 16, 'model.n_heads': 1}]\n"
    )
    out = tmp_path / "bench.json"
    # A PyTorch peer that cannot start (no torch here) is said once, not an error.
    _load_bench().main(
        [
            "--study",
            str(study),
            "--repeats",
            "1",
            "--peak-size",
            "256",
            "--e2e-steps",
            "6",
            "--e2e-study",
            str(study),
            "--pair",
            "--torch-python",
            "/nonexistent/python",
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["d_model"], row["n_layer"], row["batch"], row["n_ctx"]) == (16, 1, 4, 16)
    assert row["e2e_tokens_per_s"] > 0 and row["e2e_vs_step"] > 0
    assert len(os.sched_getaffinity(0)) < 2 or row["pair_tokens_per_s"] > 0
    assert "no PyTorch peer" in capsys.readouterr().out
