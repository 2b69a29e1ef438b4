"""The run history: ``runs/history.db`` (SQLite through sqlite-utils).

One query layer for the CLI and the TUI (they never write SQL) and one writer per run, the
run's supervisor, through :class:`RunRecorder`. The database runs in WAL mode so readers never
block the writers, every connection waits up to :data:`BUSY_TIMEOUT_S` for a lock, and the
schema version lives in ``PRAGMA user_version`` with an ordered list of migrations.

Tables: ``runs`` (one row a run), ``metrics`` (run_id, step, name, value, t), ``device_samples``
(run_id, t, device, kind, util, mem_used, mem_total, power_w, temp_c, proc_mem, proc_mem_peak)
and ``events``
(run_id, t, kind, step, payload JSON). Times are unix seconds (float); sizes are bytes.

Statuses stored: ``starting``, ``running``, ``completed``, ``failed``, ``stopped``, ``lost``.
``stalled`` is computed when read: a running run with no event for ``stall_minutes``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

BUSY_TIMEOUT_S = 5.0
STALL_MINUTES_DEFAULT = 10.0
STALL_ENV = "ZEROTUNE_STALL_MINUTES"

ACTIVE_STATUSES = ("starting", "running")
FINAL_STATUSES = ("completed", "failed", "stopped", "lost")
STATUSES = ACTIVE_STATUSES + FINAL_STATUSES + ("stalled",)

# A row written by spawn_supervisor but never taken over by a supervisor is lost after this.
STARTING_GRACE_S = 60.0


class HistoryError(Exception):
    """Base class of history errors that the CLI reports as bad input."""


class RunNotFound(HistoryError, LookupError):
    """No run has this id or id prefix."""


class AmbiguousRunId(HistoryError, LookupError):
    """More than one run starts with this prefix."""

    def __init__(self, prefix: str, candidates: Sequence[str]):
        self.prefix = prefix
        self.candidates = list(candidates)
        shown = ", ".join(self.candidates[:5]) + (", ..." if len(self.candidates) > 5 else "")
        super().__init__(f"run id prefix {prefix!r} is ambiguous: it matches {shown}")


class RunActive(HistoryError):
    """The operation needs a run that has ended."""


class SchemaTooNew(HistoryError):
    """The database was written by a newer zerotune."""


# --------------------------------------------------------------------------------------------
# Schema and migrations


# The runs table as migration 1 created it: frozen, later columns come from later migrations.
_RUN_COLUMNS_V1: dict[str, type] = {
    "id": str,
    "name": str,
    "status": str,
    "method": str,
    "adapter": str,
    "zero_stage": int,
    "model": str,
    "world_size": int,
    "profile_hash": str,
    "run_dir": str,
    "host": str,
    "created_at": float,
    "started_at": float,
    "ended_at": float,
    "exit_code": int,
    "reason": str,
    "error_kind": str,
    "last_step": int,
    "total_steps": int,
    "final_loss": float,
    "final_eval_loss": float,
    "best_eval_loss": float,
    "perplexity": float,
    "tokens_per_s": float,
    "wall_time": float,
    "estimate": str,  # the estimate object of launch.json, as JSON
    "est_peak_gpu_bytes": int,
    "est_peak_host_bytes": int,
    "peak_gpu_mem_bytes": int,
    "mean_gpu_mem_bytes": float,
    "peak_gpu_util": float,
    "mean_gpu_util": float,
    "peak_host_rss_bytes": int,
    "mean_host_rss_bytes": float,
    "peak_cpu_percent": float,
    "mean_cpu_percent": float,
    "sample_count": int,
    "supervisor_pid": int,
    "supervisor_started": float,  # process create time, so a recycled pid is not mistaken
    "launcher_pid": int,
    "launcher_pgid": int,
    "launcher_started": float,
    "last_event_at": float,
    "last_checkpoint": str,
    "events_offset": int,  # bytes of events.jsonl already recorded
    "warnings": int,
    "parent_run_id": str,
    "relation": str,
    "data_fingerprint": str,
    "sample_interval": float,
}


def _migration_1_initial(db: HistoryDB) -> None:
    db["runs"].create(_RUN_COLUMNS_V1, pk="id", not_null={"status"})
    db["runs"].create_index(["created_at"], index_name="runs_created")
    db["runs"].create_index(["status", "created_at"], index_name="runs_status_created")
    db["runs"].create_index(["name", "created_at"], index_name="runs_name_created")
    db["runs"].create_index(["parent_run_id"], index_name="runs_parent")
    db["metrics"].create(
        {"run_id": str, "step": int, "name": str, "value": float, "t": float},
        not_null={"run_id", "name"},
    )
    db["metrics"].create_index(["run_id", "name", "step"], index_name="metrics_run_name_step")
    db["device_samples"].create(
        {
            "run_id": str,
            "t": float,
            "device": str,
            "kind": str,
            "util": float,
            "mem_used": int,
            "mem_total": int,
            "power_w": float,
            "temp_c": float,
            "proc_mem": int,
        },
        not_null={"run_id", "device"},
    )
    db["device_samples"].create_index(["run_id", "t"], index_name="device_samples_run_t")
    db["events"].create(
        {"id": int, "run_id": str, "t": float, "kind": str, "step": int, "payload": str},
        pk="id",
        not_null={"run_id", "kind"},
    )
    db["events"].create_index(["run_id"], index_name="events_run")


def _migration_2_peak_rss(db: HistoryDB) -> None:
    # The kernel's RSS high-water mark: sampled RSS misses short peaks (up to -23% measured).
    db["device_samples"].add_column("proc_mem_peak", int)
    db["runs"].add_column("peak_host_hwm_bytes", int)


RUN_COLUMNS: dict[str, type] = {
    **_RUN_COLUMNS_V1,
    "peak_host_hwm_bytes": int,  # sum of the processes' kernel peak RSS (v2)
}

# Ordered: migration i brings the schema from version i to i + 1. Append, never edit.
MIGRATIONS: list[Callable[[HistoryDB], None]] = [_migration_1_initial, _migration_2_peak_rss]
SCHEMA_VERSION = len(MIGRATIONS)


class HistoryDB:
    """An open history database: a sqlite3 connection, with sqlite-utils on demand.

    Queries go straight to :attr:`conn`. sqlite-utils imports numpy (and pandas, see
    :func:`_sqlite_utils_database`) when installed, so it is loaded only for schema work or when
    :attr:`utils` is asked for; starting the CLI or the TUI stays fast.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._utils: Any = None

    @property
    def utils(self) -> Any:
        """A ``sqlite_utils.Database`` on the same connection."""
        if self._utils is None:
            self._utils = _sqlite_utils_database(self.conn)
        return self._utils

    def __getitem__(self, table: str) -> Any:
        return self.utils[table]

    def table_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sqlite_utils_database(conn: sqlite3.Connection) -> Any:
    """``sqlite_utils.Database(conn)``, imported without pandas.

    sqlite-utils imports pandas at import time only to map pandas column types, which the
    history never stores; that import is 0.3 s of every CLI, TUI and supervisor start. It is
    hidden while sqlite-utils loads (a process that already has pandas keeps it).
    """
    if "sqlite_utils" not in sys.modules and "pandas" not in sys.modules:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # makes `import pandas` fail
        try:
            import sqlite_utils  # noqa: F401
        finally:
            del sys.modules["pandas"]
    from sqlite_utils import Database

    return Database(conn)


