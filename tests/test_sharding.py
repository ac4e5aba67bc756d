"""Sharding: the rules cover the model, every mesh trains like one device, checkpoints move.

This pytest process keeps its one CPU device. The tests that need a mesh
run `tests/sharding_worker.py` in a subprocess whose XLA_FLAGS give it 8
simulated CPU devices. It trains ten steps under meshes (data=8),
(data=2, fsdp=2, tensor=2) and (fsdp=4, tensor=2) and under mesh (1, 1, 1)
on a single device, moves a checkpoint from 8 devices to 4, and trains a
mixed-precision setting of the memory and speed knobs; the other knob
settings run in a second subprocess, for the slow tests. The subprocesses
also get two XLA flags that make compilation several times faster (less
LLVM optimisation, no fusion emitters); they change how the same program is
compiled, not what it computes, and the reference is compiled with them too.

Tolerance (float32). A sharded program sums the same terms in another order:
the batch mean is split over data x fsdp and all-reduced, contractions over
d_model are split over fsdp and those over heads and the MLP over tensor.
Each reduction can then differ by a few ulps (float32 eps = 1.2e-7), and
the loss, ~5.5 here, by a few times 4.8e-7 (its ulp). AdamW divides every
gradient coordinate by its own running RMS, which turns a relative gradient
error into a relative error of a step of size ~lr = 3e-3; over ten steps
rounding can move a parameter by at most ~10 * lr * that error. Measured
here: losses within 3e-6, parameters (largest |p| ~ 1) within 5e-6 of the
one-device run. We allow LOSS_ATOL = 2e-5 (~40 ulps) and PARAM_ATOL = 5e-5,
about ten times the worst seen, while a real mistake is far outside: every
device training on half the batch moves the parameters 2.5e-2 away (500x
the tolerance), and the first loss, taken before any update, checks the
forward pass alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from launch import steps
from launch.config import base_config
from models import sharding
from models.sizes import ModelShape
from models.transformer import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "sharding_worker.py"
MESHES = ("data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")
# Memory and speed knobs (see KNOBS in the worker): between them every value
# of every knob but attention_impl=cudnn (GPU only). The first, mixed
# precision, trains in the default run; the others are slow.
FAST_KNOB = "compute=bf16,remat=dots,attention=xla"
SLOW_KNOBS = ("remat=full", "params=bf16,compute=bf16,remat=dots_no_batch")
LOSS_ATOL = 2e-5
PARAM_ATOL = 5e-5
# bfloat16 keeps 8 bits of mantissa (eps 7.8e-3): the loss of a bf16 run
# only has to stay near the float32 one; bf16 parameters are also drawn
# from different random bits at init.
BF16_LOSS_ATOL = 0.1
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _start(args: list[str], fast: bool) -> subprocess.Popen:
    flags = "--xla_force_host_platform_device_count=8" + (f" {FAST_COMPILE}" if fast else "")
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_workers(jobs: dict[str, list[str]], fast: bool = True) -> dict[str, str]:
    procs = {name: _start(args, fast) for name, args in jobs.items()}
    errors = {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=900)
            if proc.returncode:
                errors[name] = err
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    if fast and any("Unknown flag" in err for err in errors.values()):
        return _run_workers(jobs, fast=False)  # a jaxlib without those compile flags
    return errors


def _reports(tmp: Path, jobs: dict[str, list[str]]) -> dict:
    errors = _run_workers(jobs)
    assert not errors, "\n".join(
        f"{name} worker failed:\n{err[-6000:]}" for name, err in errors.items()
    )
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in jobs}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The meshes worker's JSON report (with FAST_KNOB)."""
    tmp = tmp_path_factory.mktemp("sharding")
    jobs = {"meshes": ["meshes", str(tmp / "meshes.json"), str(tmp / "checkpoints"), FAST_KNOB]}
    return _reports(tmp, jobs)["meshes"]


