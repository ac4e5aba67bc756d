"""What a sweep will cost, before anything runs: `scaling plan CONFIG`.

Per member: parameters, tokens, training FLOPs under every convention of
models/sizes.py, and for an accelerator slice the wall hours and
chip-hours at an assumed model FLOP utilisation (MFU); then the totals.

Time is computed from the FLOPs under the trainer's own convention
(DEFAULT_FLOP_CONVENTION, 6N + attention), the one its `mfu` metric is
measured in, so a measured MFU and the estimate speak of the same FLOPs.
The `flops` of a member is under the study's own convention (a study file
may name it as FLOP_CONVENTION; Chinchilla's budgets are 6 N_total D).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path

from launch import config as config_lib
from launch.shards import SPLITS, manifest_path
from models.sizes import DEFAULT_FLOP_CONVENTION, FLOP_CONVENTIONS
from scaling.errors import UserError

DEFAULT_MFU = 0.4  # when the store has no measured MFU
# Tokens a core tokenises per second (`scaling prepare`, a 32k byte-level BPE over source code)
# when no prepared manifest gives its own measured rate; the README's kernel-source measurement.
DEFAULT_TOKENISE_RATE = 730_000


@dataclasses.dataclass(frozen=True)
class Accelerator:
    family: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    cores_per_chip: int  # how many units the type name counts per chip
    source: str


# Type names end in a count: TPU v4 and v5p count TensorCores (2 per chip),
# v5e (v5litepod) and v6e count chips; GPUs are named here by chips.
ACCELERATORS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip, 2 TensorCores;
    # "v4-32" is 32 TensorCores = 16 chips.
    "v4": Accelerator("v4", 275e12, 2, "cloud.google.com/tpu/docs/v4"),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip, 1 TensorCore;
    # "v5litepod-16" is 16 chips.
    "v5litepod": Accelerator("v5litepod", 197e12, 1, "cloud.google.com/tpu/docs/v5e"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip, 2 TensorCores;
    # "v5p-32" is 16 chips.
    "v5p": Accelerator("v5p", 459e12, 2, "cloud.google.com/tpu/docs/v5p"),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip, 1 TensorCore;
    # "v6e-16" is 16 chips.
    "v6e": Accelerator("v6e", 918e12, 1, "cloud.google.com/tpu/docs/v6e"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity).
    "h100": Accelerator("h100", 989e12, 1, "nvidia.com/en-us/data-center/h100 (SXM, dense)"),
    # NVIDIA A100 datasheet: 312 TFLOP/s dense bf16.
    "a100": Accelerator("a100", 312e12, 1, "nvidia.com/en-us/data-center/a100 (dense)"),
}
ALIASES = {"v5e": "v5litepod"}


def parse_accelerator(name: str) -> tuple[Accelerator, int]:
    """(accelerator, chips) of a type name such as v4-32, v5litepod-16, v5p-32, h100-8."""
    match = re.fullmatch(r"([a-z0-9]+?)-(\d+)", name.strip().lower())
    known = ", ".join(f"{k}-N" for k in ACCELERATORS)
    if not match:
        raise UserError(f"--accelerator {name!r} is not TYPE-COUNT; use one of {known}")
    family, count = ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    if family not in ACCELERATORS:
        raise UserError(f"unknown accelerator {match.group(1)!r}; known: {known}")
    acc = ACCELERATORS[family]
    if count <= 0 or count % acc.cores_per_chip:
        raise UserError(
            f"--accelerator {name!r}: {family} names count TensorCores, "
            f"{acc.cores_per_chip} per chip; use a multiple of {acc.cores_per_chip}"
        )
    return acc, count // acc.cores_per_chip


def measured_mfu(store_path: str) -> float | None:
    """Median of the last `mfu` of every finished run in the store, or None."""
    if not Path(store_path).exists():
        return None
    from scaling.store import Store

    values = []
    with Store(store_path) as store:
        for run in store.runs():
            if run.status == "finished":
                _, mfu = store.scalars(run.run_id, "mfu")
                if len(mfu) and mfu[-1] > 0:
                    values.append(float(mfu[-1]))
    return statistics.median(values) if values else None


def study_convention(path: str) -> str:
    module, _, _ = config_lib.load_study(path)
    convention = getattr(module, "FLOP_CONVENTION", DEFAULT_FLOP_CONVENTION)
    if convention not in FLOP_CONVENTIONS:
        raise UserError(
            f"{path}: FLOP_CONVENTION={convention!r} is not one of {', '.join(FLOP_CONVENTIONS)}"
        )
    return convention


def make_plan(
    path: str,
    overrides: dict,
    accelerator: str | None = None,
    mfu: float | None = None,
    store: str | None = None,
    price: float | None = None,
    storage_price: float | None = None,
) -> dict:
    """The plan as a JSON-ready dict: {"runs": [...], "total_flops", "chip_hours", "data", ...};
    with `price` (USD per chip-hour) also each run's "cost" and the total "cost"; with
    `storage_price` (USD per GB-month) the corpus's storage cost in "data"."""
    members = config_lib.study_sweep(path, overrides)
    convention = study_convention(path)
    if mfu is None:
        store = store or members[0].store
        found = measured_mfu(store)
        mfu, mfu_source = (
            (found, f"median mfu of the finished runs in {store}")
            if found
            else (DEFAULT_MFU, "default (no finished run in the store)")
        )
    else:
        mfu_source = "--mfu"
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1]")
    acc, chips = parse_accelerator(accelerator) if accelerator else (None, None)
    if price is not None and not (price > 0 and math.isfinite(price)):
        raise UserError(f"--price {price} must be a finite price per chip-hour above 0")
    if price is not None and not acc:
        raise UserError("--price is per chip-hour: give the chips too, with --accelerator")

    runs = []
    for config in members:
        shape = config_lib.model_config(config).shape
        tokens = config.train.steps * config.train.batch_size * shape.n_ctx
        by_convention = {c: float(shape.flops_per_token(c)) * tokens for c in FLOP_CONVENTIONS}
        run = {
            "run_id": config_lib.run_id(config),
            "params": shape.n_params_kaplan,
            "params_total": shape.n_params,
            "tokens": tokens,
            "flops": by_convention[convention],
            "flops_by_convention": by_convention,
            "steps": config.train.steps,
            "batch_size": config.train.batch_size,
        }
        if acc:
            seconds = by_convention[DEFAULT_FLOP_CONVENTION] / (chips * acc.peak_flops * mfu)
            run["wall_hours"] = seconds / 3600
            run["chip_hours"] = seconds / 3600 * chips
            if price:
                run["cost"] = run["chip_hours"] * price
        runs.append(run)
    plan = {
        "study": path,
        "sweep": members[0].sweep_name,
        "flop_convention": convention,
        "runs": runs,
        "total_tokens": sum(r["tokens"] for r in runs),
        "total_flops": sum(r["flops"] for r in runs),
        "total_flops_by_convention": {
            c: sum(r["flops_by_convention"][c] for r in runs) for c in FLOP_CONVENTIONS
        },
        "mfu": mfu,
        "mfu_source": mfu_source,
        "chip_hours": sum(r["chip_hours"] for r in runs) if acc else None,
        "wall_hours": sum(r["wall_hours"] for r in runs) if acc else None,
    }
    if price:
        plan["price_per_chip_hour"] = price
        plan["cost"] = sum(r["cost"] for r in runs)
    plan["data"] = data_plan(members, storage_price)
    if acc:
        plan["accelerator"] = {
            "type": accelerator,
            "chips": chips,
            "peak_flops_per_chip": acc.peak_flops,
            "source": acc.source,
        }
    return plan


