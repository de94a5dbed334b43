"""SQLite (WAL) journal of accepted tasks, their state, results and keys; replayed on start.

The core marks tasks as new, changed or forgotten while it handles messages;
``commit()`` writes all of them in one transaction per loop iteration (group
commit), before the loop sends any reply. A row is written once per iteration
whatever happened to the task in it, so a task accepted, run and finished
between two commits costs one INSERT.
"""

from __future__ import annotations

import sqlite3
import time

import msgpack

from broker.logs import get_logger
from broker.states import TERMINAL, TaskState

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    name TEXT NOT NULL,
    args BLOB,                 -- opaque msgpack blob of (args, kwargs); NULL once finished
    frames BLOB,               -- msgpack list of the argument array frames; NULL once finished
    override BLOB,             -- msgpack resources given at submission, or NULL
    priority INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    timeout_s REAL,
    key TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    worker_name TEXT,          -- who held it last (a restarted broker lets it claim the task back)
    lost_on BLOB NOT NULL,     -- msgpack list of worker names that died holding it
    watchers BLOB NOT NULL,    -- msgpack list of other sessions that submitted its key
    result BLOB,               -- msgpack [status, value, info] once terminal
    result_frames BLOB,        -- msgpack list of result array frames
    acked INTEGER NOT NULL DEFAULT 0,
    submitted_wall REAL NOT NULL,
    finished_wall REAL,
    extra BLOB                 -- msgpack map: digest (of a keyed task), retry_on, backoff_s, error_retries
);
CREATE INDEX IF NOT EXISTS tasks_key ON tasks(key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_keyed_finished ON tasks(finished_wall) WHERE key IS NOT NULL;
"""
#: seconds between two sweeps of keyed results past their TTL (they are out of memory: only the
#: journal knows them)
SWEEP_INTERVAL_S = 60.0

_UPSERT = """INSERT OR REPLACE INTO tasks VALUES
    (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
#: a finished task's arguments are dropped with its last state change
_UPDATE = """UPDATE tasks SET state = ?1, attempts = ?2, worker_name = ?3, lost_on = ?4, watchers = ?5,
    result = ?6, result_frames = ?7, acked = ?8, extra = ?11,
    args = CASE WHEN ?6 IS NULL THEN args END, frames = CASE WHEN ?6 IS NULL THEN frames END,
    finished_wall = CASE WHEN ?6 IS NULL THEN NULL ELSE coalesce(finished_wall, ?10) END
    WHERE task_id = ?9"""


def _extra(task) -> bytes | None:
    """The columns added later, as one map (None where all are at their defaults)."""
    extra = {k: v for k, v in (("digest", task.digest), ("retry_on", list(task.retry_on)),
                               ("backoff_s", task.backoff_s), ("error_retries", task.error_retries)) if v}
    return msgpack.packb(extra) if extra else None


def _frames_blob(frames: list) -> bytes:
    return msgpack.packb([f if isinstance(f, bytes) else bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames])


class Journal:
    """Group-committed task journal. The core calls the marking methods; the loop calls commit()."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a crash of the broker process (the WAL is in the OS's
        # hands); a power cut may lose the last few commits. See docs/RELIABILITY.md.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        if "extra" not in {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}:
            self.db.execute("ALTER TABLE tasks ADD COLUMN extra BLOB")  # a journal from before the column
        self._new: dict = {}  #: task_id -> Task to insert whole, as it is at commit time
        self._dirty: dict = {}  #: task_id -> Task whose state columns to rewrite
        self._gone: set = set()  #: task ids to delete
        self._delivered: set = set()  #: ids of finished tasks every waiting session has fetched
        self._sweep_before: float | None = None  #: delete keyed results finished before this (unix time)
        self._last_sweep = 0.0
        self.commits = 0

    # ------------------------------------------------------------ marking (called by the core)

    def accepted(self, task) -> None:
        self._new[task.task_id] = task
        self._gone.discard(task.task_id)

    def state(self, task) -> None:
        """Its state changed: rewrite the state columns only, never its arguments again."""
        if task.task_id not in self._new:
            self._dirty[task.task_id] = task

    finished = fetched = state

    def delivered(self, task) -> None:
        """Nobody waits for its result any more: a restart redelivers it to no one, and a keyed
        one is read back (``keyed``) only when its key is submitted again."""
        self._delivered.add(task.task_id)
        self.state(task)

    def sweep(self, ttl_s: float) -> None:
        """Delete (with the next commit) keyed results older than ``ttl_s``: the core holds
        only those a session still has to fetch, and forgets those itself."""
        wall = time.time()
        if wall - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = wall
            self._sweep_before = wall - ttl_s

    def forgotten(self, task) -> None:
        self._new.pop(task.task_id, None)
        self._dirty.pop(task.task_id, None)
        self._gone.add(task.task_id)

    # ------------------------------------------------------------ writing

    def commit(self) -> None:
        if not self._new and not self._dirty and not self._gone and self._sweep_before is None:
            return
        wall = time.time()
        rows = [self._row(t, wall) for t in self._new.values()]
        updates = [self._update(t, wall) for t in self._dirty.values()]
        if self._delivered:  # a keyed result read back later and delivered again is unacked again
            rows = [r if r[0] not in self._delivered else (*r[:17], 1, *r[18:]) for r in rows]
            updates = [u if u[8] not in self._delivered else (*u[:7], 1, *u[8:]) for u in updates]
        gone = [(t,) for t in self._gone]
        sweep, self._sweep_before = self._sweep_before, None
        self._new, self._dirty, self._gone, self._delivered = {}, {}, set(), set()
        db = self.db
        db.execute("BEGIN")
        try:
            if rows:
                db.executemany(_UPSERT, rows)
            if updates:
                db.executemany(_UPDATE, updates)
            if gone:
                db.executemany("DELETE FROM tasks WHERE task_id = ?", gone)
            if sweep is not None:
                db.execute("DELETE FROM tasks WHERE key IS NOT NULL AND finished_wall < ?", (sweep,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.commits += 1

    @classmethod
    def _row(cls, task, wall: float) -> tuple:
        finished = task.state in TERMINAL
        return (task.task_id, task.session, task.name,
                None if finished else task.args, None if finished else _frames_blob(task.frames),
                None if task.override is None else msgpack.packb(task.override),
                task.priority, task.retries, task.timeout_s, task.key, *cls._update(task, wall)[:-3],
                task.wall_submitted or wall, wall if finished else None, _extra(task))

    @staticmethod
    def _update(task, wall: float) -> tuple:
        """The columns that change after acceptance, then the task id, the time and extra (for _UPDATE)."""
        result = result_frames = None
        acked = 0
        if task.result is not None:
            status, value, frames, info = task.result
            result = msgpack.packb([status, value, info])
            result_frames = _frames_blob(frames)
            # fetched (the payload was dropped); a cancelled task has none but still reaches the
            # sessions that submitted its key after it, so it is delivered again after a restart
            acked = int(value is None and status != TaskState.CANCELLED.value)
        return (task.state.value, task.attempts, task.worker_name, msgpack.packb(task.lost_on),
                msgpack.packb(sorted(task.watchers)), result, result_frames, acked, task.task_id, wall, _extra(task))

    # ------------------------------------------------------------ replay

    def restore(self, core, now: float) -> None:
        """Load every journaled task into ``core`` as a restarted broker must see it; keyed results
        that every session has fetched stay here until their key is submitted again (``keyed``)."""
        wall = time.time()
        counts = {s.value: 0 for s in TaskState}
        rows = self.db.execute("SELECT * FROM tasks WHERE NOT (key IS NOT NULL AND acked = 1 AND result IS NOT NULL)"
                               " ORDER BY rowid").fetchall()
        for row in rows:
            core.restore_task(self._record(row, core.result_ttl_s, wall), now)
            counts[row[10]] += 1
        log.info("journal_replayed", path=self.path, tasks=len(rows), **{k: v for k, v in counts.items() if v})

    def keyed(self, key: str, ttl_s: float) -> dict | None:
        """The finished task first submitted with ``key`` within ``ttl_s``, as ``restore`` reads it."""
        wall = time.time()
        row = self.db.execute("SELECT * FROM tasks WHERE key = ? AND result IS NOT NULL AND finished_wall >= ?"
                              " ORDER BY rowid LIMIT 1", (key, wall - ttl_s)).fetchone()
        return None if row is None else self._record(row, ttl_s, wall)

    @staticmethod
    def _record(row: tuple, ttl_s: float, wall: float) -> dict:
        (task_id, session, name, args, frames, override, priority, retries, timeout_s, key, state, attempts,
         worker_name, lost_on, watchers, result, result_frames, acked, submitted_wall, finished_wall, extra) = row
        record = {
            "task_id": task_id, "session": session, "name": name, "args": args or b"",
            "frames": msgpack.unpackb(frames) if frames else [],
            "override": msgpack.unpackb(override) if override else None,
            "priority": priority, "retries": retries, "timeout_s": timeout_s, "key": key,
            "state": TaskState(state), "attempts": attempts, "worker_name": worker_name,
            "lost_on": msgpack.unpackb(lost_on), "watchers": set(msgpack.unpackb(watchers)),
            "result": None, "acked": bool(acked), "submitted_wall": submitted_wall,
            "ttl_left_s": None, **(msgpack.unpackb(extra) if extra else {}),
        }
        if result is not None:
            status, value, info = msgpack.unpackb(result, strict_map_key=False)
            record["result"] = (status, value, msgpack.unpackb(result_frames) if result_frames else [], info)
            record["ttl_left_s"] = ttl_s - (wall - (finished_wall or wall))
        return record

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self.db.close()
