"""Train a tiny model under several meshes of 8 simulated CPU devices; report as JSON.

Run by tests/test_sharding.py in a subprocess whose environment sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the pytest process
itself keeps one device). Usage:

    python tests/sharding_worker.py meshes OUT.json CKPT_DIR [KNOB ...]
    python tests/sharding_worker.py knobs OUT.json KNOB ...

For each mesh it trains the same ten steps on the same synthetic batches
that the single-device reference trains (mesh (1, 1, 1) on devices[:1]) and
records the losses, the largest parameter difference from the reference
and, leaf by leaf, whether each parameter and optimizer moment is split
exactly as RULES says; and the (2, 2, 2) mesh's steps taken in two
microbatches. Then it writes a checkpoint of the (2, 2, 2) state
and restores it under a 4-device mesh. KNOB names a setting of the memory
and speed knobs (dtypes, rematerialisation, attention kernel) in KNOBS,
trained on one device. The assertions live in the test.
"""

from __future__ import annotations

import json
import math
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from launch import checkpoints, distributed, steps
from launch.config import base_config
from models import sharding
from models.sizes import ModelShape
from models.transformer import ModelConfig, Transformer
from scaling.errors import UserError

jax.config.update("jax_numpy_rank_promotion", "raise")

MESHES = {"data=8": (8, 1, 1), "data=2,fsdp=2,tensor=2": (2, 2, 2), "fsdp=4,tensor=2": (1, 4, 2)}
SHAPE = ModelShape(n_layer=2, d_model=32, n_heads=4, n_ctx=16, vocab_size=256, d_ff=0)
MODEL = ModelConfig(SHAPE)
# Memory and speed knobs, each trained on one device; every value of every
# knob except attention_impl=cudnn (GPU only) appears at least once.
KNOBS = {
    "compute=bf16,remat=dots,attention=xla": dict(
        compute_dtype="bfloat16", remat="dots", attention_impl="xla"
    ),
    "remat=full": dict(remat="full"),
    "params=bf16,compute=bf16,remat=dots_no_batch": dict(
        param_dtype="bfloat16", compute_dtype="bfloat16", remat="dots_no_batch"
    ),
}
STEPS, BATCH = 10, 8


def train_config():
    c = base_config().train
    c.steps, c.batch_size, c.warmup_steps, c.learning_rate = STEPS, BATCH, 2, 3e-3
    return c


def batches() -> np.ndarray:
    # Synthetic tokens with some structure (a noisy copy of the previous
    # token) so the loss moves over ten steps.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SHAPE.vocab_size, (STEPS, BATCH, SHAPE.n_ctx + 1))
    copy = rng.random(tokens.shape) < 0.5
    tokens[..., 1:] = np.where(copy[..., 1:], tokens[..., :-1], tokens[..., 1:])
    return tokens.astype(np.int32)


