"""A run's records in its bucket, next to its checkpoints, for `scaling sync` to ingest.

When `config.launch.bucket` is set, process 0 of the trainer also writes,
through `etils.epath` (a local folder or gs://):

    <bucket>/runs/<run_id>/records/run.json                 the run (config, N, D, C)
    <bucket>/runs/<run_id>/records/eval/<step>.json          one eval: scalars, per-token loss
    <bucket>/runs/<run_id>/records/status/<time_ns>.json     each status change

Files are only added, never edited or deleted (a status change is a new
file; the newest is the run's status), and each is written whole
(`launch.corpus.atomic_write`: one upload on GCS, a temporary name moved into place in a
folder), so a reader sees a file complete or not at all. Writing the same eval step
again (a resume past the last checkpoint) replaces it with the same content, so
everything is idempotent, and the store's keyed writes make ingesting it twice a no-op.
"""

from __future__ import annotations

import json
import os
import time

from etils import epath

from launch.corpus import atomic_write

RUN, EVAL, STATUS, ENVIRONMENT = "run.json", "eval", "status", "environment"


def run_dir(bucket: str, run_id: str) -> epath.Path:
    """The run's folder in the bucket; its checkpoints go to <run_dir>/checkpoints."""
    return epath.Path(bucket) / "runs" / run_id


def records_dir(bucket: str, run_id: str) -> epath.Path:
    return run_dir(bucket, run_id) / "records"


def _write(path: epath.Path, payload: dict):
    atomic_write(path, json.dumps(payload, sort_keys=True).encode("utf-8"))


class RunRecords:
    """The writer of one run's records (process 0 only)."""

    def __init__(self, bucket: str, run_id: str):
        self.run_id = run_id
        self.directory = records_dir(bucket, run_id)

    def start(self, record: dict):
        """The run's description (a RunRecord as a dict); the same every time."""
        _write(self.directory / RUN, record)

    def eval(
        self,
        step: int,
        scalars: dict,
        per_token,
        per_token_stderr=None,
        n_sequences: int | None = None,
    ):
        payload = {
            "step": int(step),
            "scalars": scalars,
            "per_token": [float(x) for x in per_token],
        }
        if per_token_stderr is not None:
            payload["per_token_stderr"] = [float(x) for x in per_token_stderr]
            payload["n_sequences"] = int(n_sequences)
        _write(self.directory / EVAL / f"{int(step):09d}.json", payload)

    def status(self, status: str, step: int | None = None, reason: str | None = None):
        now = time.time_ns()
        _write(
            self.directory / STATUS / f"{now:020d}.json",
            {"status": status, "step": step, "reason": reason, "time_ns": now},
        )

    def environment(self, environment: dict):
        """What this start of the run ran on (launch/environment.py), one file per start."""
        now = time.time_ns()
        _write(self.directory / ENVIRONMENT / f"{now:020d}.json", {**environment, "time_ns": now})

    def finished(self) -> bool:
        latest = latest_status(self.directory)
        return latest is not None and latest["status"] == "finished"


def for_config(config, run_id: str) -> RunRecords | None:
    """The run's record writer when its config names a bucket, else None."""
    return RunRecords(config.launch.bucket, run_id) if config.launch.bucket else None


# -- reading ------------------------------------------------------------------


def latest_status(directory: epath.Path) -> dict | None:
    folder = directory / STATUS
    if not folder.exists():
        return None
    names = sorted(
        p.name for p in folder.iterdir() if p.name.endswith(".json") and not p.name.startswith(".")
    )
    return json.loads((folder / names[-1]).read_text()) if names else None


def run_ids(bucket: str) -> list[str]:
    """Every run with records in the bucket, as it is now."""
    runs = epath.Path(bucket) / "runs"
    _forget_listings(runs)
    if not runs.exists():
        return []
    return sorted(p.name for p in runs.iterdir() if (p / "records" / RUN).exists())


def _forget_listings(path: epath.Path) -> None:
    """Drop the folder listings gcsfs keeps for the life of the process (etils holds one
    filesystem per protocol), so that a second `sync` or `status` in one process, a
    notebook's, sees the runs written since the first."""
    if str(path).startswith("gs://"):  # the only remote bucket a config may name
        from etils.epath import backend

        backend.fsspec_backend.fs(path).invalidate_cache()


def read_run(bucket: str, run_id: str) -> dict:
    """{"run": run.json, "status": newest status or None, "evals": [eval, ...] by step,
    "environments": [what each start ran on, oldest first], "symlinks": [paths that are
    symbolic links]} (a local bucket can hold links; the trainer never writes one, so
    `scaling sync` refuses a run that has any)."""
    directory = records_dir(bucket, run_id)
    paths = [run_dir(bucket, run_id), directory, directory / RUN]
    found = {}
    for folder in (EVAL, ENVIRONMENT):
        found[folder] = []
        if (directory / folder).exists():
            for path in sorted(directory.joinpath(folder).iterdir(), key=lambda p: p.name):
                if path.name.endswith(".json") and not path.name.startswith("."):
                    paths.append(path)
                    found[folder].append(json.loads(path.read_text()))
    return {
        "run": json.loads((directory / RUN).read_text()),
        "status": latest_status(directory),
        "evals": found[EVAL],
        "environments": found[ENVIRONMENT],
        "symlinks": [str(p) for p in paths if _is_link(p)],
    }


def _is_link(path: epath.Path) -> bool:
    return not str(path).startswith("gs://") and os.path.islink(str(path))
