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


def _tiny_ladder(d_models: str, aspect: int, peak_size: int) -> list[str]:
    """Flags for a ladder of tiny shapes: context 16, 4 sequences, one timed block, no
    end-to-end run."""
    flags = {"d-models": d_models, "aspect": aspect, "head-dim": 16, "n-ctx": 16, "batch": 4}
    flags |= {"repeats": 1, "peak-size": peak_size, "e2e-steps": 0}
    return [arg for name, value in flags.items() for arg in (f"--{name}", str(value))]


@pytest.mark.slow  # compiles four step variants per row
def test_train_bench_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _load_bench().main(
        [
            *_tiny_ladder("32,64", aspect=32, peak_size=512),
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
            "--pair-rounds",
            "2",
            "--torch-python",
            "/nonexistent/python",
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["d_model"], row["n_layer"], row["batch"], row["n_ctx"]) == (16, 1, 4, 16)
    assert row["e2e_tokens_per_s"] > 0 and row["e2e_vs_step"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        assert row["pair_tokens_per_s"] > 0 and len(row["pair_rounds"]) == 2
    assert "no PyTorch peer" in capsys.readouterr().out


FAKE_PEER = """#!/bin/sh
# Stands in for a Python with PyTorch: answers as bench/torch_peer.py does.
case " $* " in
*" --serve "*)
    echo '{"ready": true}'
    while read -r line; do echo '{"step_s": 0.01, "tokens_per_s": 1000.0, "threads": 1}'; done ;;
*) echo '{"step_s": 0.005, "tokens_per_s": 2000.0, "threads": 2, "torch": "fake"}' ;;
esac
"""


@pytest.mark.slow  # two pinned workers of ours, compiled once, timed in three rounds
def test_the_pairs_take_turns_and_each_round_gives_its_own_ratio(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the pairs need two cores")
    peer = tmp_path / "python"
    peer.write_text(FAKE_PEER)
    peer.chmod(0o755)
    out = tmp_path / "bench.json"
    _load_bench().main(
        [
            *_tiny_ladder("16", aspect=16, peak_size=256),
            "--pair",
            "--pair-rounds",
            "3",
            "--torch-python",
            str(peer),
            "--out",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert row["torch_tokens_per_s"] == 2000.0
    ours = row["pair_rounds"]
    assert len(ours) == 3 and all(t > 0 for t in ours)
    assert row["pair_tokens_per_s"] == sorted(ours)[1]  # the median round
    assert row["torch_pair_rounds"] == [2000.0] * 3  # two copies at 1,000 tokens/s each
    assert row["torch_pair_tokens_per_s"] == 2000.0
    # Each round's ratio is ours over the PyTorch round beside it.
    assert math.isclose(row["pair_vs_torch_pair"], sorted(ours)[1] / 2000.0)
    assert row["pair_vs_torch_pair_range"] == [min(ours) / 2000.0, max(ours) / 2000.0]
    assert math.isclose(row["pair_vs_torch"], row["pair_tokens_per_s"] / 2000.0)