def train(mesh, tokens, model=MODEL, microbatches=1):
    rules = sharding.RULES
    tx = steps.make_optimizer(train_config())
    state, shardings = steps.init_state(model, tx, mesh, rules, seed=0)
    train_step, _ = steps.compile_steps(
        shardings, mesh, rules, state.apply_fn, microbatches=microbatches
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)

    def put(b):
        return jax.make_array_from_process_local_data(batch_sharding, b)

    losses, grad_norms = [], []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for b in tokens:
            state, metrics = train_step(state, put(b))
            losses.append(float(metrics["train_loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    return state, shardings, losses, grad_norms


def logical_names() -> dict[str, tuple]:
    """Each parameter's logical axis names, by its path."""
    boxed = jax.eval_shape(
        lambda r: Transformer(MODEL).init(r, np.zeros((1, SHAPE.n_ctx), np.int32))["params"],
        jax.random.key(0),
    )
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    return {jax.tree_util.keystr(path): tuple(leaf.names) for path, leaf in leaves}


def layout_report(tree, names: dict[str, tuple], mesh) -> dict:
    """For each leaf: its shard shape, and the one RULES implies; whether it is split."""
    rules = dict(sharding.RULES)
    report = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        expected = []
        for dim, name in zip(leaf.shape, names[key], strict=True):
            axes = rules[name]
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            expected.append(dim // math.prod(mesh.shape[a] for a in axes))
        report[key] = {
            "names": names[key],
            "shape": list(leaf.shape),
            "shard": list(leaf.addressable_shards[0].data.shape),
            "expected": expected,
            "devices": len(leaf.sharding.device_set),
            "spec": str(leaf.sharding.spec),
        }
    return report


def max_abs_diff(a, b) -> float:
    def diff(x, y):
        return float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))

    return max(jax.tree.leaves(jax.tree.map(diff, a, b)))


def adam_mu(opt_state):
    """The first moments, a tree shaped like the parameters."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
    return found[0].mu


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def meshes(out_path: str, ckpt_dir: str, *knob_labels: str):
    """Every mesh of MESHES against one device; the checkpoint; the batch-layout error.

    Then the knob settings named, as `knobs` would train them.
    """
    start = time.perf_counter()
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 simulated devices, found {len(devices)}"
    tokens = batches()
    names = logical_names()
    ref_mesh = sharding.make_mesh(1, 1, 1, devices=devices[:1])
    ref, _, ref_losses, ref_norms = train(ref_mesh, tokens)
    result = {
        "reference": {
            "losses": ref_losses,
            "grad_norms": ref_norms,
            "devices": len(jax.tree.leaves(ref.params)[0].sharding.device_set),
        },
        "meshes": {},
        "seconds": {"reference": time.perf_counter() - start},
    }

    kept = None
    for label, (d, f, t) in MESHES.items():
        mesh = sharding.make_mesh(d, f, t)
        state, _, losses, norms = train(mesh, tokens)
        result["meshes"][label] = {
            "losses": losses,
            "grad_norms": norms,
            "max_param_diff": max_abs_diff(state.params, ref.params),
            "params": layout_report(state.params, names, mesh),
            "adam_mu": layout_report(adam_mu(state.opt_state), names, mesh),
        }
        result["seconds"][label] = time.perf_counter() - start
        if (d, f, t) == (2, 2, 2):
            kept = state

    # The same steps in microbatches, on a mesh that splits the rows and the parameters.
    _, _, losses, norms = train(sharding.make_mesh(2, 2, 2), tokens, microbatches=2)
    result["microbatches"] = {"losses": losses, "grad_norms": norms}

    # Save under the 8-device mesh, restore under data=2, fsdp=2 on 4 devices.
    saver = checkpoints.Checkpointer(ckpt_dir, max_to_keep=1)
    saver.save(STEPS, kept, "synthetic")
    saver.close()
    mesh4 = sharding.make_mesh(2, 2, 1, devices=devices[:4])
    with nn.logical_axis_rules(sharding.RULES):
        abstract = jax.eval_shape(
            lambda r: steps.TrainState.create(
                apply_fn=None,
                tx=steps.make_optimizer(train_config()),
                params=Transformer(MODEL).init(r, np.zeros((1, SHAPE.n_ctx), np.int32))["params"],
            ),
            jax.random.key(0),
        )
        shardings4 = sharding.logical_shardings(abstract, mesh4, sharding.RULES)
    # `kept` lends only shapes and dtypes: restore reads every value from disk.
    loader = checkpoints.Checkpointer(ckpt_dir, max_to_keep=1)
    restored, next_step = loader.restore_latest(kept, shardings4, "synthetic")
    loader.close()
    equal = jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
        (restored.params, restored.opt_state),
        (kept.params, kept.opt_state),
    )
    result["restore"] = {
        "next_step": next_step,
        "step": int(restored.step),
        "all_equal": all(jax.tree.leaves(equal)),
        "params": layout_report(restored.params, names, mesh4),
        "same_shardings": all(
            jax.tree.leaves(
                jax.tree.map(
                    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                    restored.params,
                    shardings4.params,
                )
            )
        ),
    }
    result["seconds"]["restore"] = time.perf_counter() - start

    # A batch the mesh's batch axes cannot split is a one-line user error.
    batch8 = sharding.batch_sharding(sharding.make_mesh(8, 1, 1), sharding.RULES)
    distributed.check_batch_layout(batch8, (BATCH, SHAPE.n_ctx + 1))
    try:
        distributed.check_batch_layout(batch8, (6, SHAPE.n_ctx + 1))
        result["batch_error"] = None
    except UserError as e:
        result["batch_error"] = str(e)
    result["knobs"] = train_knobs(ref_mesh, tokens, knob_labels)
    result["seconds"]["total"] = time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


def knobs(out_path: str, *knob_labels: str):
    """The named KNOBS settings, each trained on one device.

    The float32 reference to compare them with is the one `meshes` trains.
    """
    start = time.perf_counter()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    result = {"knobs": train_knobs(mesh, batches(), knob_labels)}
    result["seconds"] = time.perf_counter() - start
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


def train_knobs(mesh, tokens, labels) -> dict:
    runs = {}
    for label in labels:
        state, _, losses, _ = train(mesh, tokens, ModelConfig(SHAPE, **KNOBS[label]))
        runs[label] = {
            "losses": losses,
            "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
        }
    return runs


if __name__ == "__main__":
    {"meshes": meshes, "knobs": knobs}[sys.argv[1]](*sys.argv[2:])
