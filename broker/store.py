"""The job store: every job and every state transition, in SQLite (WAL), written before it is acted on.

States: queued -> processing -> completed | failed | cancelled. Each transition is one UPDATE
guarded by the state (and attempt) it expects, so a late or duplicate report cannot move a job
twice: a job completes once. `checkpoint` names the stage whose input the job's spool folder holds
(its latest checkpoint): a job dispatched again starts there.

A job with a `webhook_url` gets a row in `webhook_outbox` when it becomes final, from a trigger, so
the row and the transition are one write; broker/webhooks.py delivers from it (`Outbox`, on the
delivery thread's own connection). `preview` names the job's latest
live preview image (`common.spool.PREVIEW_NAME`).
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINAL = ("completed", "failed", "cancelled")
STATES = ("queued", "processing", *FINAL)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    preset TEXT NOT NULL,
    params TEXT NOT NULL,
    route TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    output_path TEXT,
    timings TEXT NOT NULL DEFAULT '{}',
    checkpoint TEXT,
    checkpoint_clip INTEGER,
    outputs TEXT,
    preview TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, priority, seq);
CREATE TABLE IF NOT EXISTS stage_timings (
    key TEXT NOT NULL,
    stage TEXT NOT NULL,
    n INTEGER NOT NULL,
    mean_s REAL NOT NULL,
    PRIMARY KEY (key, stage)
);
"""

# The webhook outbox (broker/webhooks.py delivers from it). A job's row is written by the trigger in
# the same statement that makes the job final, so no crash can end a job and lose its delivery;
# it holds what the payload needs, so the body is the same on every attempt. `state`: pending
# (due at `next_at`), delivered (a 2xx came back), expired (the retry window passed), refused (the
# URL's host resolved to an address the config does not allow, or the receiver answered 410 Gone).
WEBHOOK_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT PRIMARY KEY,
    job_id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    error TEXT,
    occurred_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(state, next_at);
CREATE TRIGGER IF NOT EXISTS webhook_on_final AFTER UPDATE OF status ON jobs
WHEN NEW.webhook_url IS NOT NULL AND NEW.status IN ('completed', 'failed', 'cancelled')
    AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
BEGIN
    INSERT OR IGNORE INTO webhook_outbox (id, job_id, owner, url, status, model, error, occurred_at, next_at)
    VALUES ('msg_' || NEW.id, NEW.id, NEW.owner, NEW.webhook_url, NEW.status, NEW.model, NEW.error,
            COALESCE(NEW.finished_at, (julianday('now') - 2440587.5) * 86400.0),
            COALESCE(NEW.finished_at, (julianday('now') - 2440587.5) * 86400.0));
END;
"""

# Idempotency-Key: (owner, key) -> the job a create request made and the fingerprint of its body.
# Its own table and methods (idempotent_add, idempotent_job, forget_keys), apart from the jobs table.
IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency_keys(created_at);
CREATE INDEX IF NOT EXISTS idempotency_job ON idempotency_keys(job_id);
"""