def open_db(path: str | os.PathLike[str], *, migrate: bool = True) -> HistoryDB:
    """Open (creating if needed) the history database at ``path``.

    Sets WAL mode, a busy timeout and applies pending migrations. The connection may be used
    from another thread than the one that opened it, but not from two threads at once: give
    each worker thread its own ``open_db``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    db = HistoryDB(conn, path)
    _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
    conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, much faster
    if migrate:
        migrate_db(db)
    return db


def _retry_locked(fn: Callable[[], Any], attempts: int = 20) -> Any:
    # Switching a fresh file to WAL needs an exclusive lock that the busy handler does not
    # always cover; two processes creating the database at once can collide here.
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
    return None


def schema_version(db: HistoryDB) -> int:
    return int(db.conn.execute("PRAGMA user_version").fetchone()[0])


def migrate_db(db: HistoryDB) -> int:
    """Apply pending migrations in one write transaction; returns the schema version."""
    if schema_version(db) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    with write_transaction(db):
        current = schema_version(db)  # another process may have migrated meanwhile
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"history database schema v{current} is newer than this zerotune "
                f"(v{SCHEMA_VERSION}); upgrade zerotune"
            )
        for migration in MIGRATIONS[current:]:
            migration(db)
        db.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return SCHEMA_VERSION


@contextmanager
def write_transaction(db: HistoryDB) -> Iterator[HistoryDB]:
    """A write transaction that takes the write lock up front.

    ``BEGIN IMMEDIATE`` waits on the busy timeout for the lock; a deferred ``BEGIN`` that later
    upgrades to a write fails at once with "database is locked" when another writer committed
    in between, which is what makes concurrent writers lose rows.
    """
    conn = db.conn
    _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), attempts=5)
    try:
        yield db
    except BaseException:
        conn.rollback()
        raise
    else:
        conn.commit()


# --------------------------------------------------------------------------------------------
# Reading


def _rows(db: HistoryDB, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict]:
    cur = db.conn.execute(sql, params)
    keys = [d[0] for d in cur.description]
    return [dict(zip(keys, row, strict=True)) for row in cur.fetchall()]


def stall_minutes_default() -> float:
    try:
        return float(os.environ.get(STALL_ENV, STALL_MINUTES_DEFAULT))
    except ValueError:
        return STALL_MINUTES_DEFAULT


def effective_status(run: dict[str, Any], now: float | None = None,
                     stall_minutes: float | None = None) -> str:
    """The status to show: ``stalled`` for a running run with no event for too long."""
    status = run.get("status") or "unknown"
    if status != "running":
        return status
    now = time.time() if now is None else now
    minutes = stall_minutes_default() if stall_minutes is None else stall_minutes
    last = run.get("last_event_at") or run.get("started_at") or run.get("created_at")
    if last is not None and now - last > minutes * 60.0:
        return "stalled"
    return status


def _decorate(run: dict[str, Any], now: float, stall_minutes: float | None) -> dict[str, Any]:
    run["recorded_status"] = run["status"]
    run["status"] = effective_status(run, now, stall_minutes)
    return run


def list_runs(db: HistoryDB, status: str | Iterable[str] | None = None, name: str | None = None,
              limit: int | None = 50, stall_minutes: float | None = None) -> list[dict[str, Any]]:
    """Runs newest first, optionally filtered by status (one or several) and name substring.

    ``status`` is matched against the shown status, so ``stalled`` works and ``running``
    excludes stalled runs. Each row carries ``recorded_status`` (what the supervisor wrote).
    """
    statuses = [status] if isinstance(status, str) else list(status or [])
    for s in statuses:
        if s not in STATUSES:
            raise HistoryError(f"unknown status {s!r}; choose from {', '.join(STATUSES)}")
    where, params = [], []
    if statuses:
        stored = sorted({"running" if s == "stalled" else s for s in statuses})
        where.append(f"status IN ({', '.join('?' for _ in stored)})")
        params.extend(stored)
    if name:
        where.append("instr(lower(name), ?) > 0")
        params.append(name.lower())
    sql = "SELECT * FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id DESC"
    post_filter = bool(set(statuses) & {"running", "stalled"})
    if limit is not None and not post_filter:
        sql += " LIMIT ?"
        params.append(int(limit))
    now = time.time()
    runs = [_decorate(r, now, stall_minutes) for r in _rows(db, sql, params)]
    if post_filter:
        runs = [r for r in runs if r["status"] in statuses]
        if limit is not None:
            runs = runs[: int(limit)]
    return runs


# The history browser's columns: sort key -> SQL expression over the ``runs`` table. ``status``
# is the shown status (stalled computed with :cutoff), ``duration_s`` as ``runs show`` computes
# it (wall time, else started..ended or now), ``peak_mem_bytes`` the GPU peak of the run's
# processes, else the host peak (kernel high-water mark, else sampled RSS).
_PAGE_EXPRS: dict[str, str] = {
    "status": "CASE WHEN status = 'running' AND coalesce(last_event_at, started_at, created_at)"
              " < :cutoff THEN 'stalled' ELSE status END",
    "duration_s": "coalesce(wall_time, CASE WHEN started_at IS NOT NULL"
                  " THEN coalesce(ended_at, :now) - started_at END)",
    "peak_mem_bytes": "coalesce(peak_gpu_mem_bytes, peak_host_hwm_bytes, peak_host_rss_bytes)",
    "peak_mem_kind": "CASE WHEN peak_gpu_mem_bytes IS NOT NULL THEN 'gpu'"
                     " WHEN coalesce(peak_host_hwm_bytes, peak_host_rss_bytes) IS NOT NULL"
                     " THEN 'host' END",
}
PAGE_COLUMNS = (
    "id", "name", "method", "adapter", "model", "zero_stage", "world_size", "created_at",
    "started_at", "ended_at", "last_event_at", "last_step", "total_steps", "final_loss",
    "final_eval_loss", "best_eval_loss", "tokens_per_s", "reason", "run_dir",
    "parent_run_id", "relation",
)
PAGE_SORT_KEYS = (
    "status", "name", "method", "model", "zero_stage", "final_eval_loss", "best_eval_loss",
    "tokens_per_s", "peak_mem_bytes", "duration_s", "created_at", "id",
)


def page_runs(db: HistoryDB, *, text: str | None = None, status: str | Iterable[str] | None = None,
              sort: str = "created_at", descending: bool = True, limit: int = 200,
              offset: int = 0, stall_minutes: float | None = None,
              now: float | None = None) -> tuple[list[dict[str, Any]], int]:
    """One page of runs for a browser: ``(rows, total matching)``, filtered and sorted in SQL.

    ``text``: every whitespace-separated word must occur (case-insensitive) in the name, id,
    model, method or adapter. ``status``: shown statuses (``stalled`` works). ``sort``: one of
    :data:`PAGE_SORT_KEYS`; empty values sort last either way, ties newest first. Rows carry
    :data:`PAGE_COLUMNS` plus ``status`` (shown), ``recorded_status``, ``duration_s``,
    ``peak_mem_bytes`` and ``peak_mem_kind`` (``gpu`` or ``host``). Cost grows with the
    matching rows, not the page: 1 to 30 ms for 10,000 runs (bench/tui_history.py).
    """
    if sort not in PAGE_SORT_KEYS:
        raise HistoryError(f"cannot sort runs by {sort!r}; choose from {', '.join(PAGE_SORT_KEYS)}")
    statuses = [status] if isinstance(status, str) else list(status or [])
    for s in statuses:
        if s not in STATUSES:
            raise HistoryError(f"unknown status {s!r}; choose from {', '.join(STATUSES)}")
    now = time.time() if now is None else now
    minutes = stall_minutes_default() if stall_minutes is None else stall_minutes
    params: dict[str, Any] = {"now": now, "cutoff": now - minutes * 60.0}
    where = []
    if statuses:
        names = []
        for i, s in enumerate(statuses):
            params[f"s{i}"] = s
            names.append(f":s{i}")
        where.append(f"({_PAGE_EXPRS['status']}) IN ({', '.join(names)})")
    for i, word in enumerate((text or "").lower().split()):
        params[f"w{i}"] = word
        where.append(
            "instr(lower(coalesce(name, '') || ' ' || id || ' ' || coalesce(model, '') || ' '"
            f" || coalesce(method, '') || ' ' || coalesce(adapter, '')), :w{i}) > 0"
        )
    where_sql = (" WHERE " + " AND ".join(where)) if where else ""
    total = db.conn.execute(f"SELECT count(*) FROM runs{where_sql}", params).fetchone()[0]
    key = _PAGE_EXPRS.get(sort, sort)
    direction = "DESC" if descending else "ASC"
    # created_at and id are never empty: without the IS NULL term the index serves the order.
    nulls_last = "" if sort in ("created_at", "id") else f"({key}) IS NULL, "
    params.update(limit=int(limit), offset=int(offset))
    sql = (
        f"SELECT {', '.join(PAGE_COLUMNS)}, status AS recorded_status, "
        + ", ".join(f"{expr} AS {name}" for name, expr in _PAGE_EXPRS.items())
        + f" FROM runs{where_sql} ORDER BY {nulls_last}{key} {direction}, "
        "created_at DESC, id DESC LIMIT :limit OFFSET :offset"
    )
    return _rows(db, sql, params), int(total)


def resolve_run_id(db: HistoryDB, id_or_prefix: str) -> str:
    """The full id of the run whose id is, or uniquely starts with, ``id_or_prefix``."""
    key = (id_or_prefix or "").strip()
    if not key:
        raise RunNotFound("no run id given")
    exact = db.conn.execute("SELECT id FROM runs WHERE id = ?", (key,)).fetchone()
    if exact:
        return exact[0]
    # A range scan on the primary key index; LIKE would not use the index.
    found = [
        r[0]
        for r in db.conn.execute(
            "SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
            (key, key + "\U0010ffff"),
        )
    ]
    if not found:
        raise RunNotFound(f"no run with id {key!r} (see `zerotune runs list`)")
    if len(found) > 1:
        raise AmbiguousRunId(key, found)
    return found[0]


def get_run(db: HistoryDB, id_or_prefix: str, stall_minutes: float | None = None) -> dict[str, Any]:
    """One run row by id or unique id prefix; raises RunNotFound / AmbiguousRunId."""
    run_id = resolve_run_id(db, id_or_prefix)
    rows = _rows(db, "SELECT * FROM runs WHERE id = ?", (run_id,))
    return _decorate(rows[0], time.time(), stall_minutes)


def run_children(db: HistoryDB, run_id: str) -> list[dict[str, Any]]:
    """Runs that resumed or re-ran this one (id, name, status, relation), oldest first."""
    return _rows(
        db,
        "SELECT id, name, status, relation, created_at FROM runs WHERE parent_run_id = ? "
        "ORDER BY created_at",
        (run_id,),
    )


def run_metrics(db: HistoryDB, run_id: str, names: Iterable[str] | None = None,
                after_step: int | None = None) -> dict[str, list[tuple[int, float | None]]]:
    """Metric series of a run: ``{name: [(step, value), ...]}`` in step order.

    ``after_step`` returns only newer points (for polling a live run).
    """
    where, params = ["run_id = ?"], [run_id]
    wanted = list(names) if names is not None else None
    if wanted is not None:
        if not wanted:
            return {}
        where.append(f"name IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    if after_step is not None:
        where.append("step > ?")
        params.append(after_step)
    sql = (
        f"SELECT name, step, value FROM metrics WHERE {' AND '.join(where)} "
        "ORDER BY name, step"
    )
    out: dict[str, list[tuple[int, float | None]]] = {}
    for name, step, value in db.conn.execute(sql, params):
        out.setdefault(name, []).append((step, value))
    return out


def metric_summary(db: HistoryDB, run_id: str) -> dict[str, dict[str, Any]]:
    """Per metric name: last value (at the highest step), min, max, count, last step."""
    stats = db.conn.execute(
        "SELECT name, min(value), max(value), count(*) FROM metrics WHERE run_id = ? "
        "GROUP BY name ORDER BY name",
        (run_id,),
    ).fetchall()
    # With a single max() aggregate SQLite takes the bare column `value` from the row that
    # holds max(step); hence a second query rather than one with min/max/count.
    last = {
        name: (step, value)
        for name, step, value in db.conn.execute(
            "SELECT name, max(step), value FROM metrics WHERE run_id = ? GROUP BY name",
            (run_id,),
        )
    }
    return {
        name: {"last": last[name][1], "last_step": last[name][0], "min": lo, "max": hi, "count": n}
        for name, lo, hi, n in stats
    }


def run_events(db: HistoryDB, run_id: str, kinds: Iterable[str] | None = None,
               after_id: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Events of a run in order, payload decoded; ``after_id`` for polling."""
    where, params = ["run_id = ?"], [run_id]
    wanted = list(kinds) if kinds is not None else None
    if wanted:
        where.append(f"kind IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    if after_id is not None:
        where.append("id > ?")
        params.append(after_id)
    sql = f"SELECT id, t, kind, step, payload FROM events WHERE {' AND '.join(where)} ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    out = []
    for row in _rows(db, sql, params):
        try:
            row["payload"] = json.loads(row["payload"]) if row["payload"] else {}
        except ValueError:
            pass
        out.append(row)
    return out


def device_samples(db: HistoryDB, run_id: str, device: str | None = None,
                   after_t: float | None = None) -> list[dict[str, Any]]:
    """Raw device samples of a run in time order (for charts)."""
    where, params = ["run_id = ?"], [run_id]
    if device is not None:
        where.append("device = ?")
        params.append(device)
    if after_t is not None:
        where.append("t > ?")
        params.append(after_t)
    return _rows(
        db,
        "SELECT t, device, kind, util, mem_used, mem_total, power_w, temp_c, proc_mem, "
        "proc_mem_peak "
        f"FROM device_samples WHERE {' AND '.join(where)} ORDER BY t, device",
        params,
    )


def device_summary(db: HistoryDB, run_id: str) -> list[dict[str, Any]]:
    """Per device of a run: sample count, mean/peak utilisation and memory, power, temperature.

    For ``kind == "host"`` rows ``util`` is the CPU % of the run's process tree (100 = one core)
    and ``proc_mem`` its RSS; for GPUs ``proc_mem`` is the memory of the run's processes.
    """
    return _rows(
        db,
        "SELECT device, kind, count(*) AS samples, avg(util) AS mean_util, max(util) AS peak_util,"
        " max(mem_used) AS peak_mem_used, max(mem_total) AS mem_total,"
        " avg(proc_mem) AS mean_proc_mem, max(proc_mem) AS peak_proc_mem,"
        " max(proc_mem_peak) AS peak_proc_mem_hwm,"
        " avg(power_w) AS mean_power_w, max(power_w) AS peak_power_w, max(temp_c) AS peak_temp_c,"
        " min(t) AS first_t, max(t) AS last_t "
        "FROM device_samples WHERE run_id = ? GROUP BY device, kind ORDER BY kind, device",
        (run_id,),
    )


def run_dir_of(run: dict[str, Any]) -> Path | None:
    return Path(run["run_dir"]) if run.get("run_dir") else None


# --------------------------------------------------------------------------------------------
# Maintenance: delete, reconcile


def delete_run(db: HistoryDB, run_id: str, remove_dir: bool = False) -> dict[str, Any]:
    """Delete a run's rows (and with ``remove_dir`` its run directory).

    Refuses (RunActive) while the run is starting or running. Returns counts of deleted rows.
    """
    run_id = resolve_run_id(db, run_id)
    run = get_run(db, run_id)
    if run["recorded_status"] in ACTIVE_STATUSES:
        raise RunActive(f"run {run_id} is {run['status']}; stop it first (zerotune runs stop)")
    counts: dict[str, Any] = {"id": run_id}
    with write_transaction(db):
        for table in ("metrics", "device_samples", "events", "runs"):
            key = "id" if table == "runs" else "run_id"
            cur = db.conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (run_id,))
            counts[table] = cur.rowcount
    counts["removed_dir"] = None
    run_dir = run_dir_of(run)
    if remove_dir and run_dir is not None and run_dir.is_dir():
        # Only something that looks like a run directory, never an arbitrary path.
        if (run_dir / "launch.json").exists() or (run_dir / "profile.yaml").exists():
            shutil.rmtree(run_dir)
            counts["removed_dir"] = str(run_dir)
        else:
            raise HistoryError(f"{run_dir} does not look like a run directory; left in place")
    return counts


