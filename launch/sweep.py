"""Many runs: expand a study's get_sweep() and train its members here, one after another.

Relaunching a sweep trains only what is left: finished runs are skipped,
interrupted ones resume from their last checkpoint (the run id is a hash of
the resolved config, so the same member always finds its own folder and
rows). A run that diverges is marked failed with its reason and the sweep
goes on; failed runs are not retried unless asked (`retry_failed`).
"""

from __future__ import annotations

import sys

from launch import config as config_lib
from launch import train
from scaling.store import Store


def run_sweep(path: str, overrides: dict, retry_failed: bool = False) -> dict[str, str]:
    """Train every unfinished member of the study at `path`; returns {run_id: status}."""
    members = config_lib.study_sweep(path, overrides)
    ids = [config_lib.run_id(c) for c in members]
    sweep_name = members[0].sweep_name
    outcome = {}
    stores: dict[str, Store] = {}
    try:
        for config, run_id in zip(members, ids, strict=True):
            store = stores.get(config.store) or stores.setdefault(config.store,
                                                                   Store(config.store))
            store.register_run(train.run_record(config, run_id), sweep=sweep_name)
        for store in stores.values():
            store.add_sweep(sweep_name, {"study": str(path), "overrides": overrides}, ids)

        for i, (config, run_id) in enumerate(zip(members, ids, strict=True), 1):
            store = stores[config.store]
            record = store.run(run_id)
            label = f"[{i}/{len(members)}] {run_id} (N={record.n_params:,})"
            if record.status == "finished":
                _say(config, f"{label}: finished earlier, skipped")
            elif record.status == "failed" and not retry_failed:
                _say(config, f"{label}: failed earlier ({record.reason}), skipped; "
                             "--retry-failed trains it again")
            else:
                verb = f"resuming at step {record.step}" if record.step else "training"
                _say(config, f"{label}: {verb}")
                try:
                    train.train_and_evaluate(config, store)
                except train.DivergedError as e:
                    _say(config, f"{label}: failed: {e}")
            outcome[run_id] = store.run(run_id).status
    finally:
        for store in stores.values():
            store.close()
    return outcome


def _say(config, line: str):
    if config.progress:
        print(line, file=sys.stderr, flush=True)
