"""One device per core (`mesh.cpu_per_core`): a CPU run in one process trains data parallel
over its cores, each device running the one-device program on its own rows, to the losses
of one device."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import _study

from launch import host_devices
from models import sharding

REPO = Path(__file__).parents[1]
CORES = len(host_devices.usable_cores())


def _python(code: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_fresh_process_gets_one_device_per_core_and_spare_threads():
    out = json.loads(
        _python(
            """
            import json, os
            from launch.host_devices import one_device_per_core
            n = one_device_per_core()
            import jax
            print(json.dumps([n, jax.device_count(), os.environ.get("NPROC")]))
            """,
            env={"XLA_FLAGS": "", "NPROC": "3"},  # too few for two devices: raised
        )
    )
    n, devices, threads = out
    if CORES < 2:
        assert (n, devices) == (1, 1)
    else:
        assert n == devices == CORES
        assert threads == str(2 * CORES)


def test_a_device_count_in_xla_flags_or_a_started_backend_is_left_alone():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    assert host_devices.one_device_per_core(environ) == 1
    assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    jax.devices()  # this process's backend is up: its count stands
    environ = {}
    assert host_devices.one_device_per_core(environ) == 1
    assert "NPROC" not in environ


def test_the_batch_takes_as_many_devices_as_split_it_evenly(monkeypatch):
    monkeypatch.setattr(sharding.jax, "local_devices", lambda: ["d0", "d1", "d2", "d3"])
    assert sharding.data_parallel_devices(16, even_rows=True) == ["d0", "d1", "d2", "d3"]
    assert sharding.data_parallel_devices(12, even_rows=True) == ["d0", "d1", "d2"]  # 4 x 3 rows
    assert sharding.data_parallel_devices(12, even_rows=False) == ["d0", "d1", "d2", "d3"]
    assert sharding.data_parallel_devices(6, even_rows=True) == ["d0", "d1", "d2"]
    assert sharding.data_parallel_devices(2, even_rows=True) == ["d0"]  # one row each: odd
    assert sharding.data_parallel_devices(5, even_rows=False) == ["d0"]


def test_steps_per_device_train_and_evaluate_as_one_device_does():
    """Two devices, each its own rows through the one-device kernels, against one device:
    the same losses and gradient norms, noise-measuring steps included, and the same eval."""
    out = json.loads(
        _python(
            """
            import json
            import jax
            jax.config.update("jax_num_cpu_devices", 2)
            import flax.linen as nn, numpy as np
            from launch import config as config_lib, steps
            from models import sharding
            from models.sizes import ModelShape
            from models.transformer import ModelConfig

            shape = ModelShape(n_layer=2, d_model=32, n_heads=2, n_ctx=16, vocab_size=64)
            tokens = np.random.default_rng(0).integers(0, 64, (6, 8, 17)).astype(np.int32)

            def run(n_devices):
                mesh = sharding.make_mesh(-1, 1, 1, devices=jax.devices()[:n_devices])
                per_device = sharding.cpu_data_parallel(mesh)
                model = ModelConfig(shape, per_device=per_device)
                rules = sharding.RULES
                tx = steps.make_optimizer(config_lib.base_config().train)
                out = {"per_device": per_device, "cpu_kernels": model.single_cpu, "metrics": []}
                with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                    state, shardings = steps.init_state(model, tx, mesh, rules, seed=0)
                    plain, evaluate = steps.compile_steps(
                        shardings, mesh, rules, state.apply_fn, False, per_device
                    )
                    noise = steps.compile_train_step(shardings, mesh, rules, True, per_device)
                    batch = sharding.batch_sharding(mesh, rules)
                    for i, b in enumerate(tokens):
                        b = jax.device_put(b, batch)
                        state, m = (noise if i % 2 == 0 else plain)(state, b)
                        out["metrics"].append([float(m["train_loss"]), float(m["grad_norm"])])
                    out["eval"] = np.asarray(evaluate(state.params, b)).tolist()
                    ema = state.noise_ema
                    out["noise_ema"] = [float(ema["g2"]), float(ema["trace"])]
                return out

            print(json.dumps([run(1), run(2)]))
            """
        )
    )
    one, two = out
    assert one["per_device"] and two["per_device"]  # CPU meshes that split only the batch
    assert one["cpu_kernels"] and two["cpu_kernels"]  # each device runs one device's program
    losses = [m[0] for m in one["metrics"]]
    assert losses[-1] < losses[0]  # it trains
    np.testing.assert_allclose(two["metrics"], one["metrics"], rtol=1e-5)
    np.testing.assert_allclose(two["eval"], one["eval"], rtol=1e-5)
    np.testing.assert_allclose(two["noise_ema"], one["noise_ema"], rtol=1e-4)


@pytest.mark.slow  # two `scaling run`s end to end; the step itself is checked just above
@pytest.mark.skipif(CORES < 2, reason="one core: a run keeps its one device")
def test_scaling_run_trains_over_the_cores_to_one_devices_losses(tiny_config, tmp_path):
    """With mesh.cpu_per_core, `scaling run` in a process of its own takes a device per
    core; in this process (its backend already up, one device) the same run trains to the
    same eval losses."""
    from launch.cli import main
    from scaling.store import Store

    study = _study(tmp_path, tiny_config)  # its get_sweep goes unread by `scaling run`
    losses = {}
    for where in ("subprocess", "here"):
        flags = {
            "store": tmp_path / f"{where}.sqlite",
            "workdir": tmp_path / f"{where}_runs",
            "mesh.cpu_per_core": "true",
        }
        argv = ["run", study] + [f"--config.{k}={v}" for k, v in flags.items()]
        if where == "subprocess":
            result = subprocess.run(
                [sys.executable, "-m", "launch.cli", *argv],
                cwd=REPO,
                env={**os.environ, "XLA_FLAGS": ""},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert main(argv) == 0
        with Store(flags["store"]) as store:
            (run,) = store.runs()
            (ran_on,) = store.environments(run.run_id)
            losses[where] = (
                ran_on["device_count"],
                list(store.scalars(run.run_id, "eval_loss")[1]),
            )
    assert losses["subprocess"][0] == CORES and losses["here"][0] == 1
    assert losses["subprocess"][1] == pytest.approx(losses["here"][1], abs=1e-4)
