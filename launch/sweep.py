"""Many runs: expand a study's get_sweep() and train its members here, one after another.

Relaunching a sweep trains only what is left: finished runs are skipped,
interrupted ones resume from their last checkpoint (the run id is a hash of
the resolved config, so the same member always finds its own folder and
rows). A run that diverges is marked failed with its reason and the sweep
goes on; failed runs are not retried unless asked (`retry_failed`).

When the sweep runs as several processes (hosts), process 0 alone reads the
store and decides what to train; the others follow its decisions, so every
process enters the same runs in the same order.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from launch import config as config_lib
from launch import preflight, train
from scaling.checks import design
from scaling.store import Store

SKIP, TRAIN = 0, 1


def run_sweep(path: str, overrides: dict, retry_failed: bool = False) -> dict[str, str]:
    """Train every unfinished member of the study at `path`.

    Returns {run_id: status} as the store has it afterwards (process 0), or
    {run_id: "followed"} on the other processes, which never read the store.
    """
    members = config_lib.study_sweep(path, overrides)
    ids = [config_lib.run_id(c) for c in members]
    for config in members:  # every member's data and disk, before the store is touched
        preflight.check_run(config)
    is_writer = jax.process_index() == 0
    if is_writer:
        for warning in design_warnings(members):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    stores: dict[str, Store] = {}
    try:
        if is_writer:
            stores = _open_stores(members, ids, overrides, str(path))
            actions = [
                _decide(
                    members[i],
                    ids[i],
                    stores[members[i].store],
                    retry_failed,
                    f"[{i + 1}/{len(members)}]",
                )
                for i in range(len(members))
            ]
        else:
            actions = [SKIP] * len(members)
        if jax.process_count() > 1:
            actions = multihost_utils.broadcast_one_to_all(np.array(actions, np.int32)).tolist()

        outcome = {}
        for config, run_id, action in zip(members, ids, actions, strict=True):
            store = stores.get(config.store)
            if action == TRAIN:
                try:
                    train.train_and_evaluate(config, store)
                except train.DivergedError as e:
                    _say(config, f"{run_id}: failed: {e}")
                except train.RunBusy as e:  # another sweep trains it now: go on to the next
                    print(f"{run_id}: skipped: {e}", file=sys.stderr, flush=True)
                    outcome[run_id] = "busy"
                    continue
            outcome[run_id] = store.run(run_id).status if is_writer else "followed"
        return outcome
    finally:
        for store in stores.values():
            store.close()


def members_to_train(path: str, overrides: dict, retry_failed: bool = False) -> list[str]:
    """Register the sweep's runs (as run_sweep does) and return the ids still to train."""
    members = config_lib.study_sweep(path, overrides)
    ids = [config_lib.run_id(c) for c in members]
    stores = _open_stores(members, ids, overrides, str(path))
    try:
        return [
            run_id
            for i, (config, run_id) in enumerate(zip(members, ids, strict=True))
            if _decide(
                config, run_id, stores[config.store], retry_failed, f"[{i + 1}/{len(members)}]"
            )
            == TRAIN
        ]
    finally:
        for store in stores.values():
            store.close()


def member_statuses(path: str, overrides: dict) -> dict[str, str]:
    """{run_id: status} of every member, as its store has it."""
    members = config_lib.study_sweep(path, overrides)
    statuses = {}
    for config in members:
        with Store(config.store) as store:
            record = store.run(config_lib.run_id(config))
            statuses[config_lib.run_id(config)] = record.status if record else "pending"
    return statuses


def design_warnings(members, law: str | None = None) -> list[str]:
    """`scaling.checks.design.check_design` on the members' N, D, C and eval steps.

    law: the law the sweep is for; by default chinchilla when D varies across
    the members, else saturating (L(N)).
    """
    records = [train.run_record(c, "") for c in members]
    n = np.array([r.n_params for r in records], float)
    d = np.array([r.tokens for r in records], float)
    c = np.array([r.flops for r in records], float)
    steps = [train.eval_schedule(m.train.steps, m.eval.points) for m in members]
    if law is None:
        law = "chinchilla" if np.ptp(np.log(d)) > 1e-3 else "saturating"
    return design.check_design(n, d, c, steps, law=law)


def _open_stores(members, ids, overrides, study: str) -> dict[str, Store]:
    """Open each member's store and register the sweep's runs, so `status` lists them all."""
    sweep_name = members[0].sweep_name
    stores: dict[str, Store] = {}
    for config, run_id in zip(members, ids, strict=True):
        if config.store not in stores:
            stores[config.store] = Store(config.store)
        stores[config.store].register_run(train.run_record(config, run_id), sweep=sweep_name)
    for store in stores.values():
        store.add_sweep(sweep_name, {"study": study, "overrides": overrides}, ids)
    return stores


def _decide(config, run_id: str, store: Store, retry_failed: bool, position: str) -> int:
    record = store.run(run_id)
    label = f"{position} {run_id} (N={record.n_params:,})"
    if record.status == "finished":
        _say(config, f"{label}: finished earlier, skipped")
        return SKIP
    if record.status == "failed" and not retry_failed:
        _say(
            config,
            f"{label}: failed earlier ({record.reason}), skipped; --retry-failed trains it again",
        )
        return SKIP
    _say(
        config, f"{label}: " + (f"resuming after step {record.step}" if record.step else "training")
    )
    return TRAIN


def _say(config, line: str):
    if config.progress:
        print(line, file=sys.stderr, flush=True)
