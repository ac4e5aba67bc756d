"""The results store: one SQLite file, the contract between training and analysis.

Training (`launch/`) writes runs, scalar metrics and per-token loss vectors
here; analysis (`scaling/`) reads them back as numpy arrays and writes fits.
The records that cross it are the frozen dataclasses below.

- WAL mode, so readers (`scaling status`) never block the writer.
- A `schema_version` table; a store from a newer version is refused, untouched,
  and one from an older version is upgraded in place (`_MIGRATIONS`).
- Every write is idempotent (INSERT OR REPLACE on natural keys), so a run
  resumed from a checkpoint rewrites the steps it repeats instead of
  duplicating them.
- Parameterized SQL only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import time
from pathlib import Path

import numpy as np

from scaling import faults
from scaling.errors import UserError

SCHEMA_VERSION = 4
# "preempted": stopped at a preemption notice after saving a checkpoint; resumable (schema 4).
STATUSES = ("pending", "running", "finished", "failed", "preempted")

_RUNS_COLUMNS = """
    run_id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    n_params INTEGER NOT NULL,          -- Kaplan non-embedding parameters N
    n_params_total INTEGER NOT NULL,    -- every parameter of the tree
    n_layer INTEGER NOT NULL,
    d_model INTEGER NOT NULL,
    n_heads INTEGER NOT NULL,
    n_ctx INTEGER NOT NULL,
    tokens INTEGER NOT NULL,            -- token budget D
    flops REAL NOT NULL,                -- training FLOP budget C under flop_convention
    status TEXT NOT NULL CHECK (status IN ({statuses})),
    step INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    flops_json TEXT NOT NULL DEFAULT '{}',  -- {convention: training FLOPs} (schema 2)
    flop_convention TEXT NOT NULL DEFAULT '6N+attention'  -- the one `flops` holds
""".replace("{statuses}", ", ".join(f"'{status}'" for status in STATUSES))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs ({runs_columns});
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL REFERENCES sweeps(name),
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    PRIMARY KEY (sweep, run_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS per_token (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    step INTEGER NOT NULL,
    losses BLOB NOT NULL,               -- float32 little-endian, n_ctx entries
    stderr BLOB,                        -- standard error of each entry, likewise (schema 3)
    n_sequences INTEGER,                -- held-out sequences each entry averages (schema 3)
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS fits (
    fit_id INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep TEXT NOT NULL,
    law TEXT NOT NULL,
    what TEXT NOT NULL,                 -- final | per-token | learning-curve | csv
    curve TEXT NOT NULL,                -- which curve: a run id, 'all', ...
    params_json TEXT NOT NULL,
    intervals_json TEXT NOT NULL,
    objective REAL NOT NULL,
    converged INTEGER NOT NULL,
    n_points INTEGER NOT NULL,
    selection_json TEXT NOT NULL,       -- the data the fit used
    settings_json TEXT NOT NULL,        -- objective, bootstrap, optimizer settings
    created REAL NOT NULL,
    provenance_json TEXT NOT NULL DEFAULT '{}'  -- runs, points, optimizer, version (schema 2)
);
-- Which process trains a run now (launch/claims.py). Added without a version bump: a
-- store gains it on its next writable open, and a reader never needs it.
-- What each start of a run ran on (launch/train.py): package versions and devices. Added
-- without a version bump, as claims below.
CREATE TABLE IF NOT EXISTS environments (
    run_id TEXT NOT NULL,
    started REAL NOT NULL,
    environment_json TEXT NOT NULL,     -- {"packages": {name: version}, "device_kind", ...}
    PRIMARY KEY (run_id, started)
);
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,                -- host:pid:token of the trainer
    since REAL NOT NULL,
    heartbeat REAL NOT NULL             -- time.time() of its last sign of life
);
""".replace("{runs_columns}", _RUNS_COLUMNS)

