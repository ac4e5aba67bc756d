"""`scaling sync SWEEP`: ingest the records remote runs wrote to a bucket into the local store.

Every write goes through the store's keyed API (register_run inserts once,
log_eval replaces the row of a (run, step), set_status overwrites), so a
sync run any number of times leaves exactly one copy of every record.
"""

from __future__ import annotations

import dataclasses
import math
import re

from launch import remote_records
from models.sizes import FLOP_CONVENTIONS
from scaling.errors import UserError
from scaling.store import STATUSES, RunRecord, Store

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunRecord)}


_STATUSES = set(STATUSES)
FLOAT32_MAX = 3.4028234663852886e38  # per-token vectors are stored as float32
_INT_FIELDS = ("n_params", "n_params_total", "n_layer", "d_model", "n_heads", "n_ctx", "tokens")
# A run id is the 12 hex digits of launch.config.run_id; anything else in a
# bucket's runs/ folder was not written by the trainer.
_RUN_ID = re.compile(r"[0-9a-f]{12}")


class BadRecord(Exception):
    """A run's records that cannot be ingested; the message says which file and why."""


def remote_runs(bucket: str, sweep: str | None, skipped: dict | None = None) -> list[dict]:
    """The checked records of every run in the bucket (of one sweep, if named). A run whose
    records are unreadable or malformed is left out, its reason in `skipped` (run id ->
    reason); a bucket that cannot be read at all is a UserError."""
    try:
        ids = remote_records.run_ids(bucket)
    except Exception as e:  # noqa: BLE001 - gcsfs missing, no credentials, no network
        raise UserError(
            f"cannot list the records in {bucket} ({type(e).__name__}: "
            f"{str(e)[:120]}); for gs:// `pip install gcsfs` and `gcloud auth "
            "application-default login`"
        ) from None
    runs = []
    for run_id in ids:
        try:
            remote = _checked(run_id, remote_records.read_run(bucket, run_id))
        except (BadRecord, OSError, ValueError, TypeError, KeyError) as e:
            if skipped is not None:
                skipped[run_id] = (
                    f"{type(e).__name__}: {e}" if not isinstance(e, BadRecord) else str(e)
                )
            continue
        if sweep is None or remote["run"]["config"].get("sweep_name") == sweep:
            runs.append(remote)
    return runs


def _checked(folder: str, remote: dict) -> dict:
    """`remote` if it is what the trainer writes, else BadRecord naming the first problem."""
    if not _RUN_ID.fullmatch(folder):
        raise BadRecord(f"runs/{folder[:40]!r} is not a run id (12 hex digits)")
    if remote.get("symlinks"):
        raise BadRecord(f"{remote['symlinks'][0]} is a symbolic link; records are plain files")
    run = remote["run"]
    if not isinstance(run, dict) or run.get("run_id") != folder:
        named = str(run.get("run_id") if isinstance(run, dict) else run)[:40]
        raise BadRecord(f"run.json names run {named!r}, not its folder's {folder}")
    if not isinstance(run.get("config"), dict) or not isinstance(
        run["config"].get("sweep_name"), str
    ):
        raise BadRecord("run.json has no config with a sweep_name")
    train = run["config"].get("train")
    if not isinstance(train, dict) or not _is_int(train.get("steps")) or train["steps"] < 1:
        raise BadRecord("run.json: config.train.steps is not a positive whole number")
    for key in _INT_FIELDS:
        if not _is_int(run.get(key)) or run[key] < 1:
            raise BadRecord(
                f"run.json: {key} = {str(run.get(key))[:40]!r} is not a positive whole number "
                "below 2**63"
            )
    if not _is_number(run.get("flops")) or run["flops"] <= 0:
        raise BadRecord(
            f"run.json: flops = {str(run.get('flops'))[:40]!r} is not a positive number"
        )
    _check_optional_fields(run)
    n_ctx = run["n_ctx"]
    for row in remote["evals"]:
        where = f"eval {str(row.get('step') if isinstance(row, dict) else row)[:20]}"
        if not isinstance(row, dict) or not _is_int(row.get("step")) or row["step"] < 0:
            raise BadRecord(f"{where}: the step is not a whole number >= 0")
        scalars = row.get("scalars")
        if (
            not isinstance(scalars, dict)
            or not all(_is_text(k) and _is_number(v) for k, v in scalars.items())
            or "eval_loss" not in scalars
        ):
            raise BadRecord(f"{where}: scalars must be finite numbers, eval_loss among them")
        for key in ("per_token", "per_token_stderr"):
            values = row.get(key)
            if key == "per_token_stderr" and values is None:
                continue
            if (
                not isinstance(values, list)
                or len(values) != n_ctx
                or not all(_is_number(v) and abs(v) <= FLOAT32_MAX for v in values)
            ):
                raise BadRecord(
                    f"{where}: {key} must be {n_ctx} finite numbers (n_ctx) within float32"
                )
        if row.get("per_token_stderr") is not None and (
            not _is_int(row.get("n_sequences")) or row["n_sequences"] < 1
        ):
            raise BadRecord(f"{where}: n_sequences is not a positive whole number")
    for environment in remote.get("environments", []):
        _check_environment(environment)
    status = remote["status"]
    if status is not None and (
        not isinstance(status, dict)
        or status.get("status") not in _STATUSES
        or not (status.get("step") is None or _is_int(status["step"]))
        or not (status.get("reason") is None or _is_text(status["reason"]))
    ):
        raise BadRecord(
            f"the newest status record is not one the trainer writes ({str(status)[:60]})"
        )
    return remote


