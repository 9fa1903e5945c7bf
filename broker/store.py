"""The job store: every job and every state transition, in SQLite (WAL), written before it is acted on.

States: queued -> processing -> completed | failed | cancelled. Each transition is one UPDATE
guarded by the state (and attempt) it expects, so a late or duplicate report cannot move a job
twice: a job completes once. `checkpoint` names the stage whose input the job's spool folder holds
(its latest checkpoint): a job dispatched again starts there. `preview` names the job's latest
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
    preview: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        for key in ("params", "route", "timings"):
            d[key] = json.loads(d[key])
        d["error"] = json.loads(d["error"]) if d["error"] else None
        return cls(**d)

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a transition written is a transition kept
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "checkpoint" not in columns:  # a store written before checkpoints
            self.db.execute("ALTER TABLE jobs ADD COLUMN checkpoint TEXT")
        if "preview" not in columns:  # a store written before live previews
            self.db.execute("ALTER TABLE jobs ADD COLUMN preview TEXT")

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

    def list(self, status: str | None, limit: int, offset: int, owner: str | None = None) -> tuple[list[Job], int]:
        where, args = [], []
        if status:
            where.append("status = ?")
            args.append(status)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
        rows = self.db.execute(
            f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset]
        )
        return [Job.from_row(r) for r in rows.fetchall()], total

    # ---- transitions ----
    # builtins.list: inside the class, `list` names the method above.
    def add(
        self, job_id: str, owner: str, model: str, preset: str, params: dict[str, Any], route: builtins.list[str],
        priority: int,
    ) -> Job:
        self.db.execute(
            "INSERT INTO jobs (id, owner, model, preset, params, route, priority, status, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
            (job_id, owner, model, preset, json.dumps(params), json.dumps(route), priority, time.time()),
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

    def set_checkpoint(self, job_id: str, attempt: int, stage: str | None) -> bool:
        """Record the stage the job's latest checkpoint was written for (None: start over)."""
        cur = self.db.execute(
            "UPDATE jobs SET checkpoint = ? WHERE id = ? AND attempt = ? AND status = 'processing'",
            (stage, job_id, attempt),
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
    ) -> bool:
        """Move a job to a final state, once. With `attempt`, only that attempt may finish it."""
        assert status in FINAL
        sql = (
            "UPDATE jobs SET status = ?, finished_at = ?, error = ?, output_path = ?,"
            " progress = CASE WHEN ? = 'completed' THEN 1.0 ELSE progress END,"
            " stage = CASE WHEN status = 'queued' THEN NULL ELSE stage END,"
            " timings = COALESCE(?, timings) WHERE id = ? AND status IN ('queued', 'processing')"
        )
        args: list[Any] = [status, time.time(), json.dumps(error) if error else None, output_path, status,
                           json.dumps(timings) if timings is not None else None, job_id]
        if attempt is not None:
            sql += " AND attempt = ?"
            args.append(attempt)
        return self.db.execute(sql, args).rowcount == 1

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