# Upgrades of an older store, in place: version -> statements that take it to version + 1.
# Version 1 stores held `flops` under 6N+attention (the only count then), so that is
# the convention their runs are given.
_MIGRATIONS = {
    1: (
        "ALTER TABLE runs ADD COLUMN flops_json TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE runs ADD COLUMN flop_convention TEXT NOT NULL DEFAULT '6N+attention'",
        "UPDATE runs SET flops_json = json_object('6N+attention', flops)",
        "ALTER TABLE fits ADD COLUMN provenance_json TEXT NOT NULL DEFAULT '{}'",
    ),
    # Version 2 stores kept the per-token means only; their standard errors stay unknown.
    2: (
        "ALTER TABLE per_token ADD COLUMN stderr BLOB",
        "ALTER TABLE per_token ADD COLUMN n_sequences INTEGER",
    ),
    # Version 3 stores allow four statuses: SQLite cannot change a CHECK in place, so the
    # runs table is copied into one that allows "preempted" too (columns in the same order).
    3: (
        f"CREATE TABLE runs_v4 ({_RUNS_COLUMNS})",
        "INSERT INTO runs_v4 SELECT * FROM runs",
        "DROP TABLE runs",
        "ALTER TABLE runs_v4 RENAME TO runs",
    ),
}


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    config: dict
    n_params: int
    n_params_total: int
    n_layer: int
    d_model: int
    n_heads: int
    n_ctx: int
    tokens: int
    flops: float
    status: str = "pending"
    step: int = 0
    reason: str | None = None
    # Training FLOPs under each convention (models.sizes.FLOP_CONVENTIONS) and
    # the convention `flops` is counted in.
    flops_by_convention: dict = dataclasses.field(default_factory=dict)
    flop_convention: str = "6N+attention"


@dataclasses.dataclass(frozen=True)
class FitRecord:
    sweep: str
    law: str
    what: str
    curve: str
    params: dict
    intervals: dict
    objective: float
    converged: bool
    n_points: int
    selection: dict
    settings: dict
    # Where the fit came from: run ids and points used, objective and its value,
    # optimizer settings, starts converged, FLOP convention, project version.
    provenance: dict = dataclasses.field(default_factory=dict)
    fit_id: int | None = None
    created: float | None = None


# A sweep's name becomes a file name (its figures' folder, its report), so it
# is one plain path component: no separators, no dot-names, nothing to quote.
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_sweep_name(name) -> str:
    """`name` if it is a valid sweep name, else UserError saying what one is."""
    if not isinstance(name, str) or not SWEEP_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise UserError(
            f"sweep name {shown} is not allowed; use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (it names files)"
        )
    return name


BUSY_TIMEOUT_S = 60.0