def _check_environment(environment):
    """A record of what one start ran on, as launch/environment.py writes it."""
    packages = environment.get("packages") if isinstance(environment, dict) else None
    if (
        not isinstance(packages, dict)
        or not all(_is_text(k) and _is_text(v) for k, v in packages.items())
        or not _is_text(environment.get("device_kind"))
        or not _is_text(environment.get("platform"))
        or not _is_int(environment.get("device_count"))
        or not _is_int(environment.get("process_count"))
        or not _is_int(environment.get("time_ns"))
    ):
        raise BadRecord(
            f"an environment record is not one the trainer writes ({str(environment)[:60]})"
        )


def _check_optional_fields(run: dict):
    """The RunRecord fields run.json may leave out (their defaults then), when it has them."""
    if "status" in run and run["status"] not in _STATUSES:
        raise BadRecord(f"run.json: status = {str(run['status'])[:40]!r} is not a run status")
    if "step" in run and (not _is_int(run["step"]) or run["step"] < 0):
        raise BadRecord(f"run.json: step = {str(run['step'])[:40]!r} is not a whole number >= 0")
    if "reason" in run and not (run["reason"] is None or _is_text(run["reason"])):
        raise BadRecord("run.json: reason is neither UTF-8 text nor null")
    counts = run.get("flops_by_convention", {})
    if not isinstance(counts, dict) or not all(
        k in FLOP_CONVENTIONS and _is_number(v) for k, v in counts.items()
    ):
        raise BadRecord(
            f"run.json: flops_by_convention must map FLOP conventions "
            f"({', '.join(FLOP_CONVENTIONS)}) to finite numbers"
        )
    if "flop_convention" in run and run["flop_convention"] not in FLOP_CONVENTIONS:
        raise BadRecord(
            f"run.json: flop_convention = {str(run['flop_convention'])[:40]!r} is not one of "
            f"{', '.join(FLOP_CONVENTIONS)}"
        )


# SQLite's INTEGER is 64-bit: a larger Python int is refused by the driver, not stored.
_INT64 = range(-(2**63), 2**63)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in _INT64


def _is_text(value) -> bool:
    """A str SQLite can store: JSON may carry lone surrogates ("\\ud800"), which UTF-8 cannot."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value in _INT64
    return isinstance(value, float) and math.isfinite(value)


def sync(store: Store, bucket: str, sweep: str) -> dict:
    """Ingest one sweep's remote runs; returns {"runs": n, "evals": n, "skipped": {id: why}}.
    Every run is checked whole before anything of it is written."""
    skipped: dict[str, str] = {}
    runs = remote_runs(bucket, sweep, skipped)
    if not runs:
        why = "".join(f"; {i} skipped: {r}" for i, r in list(skipped.items())[:3])
        raise UserError(
            f"no runs of sweep {sweep!r} under {bucket}/runs; check the sweep "
            f"name (config.sweep_name) and --bucket{why}"
        )
    evals = 0
    for remote in runs:
        record = RunRecord(**{k: v for k, v in remote["run"].items() if k in _RUN_FIELDS})
        with store.batch():  # a run whole or not at all, also if the sync is killed
            store.register_run(record, sweep=sweep)
            for row in remote["evals"]:
                store.log_eval(
                    record.run_id,
                    row["step"],
                    row["scalars"],
                    row["per_token"],
                    row.get("per_token_stderr"),
                    row.get("n_sequences"),
                )
            for environment in remote.get("environments", []):
                started = environment["time_ns"] / 1e9
                kept = {k: v for k, v in environment.items() if k != "time_ns"}
                store.add_environment(record.run_id, kept, started=started)
            status = remote["status"]
            if status is not None:
                store.set_status(
                    record.run_id, status["status"], step=status["step"], reason=status["reason"]
                )
        evals += len(remote["evals"])
    return {"runs": len(runs), "evals": evals, "skipped": skipped}


def status_rows(bucket: str, sweep: str | None) -> list[dict]:
    """The rows of `scaling status` (scaling/figures/status.status_rows) read from the bucket."""
    rows = []
    for remote in remote_runs(bucket, sweep):
        run, status, evals = remote["run"], remote["status"] or {}, remote["evals"]
        rows.append(
            {
                "run_id": run["run_id"],
                "sweep": run["config"].get("sweep_name"),
                "status": status.get("status", "pending"),
                "step": max([e["step"] for e in evals] + [status.get("step") or 0]),
                "steps": run["config"]["train"]["steps"],
                "eval_loss": evals[-1]["scalars"]["eval_loss"] if evals else None,
                "n_params": run["n_params"],
                "tokens": run["tokens"],
                "reason": status.get("reason"),
            }
        )
    return sorted(rows, key=lambda r: (r["n_params"], r["run_id"]))