@dataclass
class Job:
    seq: int
    id: str
    owner: str
    model: str
    preset: str
    params: dict[str, Any]
    route: list[str]
    priority: int
    status: str
    stage: str | None
    progress: float
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: dict[str, Any] | None
    output_path: str | None
    timings: dict[str, Any]
    checkpoint: str | None = None
    # The S2V clip the checkpoint is in (the job resumes at that clip); None without a checkpoint.
    checkpoint_clip: int | None = None
    webhook_url: str | None = None
    # What the muxer wrote: {"files": [JobDone.outputs...], "postprocess": JobDone.postprocess}.
    outputs: dict[str, Any] | None = None
    preview: str | None = None
    group_id: str | None = None  # the n variants of one request share it

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        for key in ("params", "route", "timings"):
            d[key] = json.loads(d[key])
        d["error"] = json.loads(d["error"]) if d["error"] else None
        d["outputs"] = json.loads(d["outputs"]) if d.get("outputs") else None
        return cls(**d)

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a transition written is a transition kept
        self.db.executescript(SCHEMA)
        self.db.executescript(IDEMPOTENCY_SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "checkpoint" not in columns:  # a store written before checkpoints
            self.db.execute("ALTER TABLE jobs ADD COLUMN checkpoint TEXT")
        if "webhook_url" not in columns:  # a store written before webhooks
            self.db.execute("ALTER TABLE jobs ADD COLUMN webhook_url TEXT")
        if "group_id" not in columns:  # a store written before `n` variants
            self.db.execute("ALTER TABLE jobs ADD COLUMN group_id TEXT")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_group ON jobs(group_id)")
        self.db.executescript(WEBHOOK_SCHEMA)  # after the column: its trigger reads it
        if "outputs" not in columns:  # a store written before jobs had several outputs
            self.db.execute("ALTER TABLE jobs ADD COLUMN outputs TEXT")
        if "preview" not in columns:  # a store written before live previews
            self.db.execute("ALTER TABLE jobs ADD COLUMN preview TEXT")
        if "checkpoint_clip" not in columns:  # a store written before S2V's clips
            self.db.execute("ALTER TABLE jobs ADD COLUMN checkpoint_clip INTEGER")

    def close(self) -> None:
        self.db.close()

    # ---- reads ----
    def get(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def by_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        rows = self.db.execute(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY priority DESC, seq ASC", statuses
        ).fetchall()
        return [Job.from_row(r) for r in rows]

    def count(self, status: str) -> int:
        count: int = self.db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]
        return count

    def count_active(self, owner: str) -> int:
        """Jobs of `owner` not yet final (queued or processing)."""
        count: int = self.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'processing')", (owner,)
        ).fetchone()[0]
        return count

    def list(self, status: str | None, limit: int, offset: int, owner: str | None = None,
             group_id: str | None = None) -> tuple[list[Job], int]:
        """A page of jobs, newest first; a group's jobs oldest first (in seed order)."""
        where, args = [], []
        if group_id is not None:
            where.append("group_id = ?")
            args.append(group_id)
        if status:
            where.append("status = ?")
            args.append(status)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
        rows = self.db.execute(
            f"SELECT * FROM jobs {clause} ORDER BY seq {'ASC' if group_id is not None else 'DESC'} LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [Job.from_row(r) for r in rows.fetchall()], total

    # ---- transitions ----
    # builtins.list: inside the class, `list` names the method above.
    def add(
        self, job_id: str, owner: str, model: str, preset: str, params: dict[str, Any], route: builtins.list[str],
        priority: int, webhook_url: str | None = None, group_id: str | None = None,
    ) -> Job:
        self.db.execute(
            "INSERT INTO jobs (id, owner, model, preset, params, route, priority, status, created_at, webhook_url,"
            " group_id) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (job_id, owner, model, preset, json.dumps(params), json.dumps(route), priority, time.time(), webhook_url,
             group_id),
        )
        return self.get(job_id)  # type: ignore[return-value]

    def start(self, job_id: str) -> int | None:
        """queued -> processing (or a new attempt of a processing job); returns the new attempt."""
        cur = self.db.execute(
            "UPDATE jobs SET status = 'processing', attempt = attempt + 1, stage = NULL,"
            " started_at = COALESCE(started_at, ?) WHERE id = ? AND status IN ('queued', 'processing')",
            (time.time(), job_id),
        )
        if cur.rowcount != 1:
            return None
        attempt: int = self.db.execute("SELECT attempt FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        return attempt

    def requeue(self, job_id: str, attempt: int, keep_attempt: bool = False) -> bool:
        """processing -> queued: a dispatch that did not go out, or a job the broker must send again.

        `keep_attempt` keeps the attempt counter, so the next dispatch is a new attempt and reports
        of the old one are ignored; otherwise the attempt that never left is taken back.
        """
        cur = self.db.execute(
            "UPDATE jobs SET status = 'queued', attempt = CASE WHEN ? THEN attempt ELSE attempt - 1 END"
            " WHERE id = ? AND status = 'processing' AND attempt = ?",
            (keep_attempt, job_id, attempt),
        )
        return cur.rowcount == 1

    def set_checkpoint(self, job_id: str, attempt: int, stage: str | None, clip: int = 0) -> bool:
        """Record the stage the job's latest checkpoint was written for, and its S2V clip (None:
        start over)."""
        cur = self.db.execute(
            "UPDATE jobs SET checkpoint = ?, checkpoint_clip = ?"
            " WHERE id = ? AND attempt = ? AND status = 'processing'",
            (stage, None if stage is None else clip, job_id, attempt),
        )
        return cur.rowcount == 1

    def set_preview(self, job_id: str, attempt: int, name: str) -> bool:
        """Record the job's latest preview image (only while that attempt runs)."""
        cur = self.db.execute(
            "UPDATE jobs SET preview = ? WHERE id = ? AND attempt = ? AND status = 'processing'",
            (name, job_id, attempt),
        )
        return cur.rowcount == 1

    def progress(
        self, job_id: str, attempt: int, stage: str, progress: float, timings: dict[str, Any] | None = None
    ) -> bool:
        sets, args = ["stage = ?", "progress = MAX(progress, ?)"], [stage, progress]
        if timings is not None:
            sets.append("timings = ?")
            args.append(json.dumps(timings))
        cur = self.db.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND attempt = ? AND status = 'processing'",
            [*args, job_id, attempt],
        )
        return cur.rowcount == 1

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        attempt: int | None = None,
        error: dict[str, Any] | None = None,
        output_path: str | None = None,
        timings: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job to a final state, once. With `attempt`, only that attempt may finish it."""
        assert status in FINAL
        sql = (
            "UPDATE jobs SET status = ?, finished_at = ?, error = ?, output_path = ?, outputs = ?,"
            " progress = CASE WHEN ? = 'completed' THEN 1.0 ELSE progress END,"
            " stage = CASE WHEN status = 'queued' THEN NULL ELSE stage END,"
            " timings = COALESCE(?, timings) WHERE id = ? AND status IN ('queued', 'processing')"
        )
        args: list[Any] = [status, time.time(), json.dumps(error) if error else None, output_path,
                           json.dumps(outputs) if outputs is not None else None, status,
                           json.dumps(timings) if timings is not None else None, job_id]
        if attempt is not None:
            sql += " AND attempt = ?"
            args.append(attempt)
        return self.db.execute(sql, args).rowcount == 1

    def webhook(self, job_id: str) -> dict[str, Any] | None:
        """Where the job's webhook delivery stands (`state`, `attempts`, `last_status`), None without one."""
        row = self.db.execute("SELECT state, attempts, last_status FROM webhook_outbox WHERE job_id = ?",
                              (job_id,)).fetchone()
        return dict(row) if row else None

    # ---- measured stage timings (for ETAs) ----
    def record_timing(self, key: str, stage: str, seconds: float) -> None:
        self.db.execute(
            "INSERT INTO stage_timings (key, stage, n, mean_s) VALUES (?, ?, 1, ?)"
            " ON CONFLICT (key, stage) DO UPDATE SET n = n + 1, mean_s = mean_s + (excluded.mean_s - mean_s) / (n + 1)",
            (key, stage, seconds),
        )

    def timings(self, key: str) -> dict[str, float]:
        rows = self.db.execute("SELECT stage, mean_s FROM stage_timings WHERE key = ?", (key,)).fetchall()
        return {r["stage"]: r["mean_s"] for r in rows}

    # ---- cursor pages and deletion (GET and DELETE /v1/videos) ----
    def page(self, owner: str | None, after: Job | None, limit: int, descending: bool = True) -> builtins.list[Job]:
        """Up to `limit` jobs (of `owner`, or everyone's for None) after the job `after` in creation
        order, newest first when `descending`."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if after is not None:
            where.append("seq < ?" if descending else "seq > ?")
            args.append(after.seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(
            f"SELECT * FROM jobs {clause} ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?", [*args, limit]
        )
        return [Job.from_row(r) for r in rows.fetchall()]

    def delete(self, job_id: str) -> bool:
        """Forget a final job, and the idempotency keys that name it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM idempotency_keys WHERE job_id = ?", (job_id,))
            deleted = self.db.execute(
                "DELETE FROM jobs WHERE id = ? AND status IN ('completed', 'failed', 'cancelled')", (job_id,)
            ).rowcount == 1
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return deleted

    # ---- Idempotency-Key ----
    def idempotent_job(self, owner: str, key: str, since: float) -> tuple[str, str] | None:
        """(fingerprint, job id) of the create request `owner` sent with `key` at `since` or later."""
        row = self.db.execute(
            "SELECT fingerprint, job_id FROM idempotency_keys WHERE owner = ? AND key = ? AND created_at >= ?",
            (owner, key, since),
        ).fetchone()
        return (row["fingerprint"], row["job_id"]) if row else None

    def idempotent_add(
        self, key: str, fingerprint: str, expired_before: float, job_id: str, owner: str, model: str, preset: str,
        params: dict[str, Any], route: builtins.list[str], priority: int, webhook_url: str | None = None,
    ) -> Job:
        """`add` the job and record `key` -> job in one transaction: a create that was answered is
        found again after a crash. Keys older than `expired_before` are dropped first."""
        return self.add_group([(job_id, params)], owner, model, preset, route, priority, webhook_url=webhook_url,
                              idempotency=(key, fingerprint, expired_before))[0]

    def add_group(
        self, jobs: builtins.list[tuple[str, dict[str, Any]]], owner: str, model: str, preset: str,
        route: builtins.list[str], priority: int, *, webhook_url: str | None = None, group_id: str | None = None,
        idempotency: tuple[str, str, float] | None = None,
    ) -> builtins.list[Job]:
        """`add` every (job id, params) of `jobs` in one transaction (all or none), under `group_id`;
        with `idempotency` (key, fingerprint, expired_before) the key is recorded -> the first job,
        keys older than expired_before dropped first."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            added = [self.add(job_id, owner, model, preset, params, route, priority, webhook_url=webhook_url,
                              group_id=group_id) for job_id, params in jobs]
            if idempotency is None:
                self.db.execute("COMMIT")
                return added
            key, fingerprint, expired_before = idempotency
            job = added[0]
            self.db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (expired_before,))
            self.db.execute(
                "INSERT INTO idempotency_keys (owner, key, fingerprint, job_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (owner, key, fingerprint, job.id, job.created_at),
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return added

# ---- the webhook outbox ----
@dataclass(frozen=True)
class Delivery:
    """One job's webhook, as the outbox holds it."""

    id: str  # the webhook-id header: the same on every attempt
    job_id: str
    owner: str  # the API key the job was submitted with ("" with auth off): it may have its own secret
    url: str
    status: str  # the job's final status
    model: str
    error: dict[str, Any] | None
    occurred_at: float
    state: str
    attempts: int
    next_at: float
    last_status: int | None
    last_error: str | None
    done_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Delivery:
        d = dict(row)
        d["error"] = json.loads(d["error"]) if d["error"] else None
        return cls(**d)