def _is_locked(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _enter_wal(conn: sqlite3.Connection) -> None:
    """PRAGMA journal_mode=WAL, retried while another connection holds the file.

    Turning a new file to WAL takes an exclusive lock and SQLite fails it at once, without
    the busy timeout, when another process holds any lock: the runs of a sweep that open a
    new store together (Slurm jobs, a parallel local sweep) would fail with "database is
    locked". So wait here, as the busy timeout does for every other statement.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if not _is_locked(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


# Where results go unless a config or --store says otherwise.
DEFAULT_STORE = "results/scaling.sqlite"


def sweep_runs(store: Store, sweep: str) -> list:
    """The sweep's runs; UserError naming the sweeps there are when it has none."""
    runs = store.runs(sweep)
    if not runs:
        known = ", ".join(store.sweeps()) or "none"
        raise UserError(f"no runs in sweep {sweep!r}; sweeps in this store: {known}")
    return runs


def check_writable(path: str | os.PathLike) -> None:
    """UserError unless a store could be created or written at `path`; creates nothing.

    Runs check this before preparing their data, so a bad --config.store
    fails at once rather than after a corpus download.
    """
    path = Path(path)
    if path.exists():
        if path.is_dir() or not os.access(path, os.W_OK):
            raise UserError(
                f"store file {str(path)!r} is not writable; "
                "give a writable path with --config.store=PATH"
            )
        return
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        what = "is not a folder" if not folder.is_dir() else "is not writable"
        raise UserError(
            f"store path {str(path)!r} is not writable ({str(folder)!r} {what}); "
            "give a writable path with --config.store=PATH"
        )


class Store:
    """A handle on one store file; creates it (and its folder) on first use.

    readonly=True opens an existing store for reading only (`scaling status`,
    `scaling query`), so a store on a read-only disk, or one made immutable to
    keep it safe, can still be read; nothing is created, migrated or written.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self._open_readonly()
            return
        check_writable(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. the folder changed since the check
            raise UserError(
                f"store path {str(self.path)!r} is not writable ({e.strerror}); "
                "give a writable path with --config.store=PATH"
            ) from None
        try:
            # The busy timeout makes concurrent writers wait for the lock
            # (bounded) instead of failing with "database is locked".
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            _enter_wal(self._conn)
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._check_or_create_schema()
            self._identity = _file_identity(self.path)
        except sqlite3.OperationalError as e:  # before DatabaseError: it is a subclass
            raise UserError(
                f"cannot open store {str(self.path)!r} ({e}); "
                + (
                    f"another process held it for over {BUSY_TIMEOUT_S:.0f} s: relaunch once "
                    "it is done"
                    if _is_locked(e)
                    else "give a writable path with --config.store=PATH"
                )
            ) from None
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"{str(self.path)!r} is not a results store ({e}); it was left untouched: "
                "give another path with --config.store=PATH"
            ) from None

    def _open_readonly(self):
        if not self.path.is_file():
            raise UserError(
                f"no results store at {str(self.path)!r}; run a sweep first or pass --store PATH"
            )
        uri = self.path.resolve().as_uri()
        try:
            try:
                self._conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)
                tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
            except sqlite3.OperationalError:
                # A WAL store in a folder we cannot write (no -shm to create): read the
                # file as it stands, which is what a read-only copy holds.
                self._conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
                tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
            version = (
                self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
                if "schema_version" in tables
                else None
            )
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"{str(self.path)!r} is not a readable results store ({e}); "
                "restore it from a copy or give another with --store"
            ) from None
        if not tables - {"sqlite_sequence"}:
            self._conn.close()
            raise UserError(
                f"store {str(self.path)!r} has no tables yet (a launch that is creating it "
                "writes them in a moment); try again once a run has started"
            )
        if version != SCHEMA_VERSION:
            self._conn.close()
            raise UserError(
                f"store {str(self.path)!r} has schema version {version}, this suite "
                f"reads {SCHEMA_VERSION}; open it once where it is writable (any "
                "`scaling fit`) to upgrade it, or upgrade the suite"
            )

    def _check_or_create_schema(self):
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
        if "schema_version" in tables:
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"store {str(self.path)!r} has schema version {version}, newer than this "
                    f"version of the suite understands ({SCHEMA_VERSION}); upgrade the suite"
                )
        elif tables - {"sqlite_sequence"}:
            raise UserError(
                f"{str(self.path)!r} is an SQLite file but not a results store (tables: "
                f"{sorted(tables)}); it was left untouched: give another path"
            )
        # Rebuilding a table (migration 3) drops the one that other tables' foreign keys
        # name: SQLite's procedure for that turns the checks off around the transaction
        # (the pragma is a no-op inside one) and checks the keys before it commits.
        self._conn.execute("PRAGMA foreign_keys=OFF")
        try:
            with self._transaction():
                if "schema_version" in tables and version >= 1:
                    self._migrate(version)
                    if self._conn.execute("PRAGMA foreign_key_check").fetchone():
                        raise sqlite3.IntegrityError("FOREIGN KEY constraint failed")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                if not self._conn.execute("SELECT 1 FROM schema_version").fetchone():
                    self._conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        finally:
            self._conn.execute("PRAGMA foreign_keys=ON")

    def _migrate(self, version: int):
        """Upgrade an older store in place (inside the caller's transaction)."""
        while version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                self._conn.execute(statement)
            version += 1
            self._conn.execute("UPDATE schema_version SET version = ?", (version,))

    def _transaction(self):
        # SQLite keeps writing to a file removed (or replaced) under it, and the
        # writes vanish with it: check it is still the file we opened, every write.
        if (
            getattr(self, "_identity", None) is not None
            and _file_identity(self.path) != self._identity
        ):
            raise UserError(
                f"the store file {str(self.path)!r} was removed or replaced while "
                "this process was using it, so what it writes now would be lost; "
                "nothing more was written. Restore the store (or give a new "
                "--config.store) and relaunch: finished runs resume from their "
                "checkpoints"
            )
        return _Transaction(self._conn)

    def close(self):
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writes -----------------------------------------------------------

    def add_sweep(self, name: str, config: dict, run_ids: list[str]):
        """Record a sweep as exactly these runs.

        A study whose members changed since its last launch drops the old
        members from the sweep (their rows stay in the store), so fits of
        the sweep never mix two versions of the study.
        """
        check_sweep_name(name)
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO sweeps (name, config_json, created) VALUES (?, ?, ?)",
                (name, json.dumps(config, sort_keys=True), time.time()),
            )
            self._conn.execute("DELETE FROM sweep_runs WHERE sweep = ?", (name,))
            for run_id in run_ids:
                self._conn.execute(
                    "INSERT OR IGNORE INTO sweep_runs (sweep, run_id) VALUES (?, ?)",
                    (name, run_id),
                )

    def register_run(self, run: RunRecord, sweep: str | None = None):
        """Insert the run if it is new; an existing run keeps its status and step."""
        now = time.time()
        with self._transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO runs (run_id, config_json, n_params, n_params_total, "
                "n_layer, d_model, n_heads, n_ctx, tokens, flops, status, step, reason, "
                "created, updated, flops_json, flop_convention) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    json.dumps(run.config, sort_keys=True),
                    run.n_params,
                    run.n_params_total,
                    run.n_layer,
                    run.d_model,
                    run.n_heads,
                    run.n_ctx,
                    run.tokens,
                    run.flops,
                    run.status,
                    run.step,
                    run.reason,
                    now,
                    now,
                    json.dumps(run.flops_by_convention, sort_keys=True),
                    run.flop_convention,
                ),
            )
            if sweep is not None:
                self._conn.execute(
                    "INSERT OR IGNORE INTO sweeps (name, config_json, created) VALUES (?, ?, ?)",
                    (sweep, "{}", now),
                )
                self._conn.execute(
                    "INSERT OR IGNORE INTO sweep_runs (sweep, run_id) VALUES (?, ?)",
                    (sweep, run.run_id),
                )

    def set_status(
        self, run_id: str, status: str, step: int | None = None, reason: str | None = None
    ):
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        if reason is not None:
            # An error's text can carry a file name's undecodable bytes as lone surrogates,
            # which SQLite's UTF-8 refuses: keep them as escapes rather than lose the status.
            reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
        with self._transaction():
            self._conn.execute(
                "UPDATE runs SET status = ?, step = COALESCE(?, step), reason = ?, updated = ? "
                "WHERE run_id = ?",
                (status, step, reason, time.time(), run_id),
            )

    def add_environment(self, run_id: str, environment: dict, started: float | None = None):
        """Record what one start of the run ran on (a resumed run adds a row per start)."""
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO environments (run_id, started, environment_json) "
                "VALUES (?, ?, ?)",
                (run_id, time.time() if started is None else started, json.dumps(environment)),
            )

    def environments(self, run_id: str) -> list[dict]:
        """What each start of the run ran on, oldest first (none for a store or run from
        before they were recorded)."""
        try:
            rows = self._conn.execute(
                "SELECT environment_json FROM environments WHERE run_id = ? ORDER BY started",
                (run_id,),
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only store from before the table existed
            return []
        return [json.loads(r[0]) for r in rows]

    def batch(self):
        """Every write inside the block in one transaction: all of them or none."""
        return self._transaction()

    # -- claims: one trainer per run, across hosts (launch/claims.py) ------------

    def claim(self, run_id: str, owner: str, stale_s: float) -> tuple[str, float] | None:
        """Claim `run_id` for `owner`, unless another owner's heartbeat is younger than
        `stale_s`: then (that owner, seconds since its heartbeat) and nothing changes. A
        stale claim (its trainer killed, or its host gone) is taken over."""
        with self._transaction():
            row = self._conn.execute(
                "SELECT owner, heartbeat FROM claims WHERE run_id = ?", (run_id,)
            ).fetchone()
            now = time.time()
            if row and row[0] != owner and now - row[1] < stale_s:
                return row[0], now - row[1]
            self._conn.execute(
                "INSERT OR REPLACE INTO claims (run_id, owner, since, heartbeat) "
                "VALUES (?, ?, ?, ?)",
                (run_id, owner, now, now),
            )
        return None

    def heartbeat(self, run_id: str, owner: str) -> bool:
        """Renew `owner`'s claim; False when the claim is no longer its own (taken over)."""
        with self._transaction():
            cursor = self._conn.execute(
                "UPDATE claims SET heartbeat = ? WHERE run_id = ? AND owner = ?",
                (time.time(), run_id, owner),
            )
        return cursor.rowcount == 1

    def release(self, run_id: str, owner: str):
        """Drop `owner`'s claim (another owner's, which took it over, stays)."""
        with self._transaction():
            self._conn.execute("DELETE FROM claims WHERE run_id = ? AND owner = ?", (run_id, owner))

    def log_eval(
        self,
        run_id: str,
        step: int,
        scalars: dict[str, float],
        per_token: np.ndarray | None = None,
        per_token_stderr: np.ndarray | None = None,
        n_sequences: int | None = None,
    ):
        """Scalars (and optionally the per-token loss vector, with the standard error of
        each entry over `n_sequences` held-out sequences) of one step, in one transaction."""
        with self._transaction():
            self._conn.executemany(
                "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
                [(run_id, int(step), name, float(v)) for name, v in scalars.items()],
            )
            if per_token is not None:
                blob = np.asarray(per_token, dtype="<f4").tobytes()
                stderr = (
                    None
                    if per_token_stderr is None
                    else np.asarray(per_token_stderr, dtype="<f4").tobytes()
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO per_token (run_id, step, losses, stderr, n_sequences) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        run_id,
                        int(step),
                        blob,
                        stderr,
                        None if n_sequences is None else int(n_sequences),
                    ),
                )
            self._conn.execute(
                "UPDATE runs SET step = MAX(step, ?), updated = ? WHERE run_id = ?",
                (int(step), time.time(), run_id),
            )
            faults.point("store_write")  # tests: a kill here must lose the whole row

    def save_fit(self, fit: FitRecord) -> int:
        with self._transaction():
            cursor = self._conn.execute(
                "INSERT INTO fits (sweep, law, what, curve, params_json, intervals_json, "
                "objective, converged, n_points, selection_json, settings_json, created, "
                "provenance_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    fit.sweep,
                    fit.law,
                    fit.what,
                    fit.curve,
                    json.dumps(fit.params),
                    json.dumps(fit.intervals),
                    float(fit.objective),
                    int(bool(fit.converged)),
                    int(fit.n_points),
                    json.dumps(fit.selection),
                    json.dumps(fit.settings),
                    time.time(),
                    json.dumps(fit.provenance),
                ),
            )
            return cursor.lastrowid

    # -- reads ------------------------------------------------------------

    def sweeps(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM sweeps ORDER BY name")]

    def runs(self, sweep: str | None = None) -> list[RunRecord]:
        """Runs (of one sweep, or all), smallest N first."""
        if sweep is None:
            rows = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs r ORDER BY n_params, run_id"
            )
        else:
            rows = self._conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs r JOIN sweep_runs s ON s.run_id = r.run_id "
                "WHERE s.sweep = ? ORDER BY r.n_params, r.run_id",
                (sweep,),
            )
        return [_run_from_row(row) for row in rows]

    def run(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs r WHERE r.run_id = ?", (run_id,)
        ).fetchone()
        return _run_from_row(row) if row else None

    def scalars(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one metric, by step."""
        rows = self._conn.execute(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
            (run_id, name),
        ).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        return steps, np.array([r[1] for r in rows], dtype=np.float64)

    def metric_names(self, run_id: str) -> list[str]:
        return [
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,)
            )
        ]

    def per_token(self, run_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps [S], losses [S, n_ctx]): the per-token eval loss at each eval step."""
        rows = self._conn.execute(
            "SELECT step, losses FROM per_token WHERE run_id = ? ORDER BY step", (run_id,)
        ).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        if not rows:
            return steps, np.zeros((0, 0), dtype=np.float32)
        return steps, np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])

    def per_token_stderr(self, run_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps [S], standard errors [S, n_ctx], sequences [S]) beside `per_token`'s means;
        NaN (and 0 sequences) where a row was written without them (schema 2 and older)."""
        rows = self._conn.execute(
            "SELECT step, losses, stderr, n_sequences FROM per_token WHERE run_id = ? "
            "ORDER BY step",
            (run_id,),
        ).fetchall()
        steps = np.array([r[0] for r in rows], dtype=np.int64)
        if not rows:
            return steps, np.zeros((0, 0), dtype=np.float32), np.zeros(0, np.int64)
        errors = np.stack(
            [
                np.frombuffer(r[2], dtype="<f4")
                if r[2] is not None
                else np.full(len(r[1]) // 4, np.nan, np.float32)
                for r in rows
            ]
        )
        return steps, errors, np.array([r[3] or 0 for r in rows], dtype=np.int64)

    def last_eval(self, run_id: str) -> tuple[int, float] | None:
        row = self._conn.execute(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = 'eval_loss' "
            "ORDER BY step DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def fits(self, sweep: str | None = None, law: str | None = None) -> list[FitRecord]:
        """Stored fits, newest first."""
        rows = self._conn.execute(
            "SELECT fit_id, sweep, law, what, curve, params_json, intervals_json, objective, "
            "converged, n_points, selection_json, settings_json, created, provenance_json "
            "FROM fits "
            "WHERE (? IS NULL OR sweep = ?) AND (? IS NULL OR law = ?) ORDER BY fit_id DESC",
            (sweep, sweep, law, law),
        ).fetchall()
        return [
            FitRecord(
                fit_id=r[0],
                sweep=r[1],
                law=r[2],
                what=r[3],
                curve=r[4],
                params=json.loads(r[5]),
                intervals=json.loads(r[6]),
                objective=r[7],
                converged=bool(r[8]),
                n_points=r[9],
                selection=json.loads(r[10]),
                settings=json.loads(r[11]),
                created=r[12],
                provenance=json.loads(r[13]),
            )
            for r in rows
        ]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; inside another (`Store.batch`), a
    savepoint, so the outer one commits or rolls back everything together.

    IMMEDIATE takes the write lock up front, so two writers queue on the
    busy timeout instead of deadlocking on a lock upgrade.
    """

    def __init__(self, conn):
        self._conn = conn
        self._nested = False

    def __enter__(self):
        self._nested = self._conn.in_transaction
        self._conn.execute("SAVEPOINT inner" if self._nested else "BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        if self._nested:
            if exc_type:
                self._conn.execute("ROLLBACK TO inner")
            self._conn.execute("RELEASE inner")
        else:
            self._conn.execute("ROLLBACK" if exc_type else "COMMIT")


# RunRecord fields stored as JSON text, and their column names.
_JSON_COLUMNS = {"config": "config_json", "flops_by_convention": "flops_json"}
_RUN_COLUMNS = ", ".join(
    f"r.{_JSON_COLUMNS.get(f.name, f.name)}" for f in dataclasses.fields(RunRecord)
)


def _run_from_row(row) -> RunRecord:
    names = [f.name for f in dataclasses.fields(RunRecord)]
    values = dict(zip(names, row, strict=True))
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name])
    return RunRecord(**values)
