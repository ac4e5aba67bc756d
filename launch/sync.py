"""`scaling sync SWEEP`: ingest the records remote runs wrote to a bucket into the local store.

Every write goes through the store's keyed API (register_run inserts once,
log_eval replaces the row of a (run, step), set_status overwrites), so a
sync run any number of times leaves exactly one copy of every record.
"""

from __future__ import annotations

import dataclasses

from launch import remote_records
from scaling.errors import UserError
from scaling.store import RunRecord, Store

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunRecord)}


def remote_runs(bucket: str, sweep: str | None) -> list[dict]:
    """The records of every run in the bucket (of one sweep, if named)."""
    try:
        runs = [remote_records.read_run(bucket, i) for i in remote_records.run_ids(bucket)]
    except Exception as e:  # noqa: BLE001 - gcsfs missing, no credentials, no network
        raise UserError(f"cannot read the records in {bucket} ({type(e).__name__}: "
                        f"{str(e)[:120]}); for gs:// `pip install gcsfs` and `gcloud auth "
                        "application-default login`") from None
    return [r for r in runs if sweep is None or r["run"]["config"].get("sweep_name") == sweep]


def sync(store: Store, bucket: str, sweep: str) -> dict[str, int]:
    """Ingest one sweep's remote runs; returns {"runs": n, "evals": n}."""
    runs = remote_runs(bucket, sweep)
    if not runs:
        raise UserError(f"no runs of sweep {sweep!r} under {bucket}/runs; check the sweep "
                        "name (config.sweep_name) and --bucket")
    evals = 0
    for remote in runs:
        record = RunRecord(**{k: v for k, v in remote["run"].items() if k in _RUN_FIELDS})
        store.register_run(record, sweep=sweep)
        for row in remote["evals"]:
            store.log_eval(record.run_id, row["step"], row["scalars"], row["per_token"],
                           row.get("per_token_stderr"), row.get("n_sequences"))
            evals += 1
        status = remote["status"]
        if status is not None:
            store.set_status(record.run_id, status["status"], step=status["step"],
                             reason=status["reason"])
    return {"runs": len(runs), "evals": evals}


def status_rows(bucket: str, sweep: str | None) -> list[dict]:
    """The rows of `scaling status` (scaling/status.status_rows) read from the bucket."""
    rows = []
    for remote in remote_runs(bucket, sweep):
        run, status, evals = remote["run"], remote["status"] or {}, remote["evals"]
        rows.append({
            "run_id": run["run_id"],
            "sweep": run["config"].get("sweep_name"),
            "status": status.get("status", "pending"),
            "step": max([e["step"] for e in evals] + [status.get("step") or 0]),
            "steps": run["config"]["train"]["steps"],
            "eval_loss": evals[-1]["scalars"]["eval_loss"] if evals else None,
            "n_params": run["n_params"],
            "tokens": run["tokens"],
            "reason": status.get("reason"),
        })
    return sorted(rows, key=lambda r: (r["n_params"], r["run_id"]))