def data_plan(members, storage_price: float | None = None) -> dict:
    """The corpus's one-time cost: tokens, bytes of shards, core-hours to tokenise them, and
    storage per month. From the manifest where the study names one (its own counts and measured
    rate), else for one epoch of the largest member's tokens at DEFAULT_TOKENISE_RATE."""
    if storage_price is not None and not (storage_price > 0 and math.isfinite(storage_price)):
        raise UserError(f"--storage-price {storage_price} must be a finite USD per GB-month > 0")
    config = members[0]
    if config.data.get("manifest"):
        try:
            manifest = json.loads(manifest_path(config.data.manifest).read_text())
            splits = [manifest["splits"][s] for s in SPLITS]
            tokens = sum(s["tokens"] for s in splits)
            size = sum(shard["size"] for s in splits for shard in s["shards"])
            done = manifest["prepare"]
            rate = tokens / (done["tokenise_seconds"] * done["workers"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            raise UserError(
                f"data.manifest={config.data.manifest}: cannot read its counts ({e}); "
                "give the folder `scaling prepare --out` wrote"
            ) from None
        source = f"manifest {config.data.manifest} (prepared: its own rate)"
    else:
        vocab = max(config_lib.model_config(c).shape.vocab_size for c in members)
        tokens = max(c.train.steps * c.train.batch_size * c.model.n_ctx for c in members)
        size = tokens * (2 if vocab <= 1 << 16 else 4)
        rate = DEFAULT_TOKENISE_RATE
        source = "one epoch of the largest member's tokens (no data.manifest yet)"
    data = {
        "tokens": tokens,
        "gigabytes": size / 1e9,
        "tokenise_core_hours": tokens / rate / 3600,
        "tokens_per_core_s": rate,
        "source": source,
    }
    if storage_price:
        data["storage_price_per_gb_month"] = storage_price
        data["storage_cost_per_month"] = size / 1e9 * storage_price
    return data


def plan_table(plan: dict) -> str:
    """The plan as a table, one line per member, then the totals."""
    timed = plan["chip_hours"] is not None
    head = (
        f"{'run_id':12}  {'N (non-emb)':>12}  {'N (total)':>12}  {'tokens':>10}  "
        f"{'FLOPs (' + plan['flop_convention'] + ')':>18}"
    )
    priced = "cost" in plan
    lines = [
        head
        + (f"  {'wall h':>9}  {'chip h':>10}" if timed else "")
        + (f"  {'USD':>10}" if priced else "")
    ]
    for r in plan["runs"]:
        line = (
            f"{r['run_id']:12}  {r['params']:>12,}  {r['params_total']:>12,}  "
            f"{r['tokens']:>10.3g}  {r['flops']:>18.3e}"
        )
        if timed:
            line += f"  {r['wall_hours']:>9.3g}  {r['chip_hours']:>10.3g}"
        if priced:
            line += f"  {r['cost']:>10,.2f}"
        lines.append(line)
    lines.append(totals_line(plan))
    for convention, flops in plan["total_flops_by_convention"].items():
        lines.append(f"  FLOPs as {convention}: {flops:.3e}")
    if timed:
        acc = plan["accelerator"]
        lines.append(
            f"  at MFU {plan['mfu']:.2f} ({plan['mfu_source']}) on {acc['type']} = "
            f"{acc['chips']} chips x {acc['peak_flops_per_chip']:.3g} FLOP/s "
            f"({acc['source']})"
        )
    data = plan["data"]
    line = (
        f"data, once: {data['tokens']:.3g} tokens = {data['gigabytes']:,.1f} GB of shards, "
        f"{data['tokenise_core_hours']:,.2f} core-hours to tokenise at "
        f"{data['tokens_per_core_s']:,.0f} tokens/s per core"
    )
    if "storage_cost_per_month" in data:
        line += f", USD {data['storage_cost_per_month']:,.2f} per month stored"
    lines.append(line + f" ({data['source']})")
    return "\n".join(lines)


def totals_line(plan: dict) -> str:
    line = (
        f"total: {len(plan['runs'])} runs, {plan['total_tokens']:.3g} tokens, "
        f"{plan['total_flops']:.3e} FLOPs ({plan['flop_convention']})"
    )
    if plan["chip_hours"] is not None:
        line += (
            f", {plan['wall_hours']:.3g} wall hours one after another, "
            f"{plan['chip_hours']:.3g} chip-hours"
        )
    if "cost" in plan:
        line += f", USD {plan['cost']:,.2f} at {plan['price_per_chip_hour']:g} per chip-hour"
    return line