def reconcile(db: HistoryDB, now: float | None = None,
              is_alive: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
    """Mark ``lost`` the runs recorded as starting/running whose processes are all gone.

    A run is alive while its supervisor (pid and process start time) or any process of its
    launcher's process group lives. Runs recorded on another host are left alone. Events the
    engine appended after the supervisor died are recorded; the last step is kept. Returns the
    ids marked lost. Call it at every start of the CLI and the TUI.
    """
    if is_alive is None:
        from engine.supervisor import run_processes_alive as is_alive
    now = time.time() if now is None else now
    host = socket.gethostname()
    candidates = _rows(
        db, "SELECT * FROM runs WHERE status IN ('starting', 'running')"
    )
    lost = []
    for run in candidates:
        if run.get("host") and run["host"] != host:
            continue
        if run["status"] == "starting" and run.get("supervisor_pid") is None:
            if now - (run.get("created_at") or now) < STARTING_GRACE_S:
                continue
        elif is_alive(run):
            continue
        if _mark_lost(db, run, now):
            lost.append(run["id"])
    return lost


def _mark_lost(db: HistoryDB, run: dict[str, Any], now: float) -> bool:
    # One transaction from the re-check to the write, so two CLIs reconciling at once do not
    # both record the trailing events.
    with write_transaction(db):
        rows = _rows(db, "SELECT * FROM runs WHERE id = ?", (run["id"],))
        if not rows or rows[0]["status"] not in ACTIVE_STATUSES:
            return False
        run = rows[0]
        recorder = RunRecorder(db, run["id"])
        recorder.load_state(run)
        run_dir = run_dir_of(run)
        if run_dir is not None:
            recorder.catch_up_events(run_dir / "events.jsonl", run.get("events_offset") or 0)
        if run.get("supervisor_pid") is None:
            reason = "the supervisor never started (see supervisor.log in the run directory)"
        else:
            reason = "the supervisor and the engine are gone without recording an end"
            if recorder.saw_done:
                reason += " (the engine had reported completion)"
        recorder.finish("lost", exit_code=None, reason=reason, ended_at=now)
        recorder.write_pending()
    return True


# --------------------------------------------------------------------------------------------
# Writing: the supervisor's recorder


_STEP_NOT_METRICS = {"step", "total_steps", "t", "event"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _bytes_from_estimate(estimate: dict[str, Any] | None, keys: Sequence[str]) -> int | None:
    if not isinstance(estimate, dict):
        return None
    for key in keys:
        value = estimate.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, dict):  # e.g. {"gpu": {"peak_bytes": ...}}
            nested = _bytes_from_estimate(value, ("peak_bytes", "bytes", "total_bytes"))
            if nested is not None:
                return nested
    gb_keys = [k.replace("bytes", "gb") for k in keys]
    for key in gb_keys:
        value = estimate.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value * 1024**3)
    return None