@pytest.fixture(scope="module")
def slow_knobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knobs")
    report = _reports(tmp, {"knobs": ["knobs", str(tmp / "knobs.json"), *SLOW_KNOBS]})
    return report["knobs"]["knobs"]


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_trains_like_one_device(worker, mesh):
    ref, run = worker["reference"], worker["meshes"][mesh]
    assert ref["devices"] == 1
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=0, atol=LOSS_ATOL)
    np.testing.assert_allclose(run["grad_norms"], ref["grad_norms"], rtol=1e-4)
    assert run["max_param_diff"] <= PARAM_ATOL
    assert all(math.isfinite(x) for x in run["losses"])


def test_microbatches_on_a_mesh_train_like_one_device(worker):
    ref, run = worker["reference"], worker["microbatches"]
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=0, atol=LOSS_ATOL)
    np.testing.assert_allclose(run["grad_norms"], ref["grad_norms"], rtol=1e-4)


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_split_as_the_rules_say(worker, mesh):
    run = worker["meshes"][mesh]
    for kind in ("params", "adam_mu"):  # the optimizer moments follow the parameters
        for path, leaf in run[kind].items():
            assert leaf["devices"] == 8, (kind, path)
            assert leaf["shard"] == leaf["expected"], (kind, path, leaf)
    split = {p for p, leaf in run["params"].items() if leaf["shard"] != leaf["shape"]}
    if mesh == "data=8":
        assert split == set()  # pure data parallelism replicates every parameter
    else:
        # Everything but the norms and biases of unsplit axes is split.
        assert {
            "['token_embed']",
            "['pos_embed']",
            "['blocks']['qkv_kernel']",
            "['blocks']['mlp_in_kernel']",
            "['blocks']['attn_out_kernel']",
        } <= split
    if mesh == "data=2,fsdp=2,tensor=2":
        params = run["params"]
        # qkv [layers, embed, qkv, heads, head_dim]: embed over fsdp, heads over tensor.
        assert params["['blocks']['qkv_kernel']"]["shape"] == [2, 32, 3, 4, 8]
        assert params["['blocks']['qkv_kernel']"]["shard"] == [2, 16, 3, 2, 8]
        # token embedding [vocab, embed]: vocab over tensor, embed over fsdp.
        assert params["['token_embed']"]["shard"] == [128, 16]
        assert params["['blocks']['mlp_in_kernel']"]["shard"] == [2, 16, 64]
        assert params["['ln_final']['scale']"]["shard"] == [32]  # norms stay whole


def test_checkpoint_from_8_devices_restores_on_4(worker):
    restore = worker["restore"]
    assert restore["all_equal"]
    assert restore["step"] == 10 and restore["next_step"] == 10
    assert restore["same_shardings"]
    for path, leaf in restore["params"].items():
        assert leaf["devices"] == 4 and leaf["shard"] == leaf["expected"], path


def test_batch_that_does_not_split_over_the_mesh_is_a_user_error(worker):
    assert worker["batch_error"] == (
        "train.batch_size=6 does not split into the 8 shards of the mesh's batch axes; "
        "use a multiple of 8"
    )


@pytest.mark.parametrize(
    "knob", [FAST_KNOB, *(pytest.param(k, marks=pytest.mark.slow) for k in SLOW_KNOBS)]
)
def test_memory_and_speed_knobs_train(worker, knob, request):
    ref = worker["reference"]["losses"]  # float32, no remat, one device
    runs = worker["knobs"] if knob == FAST_KNOB else request.getfixturevalue("slow_knobs")
    run = runs[knob]
    assert all(math.isfinite(x) for x in run["losses"])
    if "bf16" in knob:
        np.testing.assert_allclose(run["losses"], ref, rtol=0, atol=BF16_LOSS_ATOL)
    else:
        # Rematerialisation recomputes the same float32 operations: ten equal
        # losses mean equal updates too.
        np.testing.assert_allclose(run["losses"], ref, rtol=0, atol=LOSS_ATOL)
    assert run["param_dtypes"] == (["bfloat16"] if "params=bf16" in knob else ["float32"])


