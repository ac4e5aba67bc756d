"""The trainer's TensorBoard event files hold the same eval rows as the store."""

import struct
from pathlib import Path

import numpy as np

from launch import train
from scaling.store import Store


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file in `folder` (TFRecord framing:
    uint64 length, uint32 crc, the Event proto, uint32 crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_trainer_writes_tensorboard_scalars_matching_the_store(tiny_config):
    run_id = train.train_and_evaluate(tiny_config)
    scalars = read_scalars(Path(tiny_config.workdir) / run_id / "tensorboard")
    with Store(tiny_config.store) as store:
        names = store.metric_names(run_id)
        steps, losses = store.scalars(run_id, "eval_loss")
        lr_steps, lrs = store.scalars(run_id, "learning_rate")
    assert set(names) <= set(scalars)
    assert {"eval_loss", "train_loss", "tokens_per_s", "mfu", "learning_rate"} <= set(names)
    tb_steps, tb_losses = zip(*scalars["eval_loss"], strict=True)
    assert list(tb_steps) == steps.tolist() and steps[-1] == tiny_config.train.steps
    np.testing.assert_allclose(tb_losses, losses, rtol=1e-6)  # stored as float32
    np.testing.assert_allclose([v for _, v in scalars["learning_rate"]], lrs, rtol=1e-6)
    assert [s for s, _ in scalars["learning_rate"]] == lr_steps.tolist()