EST_GPU_KEYS = ("peak_gpu_bytes", "gpu_peak_bytes", "per_gpu_bytes", "gpu_bytes_per_device",
                "gpu_bytes", "gpu")
EST_HOST_KEYS = ("peak_host_bytes", "host_peak_bytes", "host_bytes", "cpu_bytes", "host")


def run_fields_from_launch(launch: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The ``runs`` columns known before the run starts, from launch.json (and the run dir)."""
    estimate = launch.get("estimate")
    fields: dict[str, Any] = {
        "name": launch.get("name"),
        "method": launch.get("method"),
        "adapter": launch.get("adapter"),
        "zero_stage": launch.get("zero_stage"),
        "model": launch.get("model"),
        "world_size": launch.get("world_size"),
        "profile_hash": launch.get("profile_hash"),
        "parent_run_id": launch.get("parent_run_id"),
        "relation": launch.get("relation"),
        "sample_interval": launch.get("sample_interval"),
        "run_dir": str(Path(run_dir).resolve()),
        "host": socket.gethostname(),
        "estimate": json.dumps(estimate) if estimate is not None else None,
        "est_peak_gpu_bytes": _bytes_from_estimate(estimate, EST_GPU_KEYS),
        "est_peak_host_bytes": _bytes_from_estimate(estimate, EST_HOST_KEYS),
    }
    fingerprint = _data_fingerprint(Path(run_dir) / "environment.json")
    if fingerprint:
        fields["data_fingerprint"] = fingerprint
    return fields


def _data_fingerprint(path: Path) -> str | None:
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(env, dict):
        return None
    for key in ("data_fingerprint", "data_fingerprints", "data"):
        value = env.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list)) and value:
            import hashlib

            return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
    return None


def upsert_run(db: HistoryDB, run_id: str, fields: dict[str, Any]) -> None:
    """Update one run row, inserting it when missing (inside the caller's transaction)."""
    fields = {k: v for k, v in fields.items() if k in RUN_COLUMNS and k != "id"}
    if fields:
        sets = ", ".join(f"{c} = ?" for c in fields)
        cur = db.conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", [*fields.values(), run_id])
        if cur.rowcount:
            return
    fields.setdefault("status", "starting")
    fields.setdefault("created_at", time.time())
    cols = ["id", *fields]
    db.conn.execute(
        f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        [run_id, *fields.values()],
    )


def register_run(db: HistoryDB, launch: dict[str, Any], run_dir: str | os.PathLike[str],
                 status: str = "starting") -> str:
    """Create the row of a run about to start (status ``starting``); returns the run id.

    Does not overwrite a row that a supervisor already took over.
    """
    run_dir = Path(run_dir)
    run_id = launch.get("run_id") or run_dir.name
    fields = run_fields_from_launch(launch, run_dir)
    with write_transaction(db):
        exists = db.conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if exists is None:
            upsert_run(db, run_id, {**fields, "status": status, "created_at": time.time()})
    return run_id


class RunRecorder:
    """Buffers a run's events, metrics and device samples and writes them in batches.

    Used by the supervisor (the single writer of a run's rows) and by reconciliation. Each
    :meth:`flush` is one ``BEGIN IMMEDIATE`` transaction with ``executemany`` inserts and one
    update of the run row. A flush that finds the database locked beyond the busy timeout
    keeps its buffers for the next try instead of losing rows.
    """

    def __init__(self, db: HistoryDB, run_id: str, flush_interval: float = 1.0,
                 max_buffer: int = 2000):
        self.db = db
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._events: list[tuple] = []
        self._metrics: list[tuple] = []
        self._samples: list[tuple] = []
        self._run: dict[str, Any] = {}
        self._last_flush = 0.0
        # Aggregates kept in memory, written into the run row.
        self.saw_done = False
        self.saw_stopped = False
        self.stopped_event: dict[str, Any] | None = None
        self.error_event: dict[str, Any] | None = None
        self.events_seen = 0
        self._warnings = 0
        self._best_eval: float | None = None
        self._gpu_mem_peak: int | None = None
        self._gpu_mem_sum = 0.0
        self._gpu_mem_n = 0
        self._gpu_util_peak: float | None = None
        self._gpu_util_sum = 0.0
        self._gpu_util_n = 0
        self._rss_peak: int | None = None
        self._hwm_peak: int | None = None
        self._rss_sum = 0.0
        self._cpu_peak: float | None = None
        self._cpu_sum = 0.0
        self._host_n = 0
        self.last_host_mem: tuple[int | None, int | None] = (None, None)

    # -- state ---------------------------------------------------------------------------

    def load_state(self, run: dict[str, Any]) -> None:
        """Continue from an existing row (reconciliation)."""
        self._best_eval = run.get("best_eval_loss")
        self._warnings = run.get("warnings") or 0

    def update(self, **fields: Any) -> None:
        """Set run-row columns, written at the next flush."""
        self._run.update(fields)

    def start(self, launch: dict[str, Any], run_dir: str | os.PathLike[str],
              supervisor_pid: int, supervisor_started: float | None) -> None:
        """Take over the run row: status running, identity and supervisor process."""
        fields = run_fields_from_launch(launch, Path(run_dir))
        now = time.time()
        existing = self.db.conn.execute(
            "SELECT created_at FROM runs WHERE id = ?", (self.run_id,)
        ).fetchone()
        fields.update(
            status="running",
            created_at=existing[0] if existing and existing[0] else now,
            started_at=now,
            supervisor_pid=supervisor_pid,
            supervisor_started=supervisor_started,
            events_offset=0,
            warnings=0,
        )
        self._run.update(fields)
        self.flush()

    # -- buffering -----------------------------------------------------------------------

    def add_events(self, events: Iterable[dict[str, Any]]) -> None:
        for ev in events:
            self._add_event(ev)

    def _add_event(self, ev: dict[str, Any]) -> None:
        kind = str(ev.get("event"))
        t = _number(ev.get("t")) or time.time()
        step_value = ev.get("step")
        step = int(step_value) if _number(step_value) is not None else None
        payload = {k: v for k, v in ev.items() if k not in ("event", "t")}
        self._events.append(
            (self.run_id, t, kind, step, json.dumps(payload, default=str, allow_nan=True))
        )
        self.events_seen += 1
        run = self._run
        last_t = run.get("last_event_at")
        run["last_event_at"] = t if last_t is None else max(last_t, t)
        if step is not None and step >= (run.get("last_step") or 0):
            run["last_step"] = step
        if kind in ("step", "eval", "infer"):
            # Inference figures (tokens/s, latency) must not mix with training's of the same name.
            prefix = "infer_" if kind == "infer" else ""
            at = step if step is not None else run.get("last_step")
            for name, value in ev.items():
                if name in _STEP_NOT_METRICS:
                    continue
                number = _number(value)
                if number is not None:
                    name = name if name.startswith(prefix) else prefix + name
                    self._metrics.append((self.run_id, at, name, number, t))
        if kind == "start":
            for col in ("world_size", "method", "adapter", "zero_stage", "model", "total_steps"):
                if ev.get(col) is not None:
                    run[col] = ev[col]
        elif kind == "step":
            if ev.get("total_steps") is not None:
                run["total_steps"] = ev["total_steps"]
            if _number(ev.get("loss")) is not None:
                run["final_loss"] = _finite(float(ev["loss"]))
            if _number(ev.get("tokens_per_s")) is not None:
                run["tokens_per_s"] = float(ev["tokens_per_s"])
        elif kind == "eval":
            eval_loss = _finite(_number(ev.get("eval_loss")))
            if eval_loss is not None:
                run["final_eval_loss"] = eval_loss
                if self._best_eval is None or eval_loss < self._best_eval:
                    self._best_eval = eval_loss
                run["best_eval_loss"] = self._best_eval
            if _number(ev.get("perplexity")) is not None:
                run["perplexity"] = _finite(float(ev["perplexity"]))
        elif kind == "checkpoint":
            if ev.get("path"):
                run["last_checkpoint"] = str(ev["path"])
        elif kind == "stopped":
            self.saw_stopped = True
            self.stopped_event = ev
            if ev.get("checkpoint"):
                run["last_checkpoint"] = str(ev["checkpoint"])
        elif kind == "error":
            self.error_event = ev
            if ev.get("kind"):
                run["error_kind"] = str(ev["kind"])
        elif kind == "done":
            self.saw_done = True
            summary = ev.get("summary") if isinstance(ev.get("summary"), dict) else {}
            for src, col in (("final_loss", "final_loss"), ("final_eval_loss", "final_eval_loss"),
                             ("best_eval_loss", "best_eval_loss"), ("perplexity", "perplexity"),
                             ("tokens_per_s", "tokens_per_s"), ("wall_time", "wall_time")):
                if _number(summary.get(src)) is not None:
                    run[col] = _finite(float(summary[src]))
            if _number(summary.get("steps")) is not None:
                run["last_step"] = max(int(summary["steps"]), run.get("last_step") or 0)
        elif kind == "warning":
            self._warnings += 1
            run["warnings"] = self._warnings

    def add_warning(self, message: str, source: str = "supervisor") -> None:
        """Record a supervisor-side warning (e.g. a malformed event line) as an event."""
        self._add_event({"event": "warning", "t": time.time(), "message": message,
                         "source": source})

    def add_samples(self, samples: Iterable[Any]) -> None:
        """Buffer device samples (``engine.devices.DeviceSample`` or dicts)."""
        for s in samples:
            d = s if isinstance(s, dict) else s.as_dict()
            self._samples.append((
                self.run_id, d["t"], d["device"], d["kind"], d.get("util"), d.get("mem_used"),
                d.get("mem_total"), d.get("power_w"), d.get("temp_c"), d.get("proc_mem"),
                d.get("proc_mem_peak"),
            ))
            self._aggregate_sample(d)

    def _aggregate_sample(self, d: dict[str, Any]) -> None:
        run = self._run
        if d["kind"] == "gpu":
            if d.get("proc_mem") == 0:
                return  # none of the run's processes on this GPU: someone else's, or idle
            mem = d.get("proc_mem") if d.get("proc_mem") is not None else d.get("mem_used")
            if mem is not None:
                self._gpu_mem_peak = max(self._gpu_mem_peak or 0, int(mem))
                self._gpu_mem_sum += mem
                self._gpu_mem_n += 1
                run["peak_gpu_mem_bytes"] = self._gpu_mem_peak
                run["mean_gpu_mem_bytes"] = self._gpu_mem_sum / self._gpu_mem_n
            util = d.get("util")
            if util is not None:
                self._gpu_util_peak = max(self._gpu_util_peak or 0.0, float(util))
                self._gpu_util_sum += util
                self._gpu_util_n += 1
                run["peak_gpu_util"] = self._gpu_util_peak
                run["mean_gpu_util"] = self._gpu_util_sum / self._gpu_util_n
        else:
            self._host_n += 1
            run["sample_count"] = self._host_n
            rss, cpu = d.get("proc_mem"), d.get("util")
            self.last_host_mem = (d.get("mem_used"), d.get("mem_total"))
            if rss is not None:
                self._rss_peak = max(self._rss_peak or 0, int(rss))
                self._rss_sum += rss
                run["peak_host_rss_bytes"] = self._rss_peak
                run["mean_host_rss_bytes"] = self._rss_sum / self._host_n
            hwm = d.get("proc_mem_peak")
            if hwm is not None:
                self._hwm_peak = max(self._hwm_peak or 0, int(hwm))
                run["peak_host_hwm_bytes"] = self._hwm_peak
            if cpu is not None:
                self._cpu_peak = max(self._cpu_peak or 0.0, float(cpu))
                self._cpu_sum += cpu
                run["peak_cpu_percent"] = self._cpu_peak
                run["mean_cpu_percent"] = self._cpu_sum / self._host_n

    def catch_up_events(self, events_path: Path, offset: int = 0) -> int:
        """Record events appended after ``offset`` (reconciliation after a supervisor died)."""
        from engine.events import EventTail

        tail = EventTail(Path(events_path), offset=offset, quiet=True)
        events = tail.read_new()
        self.add_events(events)
        for message in tail.warnings:
            self.add_warning(message)
        self._run["events_offset"] = tail.offset
        return len(events)

    # -- writing -------------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._events) + len(self._metrics) + len(self._samples)

    def flush_due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.pending() >= self.max_buffer:
            return True
        return bool(self.pending() or self._run) and now - self._last_flush >= self.flush_interval

    def flush(self) -> bool:
        """Write everything buffered in one transaction; False (buffers kept) if locked."""
        if not self.pending() and not self._run:
            return True
        try:
            with write_transaction(self.db):
                self.write_pending()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return False
        return True

    def write_pending(self) -> None:
        """Write the buffers inside the caller's open write transaction and clear them."""
        conn = self.db.conn
        if self._events:
            conn.executemany(
                "INSERT INTO events (run_id, t, kind, step, payload) VALUES (?, ?, ?, ?, ?)",
                self._events,
            )
        if self._metrics:
            conn.executemany(
                "INSERT INTO metrics (run_id, step, name, value, t) VALUES (?, ?, ?, ?, ?)",
                self._metrics,
            )
        if self._samples:
            conn.executemany(
                "INSERT INTO device_samples (run_id, t, device, kind, util, mem_used, "
                "mem_total, power_w, temp_c, proc_mem, proc_mem_peak) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._samples,
            )
        if self._run:
            upsert_run(self.db, self.run_id, self._run)
        # Cleared only once the statements succeeded: a rolled-back flush is retried whole.
        self._events, self._metrics, self._samples, self._run = [], [], [], {}
        self._last_flush = time.monotonic()

    def finish(self, status: str, exit_code: int | None, reason: str | None,
               ended_at: float | None = None) -> None:
        """Record the end of the run (written by the next flush)."""
        ended_at = time.time() if ended_at is None else ended_at
        self._run.update(status=status, exit_code=exit_code, reason=reason, ended_at=ended_at)
        if "wall_time" not in self._run:
            row = self.db.conn.execute(
                "SELECT started_at, wall_time FROM runs WHERE id = ?", (self.run_id,)
            ).fetchone()
            if row and row[0] and not row[1]:
                self._run["wall_time"] = ended_at - row[0]
