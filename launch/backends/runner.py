"""Launching a sweep through a backend: plan it, print it (--dry-run) or run it.

Relaunching is safe: members whose records in the bucket say finished are
skipped, failed ones too unless --retry-failed, and the others resume from
their last checkpoint in the bucket. When a member's command fails the
runner asks the backend whether the slice was preempted; if so it deletes
what is left of the slice, waits (retry_backoff_s, doubling) and requests
it again, at most launch.max_retries times per member; otherwise the run
failed on its own, and it is reported with its reason and not retried.
"""

from __future__ import annotations

import concurrent.futures
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launch import config as config_lib
from launch import remote_records
from launch.backends import Backend, Launch, Member, Step, launch_steps
from scaling.errors import Preempted, UserError
from scaling.store import Store

# Wait states that will never become ready by themselves.
_DEAD = {"FAILED", "SUSPENDING", "SUSPENDED", "PREEMPTED", "TERMINATED", "DELETING"}


class _Unavailable(Exception):
    """The slice could not be had or was lost: retried with backoff."""


def prepare_launch(
    study: str, overrides: dict, retry_failed: bool = False, strict: bool = True
) -> Launch:
    """The sweep's members (validated) and what to skip, from the bucket's records.

    A bucket that cannot be read is an error, unless not `strict` (a dry run,
    which must work without credentials): then every member is planned and
    the launch's `notes` say why.
    """
    configs = config_lib.study_sweep(study, overrides)
    module, arg, _ = config_lib.load_study(study)
    raw = module.get_sweep(arg) if arg is not None else module.get_sweep()
    launch = configs[0].launch.to_dict()
    members, skipped, notes = [], {}, []
    for config, own in zip(configs, raw, strict=True):
        run_id = config_lib.run_id(config)
        try:
            why = (
                None
                if notes
                else _skip_reason(launch["bucket"], config.store, run_id, retry_failed)
            )
        except Exception as e:  # noqa: BLE001 - gcsfs missing, no credentials, no network
            if strict:
                raise UserError(
                    f"cannot read the records in {launch['bucket']} ({e}); "
                    "`pip install gcsfs` and `gcloud auth application-default "
                    "login`, or check the bucket's name"
                ) from None
            notes.append(
                f"could not read {launch['bucket']} ({type(e).__name__}: "
                f"{str(e)[:80]}); every member is listed"
            )
            why = None
        if why:
            skipped[run_id] = why
        else:
            members.append(Member(run_id, dict(own)))
    return Launch(
        study=_repo_relative(study, launch["backend"]),
        overrides=dict(overrides),
        launch=launch,
        sweep_name=configs[0].sweep_name,
        members=members,
        skipped=skipped,
        notes=notes,
    )


def _skip_reason(bucket: str, store_path: str, run_id: str, retry_failed: bool) -> str | None:
    """Why not to train the run: its latest status in the bucket's records, or, without a
    bucket (the runs write to the store directly, as on Slurm), in the store."""
    if bucket:
        found = remote_records.latest_status(remote_records.records_dir(bucket, run_id))
        status, reason = (found["status"], found["reason"]) if found else (None, None)
    elif Path(store_path).exists():
        with Store(store_path, readonly=True) as store:
            record = store.run(run_id)
        status, reason = (record.status, record.reason) if record else (None, None)
    else:
        return None
    if status == "finished":
        return "finished earlier"
    if status == "failed" and not retry_failed:
        return f"failed earlier ({reason}); --retry-failed trains it again"
    return None


def _repo_relative(study: str, backend: str) -> str:
    """The study file as the workers see it: relative to the repository root (here)."""
    file, colon, arg = study.partition(":")
    if backend in ("local", "slurm"):  # run here, or where this folder is shared
        return study
    try:
        relative = Path(file).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        raise UserError(
            f"study file {file!r} is outside this repository, so the workers would "
            "not have it; move it under experiments/ and commit it"
        ) from None
    return str(relative) + colon + arg


def dry_run(backend: Backend, plan: Launch, out=print):
    """Print every command the launch would run, in order, one per line; run nothing."""
    for note in plan.notes:
        out(f"# {note}")
    for run_id, why in plan.skipped.items():
        out(f"# {run_id}: {why}, skipped")
    for step in launch_steps(backend, plan):
        out(shlex.join(step.args))


def _run(args: list[str], capture: bool) -> tuple[int, str]:
    try:
        done = subprocess.run(args, capture_output=capture, text=True, check=False)
    except FileNotFoundError:
        raise UserError(
            f"{args[0]!r} is not installed or not on PATH; install it "
            "(gcloud: https://cloud.google.com/sdk, xpk: pip install xpk)"
        ) from None
    return done.returncode, (done.stdout or "") if capture else ""


