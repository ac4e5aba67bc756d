"""The training benchmark runs end to end on a tiny ladder and writes the JSON it promises."""

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_bench_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    _load_bench().main(["--d-models", "32,64", "--aspect", "32", "--head-dim", "16",
                        "--n-ctx", "16", "--batch", "4", "--repeats", "1", "--peak-size", "512",
                        "--out", str(out)])
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
        assert row["attention"] == "xla" and row["remat"] == "none"  # float32, unrolled
    table = capsys.readouterr().out
    assert "MFU" in table and "matmul peak" in table
