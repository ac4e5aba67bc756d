"""The `scaling` command line: parse arguments, call one function per command.

    scaling run CONFIG [--config.key=value ...]       train one run
    scaling sweep CONFIG [--config.key=value ...]     train a study's family
    scaling sweep CONFIG --backend tpu|xpk ... [--dry-run]   ... on a TPU pod or GKE
    scaling sync SWEEP --bucket B [--store PATH]      ingest remote runs' records
    scaling prepare CONFIG                            fetch and tokenise its corpus
    scaling prepare --text G --tokenizer T --out D    tokenise files into shards + manifest
    scaling plan CONFIG [--accelerator TYPE] [--mfu F] what a sweep will cost, before it runs
    scaling status [CONFIG] [--store PATH] [--bucket B] [--json]   runs, states, last loss
    scaling fit --sweep NAME --law LAW [--what ...]   fit a law to a sweep's results
    scaling fit --law LAW --csv PATH --x COLS --y COL fit a law to any CSV
    scaling check CONFIG [--law LAW]                  warn when a sweep cannot answer its question
    scaling backtest SWEEP --law LAW --holdout-largest K   predict the largest runs from the rest
    scaling query --sweep NAME [--law LAW] [--json]   the stored fits
    scaling plot SWEEP --kind KIND [--out DIR]        figures of a sweep (PNG + SVG)
    scaling report SWEEP [--out FILE]                 one self-contained HTML page

`run` and `sweep` also train as one of several processes (hosts): see
`launch/distributed.py`.

User errors print one line (`error: ...`) and exit with code 2. Each command
imports what it needs when it runs, so `scaling status` answers without
loading JAX.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m launch.cli` (a backend's trainer): as `scaling` does,
    from launch.entry import guard_imports  # guard Ctrl-C before the imports below

    guard_imports()

import argparse
import json
import sqlite3
import sys

from launch.backends.local import pin_from_environment
from launch.entry import INTERRUPTED
from launch.host_devices import one_device_per_core
from launch.host_memory import keep_freed_memory
from scaling.errors import Preempted, UserError
from scaling.store import BUSY_TIMEOUT_S, DEFAULT_STORE, check_sweep_name


def main(argv: list[str] | None = None) -> int:
    # Both before JAX starts its threads: the allocator setting (launch/host_memory.py)
    # and the cores a parallel sweep gave this member (launch/backends/local.py).
    keep_freed_memory()
    pin_from_environment()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = {}
    try:
        overrides = _config_overrides(extra)
        if args.command is None:
            parser.print_help()
            return 2
        return args.handler(args, overrides) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except sqlite3.DatabaseError as e:  # a store damaged (or held too long) after it was opened
        path = getattr(args, "store", None) or overrides.get("store") or "the results store"
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            print(
                f"error: {path} stayed locked by another process for over "
                f"{BUSY_TIMEOUT_S:.0f} s (sqlite: {e}); nothing was lost: relaunch once the "
                "other writer is done",
                file=sys.stderr,
            )
            return 2
        print(
            f"error: {path} is damaged (sqlite: {e}); `sqlite3 {path} .recover | sqlite3 "
            "NEW.sqlite` rescues what is readable, `scaling sync` refills a new store from a "
            "bucket, or give another with --store / --config.store",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted; relaunch the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except Preempted as e:
        print(f"{e}; relaunch the same command to resume", file=sys.stderr)
        return e.exit_code


def _parser():
    parser = argparse.ArgumentParser(prog="scaling", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="train one run (get_config of CONFIG)")
    run.add_argument("config", help="study file, e.g. experiments/local_cpu.py[:arg]")
    _distributed_flags(run)
    run.set_defaults(handler=_run)

    sweep = sub.add_parser("sweep", help="train every member of get_sweep() of CONFIG")
    sweep.add_argument("config")
    sweep.add_argument(
        "--retry-failed", action="store_true", help="train runs that failed earlier again"
    )
    _distributed_flags(sweep)
    _launch_flags(sweep)
    sweep.set_defaults(handler=_sweep)

    sync = sub.add_parser("sync", help="ingest the records of a sweep's remote runs")
    sync.add_argument("sweep", help="sweep name (config.sweep_name)")
    sync.add_argument("--bucket", required=True, help="gs://BUCKET[/path] or a local folder")
    sync.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    sync.set_defaults(handler=_sync)

    plan = sub.add_parser("plan", help="parameters, tokens, FLOPs and chip-hours of a sweep")
    plan.add_argument("config")
    plan.add_argument(
        "--accelerator", help="slice type, e.g. v4-32, v5litepod-16, v5p-32, v6e-8, h100-8"
    )
    plan.add_argument(
        "--mfu",
        type=float,
        help="assumed model FLOP utilisation (default: the median measured in the store, else 0.4)",
    )
    plan.add_argument("--store", help="store whose finished runs give the MFU")
    plan.add_argument(
        "--price",
        type=float,
        help="USD per chip-hour (per GPU for GPU types): adds the cost; needs --accelerator",
    )
    plan.add_argument(
        "--storage-price",
        type=float,
        help="USD per GB-month of the bucket: adds what storing the corpus costs",
    )
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=_plan)

    prepare = sub.add_parser(
        "prepare",
        help="tokenise the corpus of CONFIG, or text files into shards plus a manifest (--out)",
    )
    prepare.add_argument("config", nargs="?", help="study file whose corpus to prepare")
    prepare.add_argument("--text", help="comma-separated globs of UTF-8 text files, one per doc")
    prepare.add_argument(
        "--tokenizer",
        help="a tokenizer.json, bpe:VOCAB (train the suite's BPE), or a Hugging Face name",
    )
    prepare.add_argument("--out", help="folder or gs:// path for the shards and manifest.json")
    prepare.add_argument("--val-fraction", type=float, default=0.01, help="held-out share")
    prepare.add_argument("--workers", type=int, default=0, help="processes (default: per core)")
    prepare.add_argument("--shard-mb", type=float, default=256.0, help="MB of text per shard")
    prepare.add_argument("--eod", default="", help="end-of-document token (default: detected)")
    prepare.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=200.0,
        help="MB of training text a bpe:VOCAB tokenizer learns from",
    )
    prepare.add_argument(
        "--hf-dataset",
        help="instead of --text: a Hugging Face dataset, NAME or NAME:CONFIG (needs datasets)",
    )
    prepare.add_argument("--hf-split", default="train", help="its split (default train)")
    prepare.add_argument("--hf-field", default="text", help="its text column (default text)")
    prepare.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="leave out empty and non-UTF-8 files (named in the manifest) instead of stopping",
    )
    prepare.set_defaults(handler=_prepare)

    status = sub.add_parser("status", help="each run's state, step and last eval loss")
    status.add_argument("config", nargs="?", help="study file (its config.store is read)")
    status.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    status.add_argument("--sweep", help="only this sweep's runs")
    status.add_argument("--json", action="store_true", help="print a JSON list")
    status.add_argument("--bucket", help="read remote runs' records in this bucket instead")
    status.set_defaults(handler=_status)

    fit = sub.add_parser("fit", help="fit a law to a sweep's results or to a CSV")
    fit.add_argument("--law", required=True)
    fit.add_argument("--sweep", help="fit this sweep's results from the store")
    fit.add_argument(
        "--what",
        default="final",
        choices=["final", "per-token", "learning-curve", "critical-batch", "isoflop"],
        help="final: L(N) over runs; per-token: L(T) per run; "
        "learning-curve: L(step) per run; critical-batch (law b_crit): "
        "B_crit(L) from the noise scale, then L(N, S_min); isoflop (law "
        "compute_optimal): Chinchilla approach 2 on budgets 6 N_total D",
    )
    fit.add_argument("--csv", help="fit this CSV file instead of the store")
    fit.add_argument("--x", help="CSV column(s) of the inputs, comma-separated")
    fit.add_argument("--y", help="CSV column of the loss")
    fit.add_argument(
        "--exclude-top",
        type=int,
        default=0,
        help="CSV: leave out the K rows with the highest loss (Epoch drops 5)",
    )
    fit.add_argument("--bootstrap", type=int, default=200, help="resamples for intervals (0: none)")
    fit.add_argument(
        "--resample",
        default="auto",
        choices=["auto", "cases", "residuals"],
        help="what a bootstrap resample draws: the points, or the fit's residuals "
        "on the same x (auto: residuals for per-token curves, whose "
        "positions T = 1..n_ctx are a fixed design; points otherwise)",
    )
    fit.add_argument("--objective", default="huber", choices=["huber", "lsq"])
    fit.add_argument(
        "--fix",
        action="append",
        metavar="NAME=VALUE",
        help="pin a parameter (repeatable, or comma-separated), e.g. E=1.69",
    )
    fit.add_argument(
        "--sensitivity",
        metavar="NAME=LOW:HIGH:COUNT",
        help="refit with NAME pinned at COUNT values from LOW to HIGH",
    )
    fit.add_argument(
        "--keep-starts",
        type=int,
        metavar="K",
        help="screen the start grid: every start gets a few evaluations, then "
        "only each curve's K best run to the end (default: all of them)",
    )
    fit.add_argument(
        "--varpro",
        action="store_true",
        help="variable projection: exponents searched, coefficients by NNLS "
        "(saturating, chinchilla)",
    )
    fit.add_argument("--convention", help="FLOP convention the runs' compute is read under")
    fit.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=_fit)

    backtest = sub.add_parser("backtest", help="fit all but the largest runs, predict those")
    backtest.add_argument("sweep")
    backtest.add_argument("--law", required=True)
    backtest.add_argument(
        "--holdout-largest",
        type=int,
        required=True,
        metavar="K",
        help="hold out the K largest finished runs",
    )
    backtest.add_argument(
        "--by", default="n", choices=["n", "compute"], help="largest by N or by training compute"
    )
    backtest.add_argument("--bootstrap", type=int, default=200)
    backtest.add_argument("--confidence", type=float, default=0.9, help="prediction interval level")
    backtest.add_argument("--objective", default="huber", choices=["huber", "lsq"])
    backtest.add_argument("--convention", help="FLOP convention for --by compute")
    backtest.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    backtest.add_argument("--json", action="store_true")
    backtest.set_defaults(handler=_backtest)

    check = sub.add_parser("check", help="design checks of a study's sweep, before launch")
    check.add_argument("config")
    check.add_argument(
        "--law",
        help="the law the sweep is for (default: chinchilla when D "
        "varies across members, else saturating)",
    )
    check.set_defaults(handler=_check)

    query = sub.add_parser("query", help="the fitted laws of a sweep")
    query.add_argument("--sweep", required=True)
    query.add_argument("--law")
    query.add_argument(
        "--convention",
        help="only fits made under this FLOP convention (fits "
        "under different conventions are not compared)",
    )
    query.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    query.add_argument("--json", action="store_true")
    query.set_defaults(handler=_query)

    plot = sub.add_parser("plot", help="figures of a sweep, PNG and SVG (or PDF)")
    plot.add_argument("sweep")
    plot.add_argument(
        "--kind",
        required=True,
        help="per-token, per-token-steps, learning-curves, size, compute, "
        "isoflop, isoflop-total (budgets 6 N_total D), or all",
    )
    plot.add_argument("--run", help="per-token-steps: this run (default the largest)")
    plot.add_argument("--out", help="folder for the files (default results/plots/SWEEP)")
    plot.add_argument(
        "--vector",
        default="svg",
        choices=["svg", "pdf"],
        help="vector format written next to each PNG",
    )
    plot.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    plot.set_defaults(handler=_plot)

    report = sub.add_parser("report", help="one self-contained HTML page of a sweep")
    report.add_argument("sweep")
    report.add_argument("--out", help="HTML file (default results/reports/SWEEP.html)")
    report.add_argument("--store", help=f"results store (default {DEFAULT_STORE})")
    report.set_defaults(handler=_report)
    return parser


def _distributed_flags(parser):
    group = parser.add_argument_group(
        "multi-process runs",
        "one process per host; see launch/distributed.py (the "
        "SCALING_COORDINATOR, SCALING_NUM_PROCESSES, SCALING_PROCESS_ID variables do the same)",
    )
    group.add_argument("--coordinator", help="host:port of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's id, 0..N-1")


# `scaling sweep` flags that fill config.launch keys (and win over them).
_LAUNCH_FLAGS = {
    "backend": str,
    "project": str,
    "zone": str,
    "accelerator": str,
    "runtime_version": str,
    "tpu_name": str,
    "bucket": str,
    "cluster": str,
    "runs_per_slice": int,
    "max_retries": int,
    "retry_backoff_s": float,
    "parallel": int,
    "price": float,
    "partition": str,
    "account": str,
    "qos": str,
    "nodes": int,
    "gpus_per_node": int,
    "time_limit": str,
    "sbatch": str,
}
_LAUNCH_SWITCHES = ("spot", "best_effort", "keep_slice")


def _launch_flags(parser):
    group = parser.add_argument_group(
        "launchers",
        "where the runs go; each flag sets config.launch.<key> (see README, "
        '"Running on a TPU pod")',
    )
    for key, kind in _LAUNCH_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), type=kind, dest=f"launch_{key}")
    for key in _LAUNCH_SWITCHES:
        group.add_argument("--" + key.replace("_", "-"), action="store_true", dest=f"launch_{key}")
    group.add_argument(
        "--direct",
        action="store_true",
        help="tpu: create the slice directly, not through a queued resource",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="print every command the launch would run, in order; run nothing",
    )


def _launch_overrides(args) -> dict[str, str]:
    chosen = {
        f"launch.{key}": str(getattr(args, f"launch_{key}"))
        for key in _LAUNCH_FLAGS
        if getattr(args, f"launch_{key}") is not None
    }
    chosen.update(
        {f"launch.{key}": "true" for key in _LAUNCH_SWITCHES if getattr(args, f"launch_{key}")}
    )
    if args.direct:
        chosen["launch.queued"] = "false"
    return chosen


def _split_cpu_devices(args, config):
    # Before anything starts a JAX backend; a process that joins others keeps one device.
    if config.mesh.cpu_per_core and not _joins_processes(args):
        one_device_per_core()


def _join_processes(args):
    # Before anything starts a JAX backend.
    from launch import distributed

    distributed.maybe_initialize(args.coordinator, args.num_processes, args.process_id)


def _joins_processes(args) -> bool:
    """Whether this process was asked to take part in a multi-process run."""
    import os

    from launch import distributed

    env = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)
    return (
        any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
        or any(os.environ.get(name) for name in env)
        or os.environ.get(distributed.ENV_MODE, "").strip().lower() == "auto"
    )


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def _config_overrides(extra: list[str]) -> dict[str, str]:
    """`--config.a.b=v` or `--config.a.b v` pairs; anything else is an error."""
    overrides, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            raise UserError(
                f"unrecognised argument {arg!r}; overrides look like --config.train.steps=100"
            )
        key, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise UserError(f"{arg} needs a value: {arg}=VALUE")
            value, i = extra[i + 1], i + 1
        overrides[key] = value
        i += 1
    return overrides


def _store_path(args, overrides) -> str:
    if args.store:
        return args.store
    if "store" in overrides:
        return overrides["store"]
    if getattr(args, "config", None):
        from launch import config as config_lib

        return config_lib.study_config(args.config, overrides).store
    return DEFAULT_STORE


def _open_store(path: str, must_exist: bool = True, readonly: bool = False):
    from pathlib import Path

    from scaling.store import Store

    if must_exist and not Path(path).exists():
        raise UserError(f"no results store at {path!r}; run a sweep first or pass --store PATH")
    return Store(path, readonly=readonly)


def _run(args, overrides):
    from launch import config as config_lib

    config = config_lib.study_config(args.config, overrides)
    _split_cpu_devices(args, config)
    _join_processes(args)
    from launch import train

    run_id = train.train_and_evaluate(config)
    if _is_process_zero():
        print(f"finished run {run_id}; results in {config.store}")


def _sweep(args, overrides):
    overrides = {**overrides, **_launch_overrides(args)}
    from launch import config as config_lib

    base = config_lib.study_config(args.config, overrides)
    launch = base.launch
    if args.dry_run or launch.backend != "local":
        return _launch(args, overrides, launch.backend)
    from launch.backends import local

    parallel = launch.parallel
    if not parallel:
        from launch import train

        members = config_lib.study_sweep(args.config, overrides)
        parallel = (
            1
            if _joins_processes(args)
            else local.auto_parallel(
                len(members), sum(train.run_record(c, "").flops for c in members)
            )
        )
    if parallel > 1:
        outcome = local.train_parallel(
            args.config, overrides, parallel, retry_failed=args.retry_failed
        )
        statuses = local.member_statuses(args.config, overrides)
        counts = {s: list(statuses.values()).count(s) for s in sorted(set(statuses.values()))}
        failed = sorted(r for r, o in outcome.items() if o != "finished")
        preempted = bool(failed) and all(outcome[r] == "preempted" for r in failed)
        print(
            "sweep done: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + (
                f" (this launch: {', '.join(f'{r} {outcome[r]}' for r in failed)})"
                if failed
                else ""
            )
        )
        return Preempted.exit_code if preempted else 1 if failed else 0
    _split_cpu_devices(args, base)  # the members train one after another, in this process
    _join_processes(args)
    from launch import plan, sweep

    if _is_process_zero():
        print(
            plan.totals_line(plan.make_plan(args.config, overrides, mfu=plan.DEFAULT_MFU)),
            file=sys.stderr,
        )
    outcome = sweep.run_sweep(args.config, overrides, retry_failed=args.retry_failed)
    counts = {s: list(outcome.values()).count(s) for s in sorted(set(outcome.values()))}
    if _is_process_zero():
        print("sweep done: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0 if set(outcome.values()) <= {"finished", "followed"} else 1


def _launch(args, overrides, backend_name: str):
    from launch import config as config_lib
    from launch.backends import get_backend, runner

    backend = get_backend(backend_name)
    work = runner.prepare_launch(
        args.config, overrides, retry_failed=args.retry_failed, strict=not args.dry_run
    )
    # What the sweep will cost, before anything remote starts (stderr: a dry
    # run's stdout is the commands alone, one per line).
    from launch import plan

    accelerator = work.launch.get("accelerator") or None
    price = work.launch.get("price") or None
    cost = plan.make_plan(args.config, overrides, accelerator, price=price if accelerator else None)
    print(plan.totals_line(cost), file=sys.stderr)
    if args.dry_run:
        runner.dry_run(backend, work)
        return 0
    outcome = runner.execute(backend, work)
    failed = {r: o for r, o in outcome.items() if o.startswith("failed")}
    where = (
        f"`scaling sync {work.sweep_name} --bucket {work.launch['bucket']}` fetches the results"
        if work.launch["bucket"]
        else f"results in {config_lib.study_config(args.config, overrides).store}"
    )
    print(
        f"sweep {work.sweep_name} done on {backend_name}: {len(outcome) - len(failed)} "
        f"finished or skipped, {len(failed)} failed; {where}"
    )
    return 1 if failed else 0


def _sync(args, overrides):
    from launch import sync

    with _open_store(_store_path(args, overrides), must_exist=False) as store:
        counts = sync.sync(store, args.bucket, args.sweep)
    for run_id, reason in counts["skipped"].items():
        print(f"skipped {run_id[:40]!r}: {reason}", file=sys.stderr)
    print(
        f"synced {counts['runs']} runs ({counts['evals']} evals) of {args.sweep} into {store.path}"
    )
    return 1 if counts["skipped"] else 0


def _plan(args, overrides):
    from launch import plan

    result = plan.make_plan(
        args.config,
        overrides,
        args.accelerator,
        args.mfu,
        args.store,
        price=args.price,
        storage_price=args.storage_price,
    )
    print(json.dumps(result) if args.json else plan.plan_table(result))


def _prepare(args, overrides):
    from launch import config as config_lib
    from launch import data

    shard_args = (args.text or args.hf_dataset, args.tokenizer, args.out)
    if any(shard_args) or not args.config:
        if args.config or not all(shard_args):
            raise UserError(
                "scaling prepare needs either a study file (its corpus, cached) or all of --text "
                "(or --hf-dataset), --tokenizer and --out (shards plus a manifest), not both"
            )
        from launch import make_shards

        if args.workers < 0:
            raise UserError(f"--workers {args.workers} must be 0 (one per core) or more")
        make_shards.prepare(
            args.text or "",
            args.tokenizer,
            args.out,
            val_fraction=args.val_fraction,
            workers=args.workers,
            shard_mb=args.shard_mb,
            eod=args.eod,
            tokenizer_sample_mb=args.tokenizer_sample_mb,
            skip_bad_files=args.skip_bad_files,
            hf_dataset=args.hf_dataset or "",
            hf_split=args.hf_split,
            hf_field=args.hf_field,
        )
        print(f"prepared {args.out}: train with --config.data.manifest={args.out}")
        return
    config = config_lib.study_config(args.config, overrides)
    corpus = data.prepare_corpus(config.data, config.model.vocab_size, progress=True)
    print(data.describe(corpus))


def _status(args, overrides):
    from scaling.figures import status

    if args.bucket:
        from launch import sync

        rows = sync.status_rows(args.bucket, args.sweep)
        print(json.dumps(rows, indent=1) if args.json else status.status_table(rows))
        return
    with _open_store(_store_path(args, overrides), readonly=True) as store:
        rows = status.status_rows(store, args.sweep)
    print(json.dumps(rows, indent=1) if args.json else status.status_table(rows))


def _fit(args, overrides):
    from scaling.checks.sensitivity import parse_fix

    fixed = parse_fix(args.fix)
    if args.csv:
        if args.sweep or not (args.x and args.y):
            raise UserError("fit --csv needs --x COL[,COL] and --y COL, and no --sweep")
        from scaling.studies.csvfit import fit_csv

        if args.sensitivity:
            return _sensitivity(args, fixed, None)
        result = fit_csv(
            args.csv,
            args.law,
            args.x.split(","),
            args.y,
            bootstrap=args.bootstrap,
            objective=args.objective,
            exclude_top=args.exclude_top,
            fixed=fixed or None,
            varpro=args.varpro,
            keep_starts=args.keep_starts,
        )
        print(json.dumps(result, indent=None if args.json else 1))
        return
    if not args.sweep:
        raise UserError("fit needs --sweep NAME (a sweep in the store) or --csv PATH")
    from scaling.studies.fit_study import fit_study, kind_of

    kind = kind_of(args.law, args.what)  # a mismatch fails before the store is opened
    with _open_store(_store_path(args, overrides)) as store:
        if args.sensitivity and kind == "curves":
            return _sensitivity(args, fixed, store)
        records = fit_study(
            store,
            args.sweep,
            args.law,
            args.what,
            bootstrap=args.bootstrap,
            objective=args.objective,
            fixed=fixed or None,
            convention=args.convention,
            varpro=args.varpro,
            keep_starts=args.keep_starts,
            resample=None if args.resample == "auto" else args.resample,
        )
    _print_fits(records, args.json)


def _sensitivity(args, fixed, store):
    """`fit --sensitivity`: refits printed (not stored, so they never replace the sweep's fit)."""
    import numpy as np

    from scaling.checks import sensitivity
    from scaling.studies import analysis
    from scaling.studies.csvfit import csv_arrays

    name, values = sensitivity.parse_range(args.sensitivity)
    if store is None:
        x, y = csv_arrays(args.csv, args.law, args.x.split(","), args.y, args.exclude_top)
        labels, x, y, mask = ["csv"], x[None], y[None], np.ones((1, len(y)), bool)
    else:
        labels, x, y, mask = analysis.sweep_arrays(store, args.sweep, args.law, args.what)
    out = sensitivity.sensitivity(
        args.law,
        x,
        y,
        mask,
        name,
        values,
        fixed=fixed,
        objective=args.objective,
        varpro=args.varpro,
    )
    out["curves"] = labels
    print(json.dumps(out) if args.json else sensitivity.sensitivity_table(out, labels))


def _backtest(args, overrides):
    from scaling.checks import backtest

    with _open_store(_store_path(args, overrides)) as store:
        outcome = backtest.backtest_sweep(
            store,
            args.sweep,
            args.law,
            args.holdout_largest,
            by=args.by,
            bootstrap=args.bootstrap,
            confidence=args.confidence,
            objective=args.objective,
            convention=args.convention,
        )
    print(json.dumps(outcome) if args.json else backtest.backtest_table(outcome))


def _check(args, overrides):
    from launch import config as config_lib
    from launch import sweep

    warnings = sweep.design_warnings(config_lib.study_sweep(args.config, overrides), args.law)
    for warning in warnings:
        print(f"warning: {warning}")
    if not warnings:
        print("design checks passed")


def _query(args, overrides):
    from scaling.studies import analysis

    with _open_store(_store_path(args, overrides), readonly=True) as store:
        records = analysis.latest_fits(store, args.sweep, args.law)
    records = analysis.same_convention(records, args.convention)
    _print_fits(records, args.json, provenance=True)


def _print_fits(records, as_json: bool, provenance: bool = False):
    from scaling.studies import analysis

    if as_json:
        print(json.dumps([analysis.fit_as_dict(r) for r in records]))
    else:
        print(analysis.fits_table(records, provenance))


def _plot(args, overrides):
    check_sweep_name(args.sweep)  # it becomes a file name
    from scaling.figures import plots

    # Read-only: a figure fits what is not stored for itself and never writes.
    with _open_store(_store_path(args, overrides), readonly=True) as store:
        drawn = plots.plot_sweep(
            store, args.sweep, args.kind, args.out, run=args.run, vector=args.vector
        )
    for plot in drawn:
        for note in plot.notes:
            print(note)
        if plot.skipped:
            print(f"skipped {plot.kind}: {plot.skipped}")
        else:
            print(f"wrote {', '.join(str(p) for p in plot.paths)}")


def _report(args, overrides):
    check_sweep_name(args.sweep)  # it becomes a file name
    from scaling.figures import html_report

    with _open_store(_store_path(args, overrides), readonly=True) as store:
        path, drawn = html_report.write_report(store, args.sweep, args.out)
    for plot in drawn:
        for note in plot.notes:
            print(note)
    print(f"wrote {path}")


if __name__ == "__main__":
    from launch.entry import run_guarded

    run_guarded(main)