def execute(
    backend: Backend,
    plan: Launch,
    run=_run,
    sleep=time.sleep,
    say=lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, str]:
    """Run the launch; returns {run_id: "finished" | "failed: reason" | "skipped: why"}."""
    launch = plan.launch
    outcome = {run_id: f"skipped: {why}" for run_id, why in plan.skipped.items()}
    for step in backend.prepare(plan):
        rc, _ = run(step.args, False)
        if rc != 0:
            raise UserError(
                f"`{shlex.join(step.args)}` failed (exit code {rc}); nothing was launched"
            )
    groups = list(enumerate(backend.groups(plan)))
    if getattr(backend, "CONCURRENT", False) and len(groups) > 1:
        # Jobs a scheduler queues (Slurm): all submitted at once, each waited for in its
        # own thread, at most launch.parallel at a time (0 = all).
        workers = launch["parallel"] or len(groups)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            done = [
                pool.submit(_run_group, backend, plan, i, group, run, sleep, say)
                for i, group in groups
            ]
            for future in done:
                outcome.update(future.result())
        return outcome
    for i, group in groups:
        outcome.update(_run_group(backend, plan, i, group, run, sleep, say))
    return outcome


def _run_group(backend, plan: Launch, i: int, group, run, sleep, say) -> dict[str, str]:
    """Slice i: acquire it, train its members (re-requesting it when it is lost), release it."""
    launch, outcome = plan.launch, {}
    ready = False
    try:
        for member in group:
            attempts = 0
            while member.run_id not in outcome:
                try:
                    if not ready:
                        _acquire(backend, plan, i, run, sleep)
                        ready = True
                    outcome[member.run_id] = _train(backend, plan, i, member, run)
                except _Unavailable as lost:
                    ready = False
                    if attempts >= launch["max_retries"]:
                        outcome[member.run_id] = (
                            f"failed: {lost}, {attempts} re-requests spent (launch.max_retries)"
                        )
                        break
                    attempts += 1
                    wait = launch["retry_backoff_s"] * 2 ** (attempts - 1)
                    say(
                        f"{member.run_id}: {lost}; re-requesting the slice in {wait:.0f} s "
                        f"({attempts}/{launch['max_retries']})"
                    )
                    _release(backend, plan, i, run)
                    sleep(wait)
            say(f"{member.run_id}: {outcome[member.run_id]}")
    finally:
        _release(backend, plan, i, run)
    return outcome


def _acquire(backend, plan, i, run, sleep):
    for step in backend.acquire(plan, i):
        if step.wait_for is None:
            rc, _ = run(step.args, False)
            if rc != 0:
                raise _Unavailable(f"`{' '.join(step.args[:6])} ...` failed (exit code {rc})")
            continue
        while True:
            rc, output = run(step.args, True)
            state = output.strip()
            if rc == 0 and state == step.wait_for:
                break
            if rc != 0 or state in _DEAD:
                raise _Unavailable(
                    f"the slice is {state or 'gone'} before it became {step.wait_for}"
                )
            sleep(plan.launch["poll_s"])


def _train(backend, plan, i, member: Member, run) -> str:
    for step in backend.train(plan, i, member):
        rc, _ = run(step.args, False)
        if rc == 0:
            continue
        if rc == Preempted.exit_code:  # the trainer saved at a notice: train it again
            raise _Unavailable("preempted (the trainer saved at the notice)")
        check: Step | None = backend.state(plan, i)
        if check is not None:
            state_rc, output = run(check.args, True)
            if backend.preempted(output, state_rc):
                raise _Unavailable(f"slice preempted ({output.strip() or 'gone'})")
        return f"failed: {_reason(backend, plan, member, rc)}"
    return "finished"


def _reason(backend, plan: Launch, member: Member, returncode: int) -> str:
    """The run's own failure reason from its records, else the exit code and the last
    error line of the job's log where the backend keeps one (Slurm)."""
    if plan.launch["bucket"]:
        status = remote_records.latest_status(
            remote_records.records_dir(plan.launch["bucket"], member.run_id)
        )
        if status and status["status"] == "failed" and status["reason"]:
            return status["reason"]
    reason = f"the trainer exited with code {returncode}"
    log = getattr(backend, "log_of", lambda plan, member: None)(plan, member)
    if log is not None:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        # The CLI's one-line error, else the last line that is not the scheduler's own.
        said = [line for line in lines if line.startswith("error:")] or [
            line for line in lines if not line.startswith(("srun:", "slurmstepd:"))
        ]
        if said:
            reason += f" ({said[-1].strip()[:300]}; the whole log: {log})"
    return reason


def _release(backend, plan, i, run):
    # A failed delete (already gone) is not an error: the slice is what we wanted gone.
    for step in backend.release(plan, i):
        run(step.args, False)