class Outbox:
    """The webhook outbox on a connection of its own (the delivery thread's; the broker's loop keeps
    the JobStore's). Rows are added by the trigger in WEBHOOK_SCHEMA, never here."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA synchronous=FULL")  # a delivery marked done stays done

    def close(self) -> None:
        self.db.close()

    def get(self, job_id: str) -> Delivery | None:
        row = self.db.execute("SELECT * FROM webhook_outbox WHERE job_id = ?", (job_id,)).fetchone()
        return Delivery.from_row(row) if row else None

    def due(self, now: float, limit: int) -> list[Delivery]:
        rows = self.db.execute(
            "SELECT * FROM webhook_outbox WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return [Delivery.from_row(r) for r in rows]

    def next_due(self) -> float | None:
        value: float | None = self.db.execute(
            "SELECT MIN(next_at) FROM webhook_outbox WHERE state = 'pending'").fetchone()[0]
        return value

    def attempted(self, delivery_id: str, *, state: str, next_at: float, status: int | None, error: str | None) -> None:
        """Record one attempt: still pending (due again at `next_at`), or done in `state`."""
        done = None if state == "pending" else time.time()
        self.db.execute(
            "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, next_at = ?, last_status = ?,"
            " last_error = ?, done_at = ? WHERE id = ? AND state = 'pending'",
            (state, next_at, status, error, done, delivery_id),
        )