# In this process (one device): the rules table and the error messages.

SHAPE = ModelShape(n_layer=2, d_model=32, n_heads=4, n_ctx=16, vocab_size=256, d_ff=0)


def _abstract_state(model_cfg: ModelConfig):
    def init(rng):
        params = Transformer(model_cfg).init(rng, np.zeros((1, SHAPE.n_ctx), np.int32))["params"]
        return steps.TrainState.create(
            apply_fn=None, params=params, tx=steps.make_optimizer(base_config().train)
        )

    with nn.logical_axis_rules(sharding.RULES):
        return jax.eval_shape(init, jax.random.key(0))


def _boxed_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_rules_name_every_parameter_axis(remat):
    state = _abstract_state(ModelConfig(SHAPE, remat=remat))
    known = dict(sharding.RULES)
    params = _boxed_leaves(state.params)
    assert len(params) == 16
    for leaf in params:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert all(name in known for name in leaf.names), leaf.names
    # Only scalars (step counters) go without names: the moments are boxed too.
    for leaf in _boxed_leaves(state):
        assert isinstance(leaf, nn.Partitioned) or leaf.ndim == 0, leaf


def test_unknown_axes_are_errors():
    with pytest.raises(ValueError, match="unknown logical axis 'heads_typo'"):
        sharding.rules_with_overrides({"heads_typo": "tensor"})
    with pytest.raises(ValueError, match=r"mesh axes are \('data', 'fsdp', 'tensor'\)"):
        sharding.rules_with_overrides({"heads": "model"})
    state = _abstract_state(ModelConfig(SHAPE))
    mesh = sharding.make_mesh(1, 1, 1)
    without_heads = tuple((k, v) for k, v in sharding.RULES if k != "heads")
    with pytest.raises(ValueError, match=r"no sharding rule for logical axes \['heads'\]"):
        sharding.logical_shardings(state, mesh, without_heads)
    # Overrides that name real axes work; a replicated override is allowed.
    rules = sharding.rules_with_overrides({"embed": None, "mlp": ["fsdp", "tensor"]})
    assert dict(rules)["embed"] is None and dict(rules)["mlp"] == ("fsdp", "tensor")


def test_mesh_sizes_must_match_the_devices():
    n = len(jax.devices())
    assert n == 1  # the pytest process keeps one device; meshes run in the workers
    with pytest.raises(ValueError, match=r"= 8 devices, but 1 are present"):
        sharding.make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match="only one of mesh.data, mesh.fsdp may be -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="mesh.tensor=0 must be a positive integer"):
        sharding.make_mesh(1, 1, 0)
    with pytest.raises(ValueError, match="do not divide the 1 devices"):
        sharding.make_mesh(-1, 2, 1)
    assert dict(sharding.make_mesh().shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_cli_reports_a_mesh_mismatch_in_one_line(tmp_path, capsys):
    from launch import cli
    from scaling.store import Store

    saved = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    try:
        code = cli.main(
            [
                "run",
                "experiments/local_cpu.py",
                "--config.mesh.data=2",
                "--config.mesh.fsdp=2",
                "--config.mesh.tensor=2",
                "--config.train.steps=10",
                "--config.train.warmup_steps=2",
                f"--config.store={tmp_path / 'store.sqlite'}",
                f"--config.workdir={tmp_path / 'runs'}",
                f"--config.data.cache_dir={tmp_path / 'cache'}",
                "--config.progress=false",
            ]
        )
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    err = capsys.readouterr().err
    assert code == 2
    message = (
        "mesh data=2 x fsdp=2 x tensor=2 = 8 devices, but 1 are present; make the "
        "product equal the device count (or set one size to -1)"
    )
    assert err == f"error: {message}\n"
    # The run stays pending with the reason, and nothing was prepared or trained.
    with Store(str(tmp_path / "store.sqlite")) as store:
        (run,) = store.runs()
    assert (run.status, run.reason) == ("pending", message)
    assert not (tmp_path / "runs").exists()
