"""Damaged checkpoints, divergence within a bound, a full disk, old checkpoints removed."""

import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from launch import checkpoints, data, peak, preflight, train
from launch import config as config_lib
from launch.cli import main
from scaling.errors import UserError
from scaling.store import Store


def _ckpt_dir(config):
    return Path(config.workdir, config_lib.run_id(config), "checkpoints")


def _requested_steps(monkeypatch):
    real, requested = data.train_batch, []

    def record(tokens, step, *args, **kwargs):
        requested.append(step)
        return real(tokens, step, *args, **kwargs)

    monkeypatch.setattr(data, "train_batch", record)
    return requested


@pytest.mark.slow  # each case trains a run and resumes it
@pytest.mark.parametrize("damage", ["truncate_array", "remove_commit_marker"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
    damage, tiny_config, tmp_path, monkeypatch, capsys
):
    tiny_config.train.steps, tiny_config.checkpoint.every = 30, 10
    tiny_config.checkpoint.max_to_keep = 3
    run_id = train.train_and_evaluate(tiny_config)
    step_30 = _ckpt_dir(tiny_config) / "30"
    if damage == "truncate_array":
        biggest = max(
            (p for p in step_30.rglob("*") if p.is_file() and "ocdbt" in str(p)),
            key=lambda p: p.stat().st_size,
        )
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    else:
        (step_30 / "commit_success.txt").unlink()
    with Store(tiny_config.store) as store:  # as if killed before the end was recorded
        store.set_status(run_id, "running")
    requested = _requested_steps(monkeypatch)
    capsys.readouterr()
    train.train_and_evaluate(tiny_config)
    assert requested[0] == 20  # resumed from the checkpoint at 20, not 30 or 0
    err = capsys.readouterr().err
    assert "checkpoint at step 30" in err and "damaged" in err and "previous one" in err
    aside = list((_ckpt_dir(tiny_config).parent / "damaged_checkpoints").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("30-")  # moved, not deleted
    assert checkpoints.Checkpointer(_ckpt_dir(tiny_config), 3).steps() == [10, 20, 30]

    # The resumed run ends where an undamaged one does.
    monkeypatch.undo()
    tiny_config.store, tiny_config.workdir = str(tmp_path / "b.sqlite"), str(tmp_path / "b")
    train.train_and_evaluate(tiny_config)
    with Store(tmp_path / "store.sqlite") as a, Store(tiny_config.store) as b:
        assert a.run(run_id).status == "finished"
        np.testing.assert_allclose(
            a.scalars(run_id, "eval_loss")[1], b.scalars(run_id, "eval_loss")[1], rtol=1e-6
        )


@pytest.mark.slow  # trains until the loss diverges
def test_divergence_stops_within_two_check_intervals_and_names_the_step(tiny_config, monkeypatch):
    tiny_config.train.steps = 400
    tiny_config.train.learning_rate = 1e6
    tiny_config.train.grad_clip = 0.0
    tiny_config.train.warmup_steps = 0
    tiny_config.eval.points = 1  # only the last step: the NaN check alone must stop it
    tiny_config.checkpoint.every = 400
    tiny_config.train.nan_check_every = 7
    requested = _requested_steps(monkeypatch)
    with pytest.raises(train.DivergedError, match=r"at step (\d+); lower train.learning_rate"):
        train.train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        reason = store.run(config_lib.run_id(tiny_config)).reason
    first_bad = int(reason.split("at step ")[1].split(";")[0])
    assert "became nan" in reason or "became inf" in reason
    last_trained = max(requested) + 1
    assert first_bad <= last_trained < first_bad + 2 * 7, (reason, last_trained)


def test_a_run_refuses_to_start_without_disk_for_one_checkpoint(tiny_config, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    n_params = config_lib.model_config(tiny_config).shape.n_params
    code = main(["run", _study_of(tiny_config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "1000.0 B free" in err or "1.0 kB free" in err
    assert f"{n_params:,} parameters needs about" in err and "--config.workdir" in err
    assert not Path(tiny_config.store).exists() and not Path(tiny_config.workdir).exists()
    need = checkpoints.check_disk_space(Path(tiny_config.workdir), 0)
    assert need == 0
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=n_params * 18))
    assert checkpoints.check_disk_space(Path(tiny_config.workdir), n_params) == n_params * 18


def _study_of(config):
    path = Path(config.workdir).parent / "study.py"
    path.write_text(
        "import ml_collections\n"
        f"BASE = {config.to_dict()!r}\n"
        "def get_config(arg=None):\n"
        "    return ml_collections.ConfigDict(BASE)\n"
    )
    return str(path)


@pytest.mark.slow  # trains a run with five checkpoints
def test_checkpoints_beyond_max_to_keep_are_removed(tiny_config):
    tiny_config.train.steps, tiny_config.checkpoint.every = 50, 10
    tiny_config.checkpoint.max_to_keep = 2
    train.train_and_evaluate(tiny_config)
    kept = sorted(int(p.name) for p in _ckpt_dir(tiny_config).iterdir() if p.name.isdigit())
    assert kept == [40, 50]


def test_a_model_too_large_for_the_machine_is_refused_before_anything_is_written(
    tiny_config, capsys
):
    # d_model 8192 x 4 layers: 3.2B parameters, 51 GiB of weights and AdamW state in float32.
    tiny_config.model.d_model, tiny_config.model.n_layer, tiny_config.model.n_heads = 8192, 4, 64
    parts = preflight.memory_floor(tiny_config)
    assert parts["weights, gradients, AdamW"] > 48 * preflight.GIB
    code = main(["run", _study_of(tiny_config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "needs at least" in err and "weights, gradients, AdamW" in err and "GiB" in err
    assert "model.d_model" in err and "train.batch_size" in err
    assert not Path(tiny_config.store).exists() and not Path(tiny_config.workdir).exists()


def test_the_memory_floor_counts_activations_per_sequence_and_refuses_only_past_it(tiny_config):
    small = preflight.memory_floor(tiny_config)
    tiny_config.train.batch_size *= 2
    double = preflight.memory_floor(tiny_config)
    assert double["weights, gradients, AdamW"] == small["weights, gradients, AdamW"]
    for part in ("layer inputs", "one layer's work", "logits"):
        assert double[part] == 2 * small[part]
    need = sum(double.values())
    preflight.check_memory(tiny_config, need)  # exactly enough: runs
    preflight.check_memory(tiny_config, None)  # a device that does not say: runs
    with pytest.raises(UserError, match="needs at least"):
        preflight.check_memory(tiny_config, need - 1)
    # A fused attention kernel keeps no [B, H, L, L] scores.
    tiny_config.model.attention_impl = "cudnn"
    assert sum(preflight.memory_floor(tiny_config).values()) < need


def test_a_run_of_more_than_a_day_here_says_so_and_a_short_one_measures_nothing(
    tiny_config, monkeypatch, capsys
):
    def no_measuring(dtype):
        raise AssertionError("a short run measured the peak")

    monkeypatch.setattr(peak, "matmul_peak_flops", no_measuring)
    preflight.say_if_slow(tiny_config)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(peak, "matmul_peak_flops", lambda dtype: 1e9)  # a slow machine
    tiny_config.train.steps = 10**7
    preflight.say_if_slow(tiny_config)
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: run ") and "days here" in err and "\n" not in err
    assert "scaling plan --accelerator" in err
    preflight.say_if_slow(tiny_config)  # a sweep's check, then the run's own: said once
    assert capsys.readouterr().err == ""


def test_a_checkpoint_that_cannot_be_saved_stops_the_run_in_one_line_and_it_stays_resumable(
    tiny_config, monkeypatch, capsys
):
    def unreachable(self):  # nested as TensorStore nests its errors, the cause last
        raise ValueError(
            'Error opening "zarr" driver: '
            + 'Error writing "params.w/.zarray" in OCDBT database at gs://b/run/: ' * 4
            + "UNAVAILABLE: Connection refused\n(a long storage error)"
        )

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", unreachable)
    study = _study_of(tiny_config)
    assert main(["run", study]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: saving a checkpoint to ") and "relaunch" in err[-1], err
    assert 'Error opening "zarr" driver' in err[-1]
    assert "UNAVAILABLE: Connection refused); the run resumes" in err[-1]
    with Store(tiny_config.store) as store:
        assert store.run(config_lib.run_id(tiny_config)).status == "pending"
