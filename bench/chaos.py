"""Chaos soak: many tiny jobs through the HTTP API while a killer SIGKILLs or SIGSTOPs random processes.

Starts the whole system (supervisord, tiny profile) on a private state folder and a free loopback
port, then, from a seed:

- submits `--jobs` jobs (every served model: t2v-A14B, i2v-A14B with an image, ti2v-5B with and
  without one; images as multipart or base64; draft and standard presets), keeping at most
  `--concurrency` of them unfinished at once, and cancels some of them at a random moment;
- meanwhile a killer picks a random program (any stage, the broker, the gateway) about every
  `--kill-every` seconds and SIGKILLs it, or SIGSTOPs it and SIGCONTs it after up to
  `--max-pause` seconds; at most `--max-kills` times, and never past `--time-limit`. Only
  processes of this run's own supervisord, checked in /proc before each signal.

The client survives the gateway being down: a submit is retried with backoff. A submit whose answer
was lost (connection reset, timeout, a 5xx) may or may not have created a job: before retrying, the
client looks for its prompt (unique per submission) among the jobs the server lists, and at the end
every listed job is matched to its submission, so a job created behind a lost answer is counted,
and a retried submit that created a second job is counted as a duplicate, not as a new submission.

Before anything is measured or killed, one warm-up job of each variant runs (not counted), so
memory a process allocates once, on its first job of a kind, is not counted as growth. After the
killer stops, it waits (at most `--drain-s`) until every job is final, then reports: submissions,
jobs, completed, failed (by error code), cancelled, lost (submitted but unknown to the server, or
never final), completed twice (per job: more than one `completed` line in the broker's log, or more
than one `complete` event on a WebSocket subscribed to all jobs), p50/p99 latency (submit to
final), the slowest jobs, and each program's RSS at the start and the end (and how often
supervisord started it). Findings that are no target but should not happen either (MP4s of jobs
that did not complete, MP4s written twice, duplicate jobs, jobs created behind a lost answer) are
listed with the jobs' log lines; the state folder is kept when a target is missed or there is a
finding. JSON to `--out`, a summary on stdout.

    .venv/bin/python bench/chaos.py --jobs 20 --kill-every 5 --max-kills 6 --time-limit 600
    .venv/bin/python bench/chaos.py --seed 1 --jobs 200 --time-limit 1200 --drain-s 300
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# After the sys.path line above, so that `python bench/chaos.py` finds the project's packages.
from bench.launcher import (  # noqa: E402
    COMMANDS,
    PROGRAMS,
    Supervised,
    cmdline,
    rss_kib,
    short_tmpdir,
)
from common.procs import start_ticks  # noqa: E402

FINAL = ("completed", "failed", "cancelled")
# (model, how the image is sent): every served model, ti2v-5B with and without an image.
VARIANTS = [
    ("t2v-A14B", None),
    ("i2v-A14B", "multipart"),
    ("i2v-A14B", "base64"),
    ("ti2v-5B", None),
    ("ti2v-5B", "multipart"),
    ("ti2v-5B", "base64"),
]
JOB_LINE = re.compile(r"job=([0-9a-f]{32}) (.*)")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class Submission:
    index: int
    prompt: str
    model: str
    image_via: str | None
    preset: str
    seed: int
    priority: int
    cancel_after_s: float | None  # after it was accepted; None: never cancelled
    image_size: tuple[int, int] | None = None
    first_attempt_at: float | None = None  # wall clock
    attempts: list[dict[str, Any]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)  # jobs of this submission the client knows of
    found_by_listing: list[str] = field(default_factory=list)  # of those, learned from the listing
    gave_up: str | None = None
    cancel: dict[str, Any] | None = None


def make_plan(rng: random.Random, n: int, seed: int) -> list[Submission]:
    plan = []
    order: list[tuple[str, str | None]] = []
    for i in range(n):
        if not order:  # every variant once per round, in a seeded order
            order = list(VARIANTS)
            rng.shuffle(order)
        model, via = order.pop()
        size = None
        if via is not None:
            size = rng.choice([(32, 32), (48, 32), (32, 48), (64, 64), (40, 24)])
        plan.append(Submission(
            index=i,
            prompt=f"chaos seed {seed} job {i}: a {rng.choice(['red', 'blue', 'green'])} "
                   f"{rng.choice(['cat', 'car', 'kite', 'boat'])} {rng.choice(['runs', 'turns', 'waits'])}",
            model=model, image_via=via, image_size=size,
            preset="draft" if rng.random() < 0.75 else "standard",
            seed=rng.randrange(2**31), priority=rng.choice([0, 0, 0, 1, -1]),
            # Tiny jobs take about a second when nothing is killed: cancel soon, or it only meets final jobs.
            cancel_after_s=round(rng.uniform(0.0, 2.0), 2) if rng.random() < 0.15 else None,
        ))
    return plan


def image_bytes(sub: Submission) -> tuple[bytes, str]:
    from PIL import Image

    assert sub.image_size is not None
    rng = random.Random(sub.seed)
    w, h = sub.image_size
    img = Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    if sub.index % 3 == 0:
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
    img.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def request_body(sub: Submission) -> tuple[bytes, str]:
    request = {"prompt": sub.prompt, "model": sub.model, "quality_preset": sub.preset, "seed": sub.seed,
               "priority": sub.priority}
    if sub.image_via is None:
        return json.dumps(request).encode(), "application/json"
    data, ctype = image_bytes(sub)
    if sub.image_via == "base64":
        b64 = base64.b64encode(data).decode()
        request["image"] = f"data:{ctype};base64,{b64}" if sub.index % 2 else b64
        return json.dumps(request).encode(), "application/json"
    boundary = uuid.uuid4().hex
    ext = "jpg" if ctype == "image/jpeg" else "png"
    body = b"".join([
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n".encode(),
        b"Content-Type: application/json\r\n\r\n", json.dumps(request).encode(), b"\r\n",
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.{ext}\"\r\n".encode(),
        f"Content-Type: {ctype}\r\n\r\n".encode(), data, b"\r\n", f"--{boundary}--\r\n".encode(),
    ])
    return body, f"multipart/form-data; boundary={boundary}"


# ---- HTTP that tells "not sent" from "answer lost" -------------------------------------------------


class NotSent(Exception):
    """The connection was refused: the request never reached a server, so it created nothing."""


class AnswerLost(Exception):
    """The request may have reached the server, but no answer came (reset, timeout)."""


def call(port: int, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
         timeout_s: float = 30.0) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        try:
            conn.connect()
        except OSError as exc:  # refused, or (gateway stopped with a full backlog) no accept in time
            raise NotSent(repr(exc)) from None
        try:
            conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AnswerLost(repr(exc)) from None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    finally:
        conn.close()


def error_code(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"].get("code")
    return None


# ---- the soak -----------------------------------------------------------------------------------


@dataclass
class JobTrack:
    job_id: str
    submission: int
    status: str | None = None
    error_code: str | None = None
    final_seen_at: float | None = None  # wall clock, when the client first saw it final
    not_found: int = 0  # 404 answers to status while running


class Soak:
    def __init__(self, args: argparse.Namespace, system: Supervised):
        self.args = args
        self.system = system
        self.port = system.port
        self.lock = threading.Lock()
        self.stop_all = threading.Event()  # the end of everything (also Ctrl-C)
        self.stop_killer = threading.Event()  # the killer's bounds were reached
        self.killer_done = threading.Event()
        self.submitting_done = threading.Event()
        self.plan = make_plan(random.Random(args.seed), args.jobs, args.seed)
        self.by_prompt = {s.prompt: s for s in self.plan}
        self.jobs: dict[str, JobTrack] = {}
        self.prompt_of: dict[str, str | None] = {}  # server job id -> its prompt (from /result)
        self.kills: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.ws_complete: collections.Counter[str] = collections.Counter()
        self.ws_connects = 0
        self.warm_ids: set[str] = set()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.time_limit

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def say(self, *parts: Any) -> None:
        print(f"[{self.elapsed():8.1f}s]", *parts, flush=True)

    def active(self) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.status not in FINAL)

    def adopt(self, sub: Submission, job_id: str, from_listing: bool) -> None:
        with self.lock:
            if job_id in self.jobs:
                return
            self.jobs[job_id] = JobTrack(job_id, sub.index)
            sub.job_ids.append(job_id)
            if from_listing:
                sub.found_by_listing.append(job_id)

    # -- submitting --
    def submit(self, sub: Submission) -> None:
        body, ctype = request_body(sub)
        backoff = 0.5
        sub.first_attempt_at = time.time()
        while not self.stop_all.is_set() and time.monotonic() < self.deadline:
            at = time.time()
            attempt: dict[str, Any] = {"at": round(at, 3)}
            sub.attempts.append(attempt)
            try:
                status, headers, payload = call(self.port, "POST", "/api/v1/generate", body, ctype)
            except NotSent as exc:
                attempt.update(outcome="not_sent", reason=str(exc)[:120])
            except AnswerLost as exc:
                attempt.update(outcome="answer_lost", reason=str(exc)[:120])
            else:
                attempt.update(status=status, code=error_code(payload))
                if status == 202 and isinstance(payload, dict) and payload.get("job_id"):
                    attempt["outcome"] = "accepted"
                    self.adopt(sub, payload["job_id"], from_listing=False)
                    return
                if status == 429:
                    attempt["outcome"] = "refused"  # the broker answered: nothing was created
                    retry_after = float(headers.get("retry-after", backoff) or backoff)
                    self.stop_all.wait(min(retry_after, 10.0))
                    continue
                if status < 500:
                    attempt["outcome"] = "rejected"
                    sub.gave_up = f"{status} {error_code(payload)}"
                    self.say(f"submission {sub.index} rejected: {status} {payload}")
                    return
                attempt["outcome"] = "error_answer"  # 5xx: the broker may still act on the request later
            if attempt["outcome"] in ("answer_lost", "error_answer"):
                found = self.find_created(sub, since=at)
                attempt["found_by_listing"] = found
                if found:
                    return
            self.stop_all.wait(backoff)
            backoff = min(2 * backoff, 8.0)
        sub.gave_up = sub.gave_up or "time limit"

    def find_created(self, sub: Submission, since: float) -> bool:
        """After a submit whose answer was lost: did it create a job? Looks for the prompt among the
        jobs listed since `since` (waiting for the gateway and broker to answer, within a bound)."""
        bound = time.monotonic() + 90
        while not self.stop_all.is_set() and time.monotonic() < min(bound, self.deadline):
            try:
                self.scan_listing(newer_than=since - 30)
            except (NotSent, AnswerLost, RuntimeError):
                self.stop_all.wait(1.0)
                continue
            return bool(sub.job_ids)
        return False

    def scan_listing(self, newer_than: float | None = None) -> int:
        """Match every listed job to its submission by prompt; returns how many jobs are listed.
        Raises (NotSent, AnswerLost, RuntimeError) when the server does not answer in full."""
        offset, total = 0, None
        while total is None or offset < total:
            status, _, page = call(self.port, "GET", f"/api/v1/jobs?limit=100&offset={offset}", timeout_s=15)
            if status != 200 or not isinstance(page, dict):
                raise RuntimeError(f"listing answered {status}")
            total = int(page["total"])
            jobs = page["jobs"]
            if not jobs:
                break
            for job in jobs:
                self.claim(job["job_id"])
            offset += len(jobs)
            if newer_than is not None and min(j["created_at"] for j in jobs) < newer_than:
                break  # newest first: the rest are older than what we look for
        return total or 0

    def claim(self, job_id: str) -> None:
        if job_id in self.jobs:
            return
        if job_id not in self.prompt_of:
            status, _, body = call(self.port, "GET", f"/api/v1/result/{job_id}", timeout_s=15)
            if status != 200:
                raise RuntimeError(f"result of {job_id} answered {status}")
            self.prompt_of[job_id] = (body.get("metadata") or {}).get("params", {}).get("prompt")
        sub = self.by_prompt.get(self.prompt_of[job_id] or "")
        if sub is not None:
            self.adopt(sub, job_id, from_listing=True)

    def submitter(self) -> None:
        rng = random.Random(self.args.seed + 2)
        try:
            for sub in self.plan:
                if self.args.submit_every > 0:  # spread the jobs over the time the killer works
                    self.stop_all.wait(rng.expovariate(1.0 / self.args.submit_every))
                while self.active() >= self.args.concurrency and not self.stop_all.is_set() \
                        and time.monotonic() < self.deadline:
                    self.stop_all.wait(0.2)
                if self.stop_all.is_set() or time.monotonic() >= self.deadline:
                    sub.gave_up = "time limit (not tried)"
                    continue
                self.submit(sub)
                if (sub.index + 1) % 10 == 0:
                    self.say(f"submitted {sub.index + 1}/{len(self.plan)}; {self.active()} unfinished; "
                             f"{len(self.kills)} kills so far")
        finally:
            self.submitting_done.set()

    # -- following jobs, cancelling --
    def poller(self) -> None:
        while not self.stop_all.is_set():
            now = time.time()
            with self.lock:
                open_jobs = [j for j in self.jobs.values() if j.status not in FINAL]
            for job in open_jobs:
                self.maybe_cancel(job, now)
                try:
                    status, _, body = call(self.port, "GET", f"/api/v1/status/{job.job_id}", timeout_s=5)
                except (NotSent, AnswerLost):
                    break  # the gateway is down or stopped: try again on the next round
                if status == 404:
                    job.not_found += 1
                elif status == 200 and isinstance(body, dict):
                    with self.lock:
                        job.status = body["status"]
                        if job.status in FINAL and job.final_seen_at is None:
                            job.final_seen_at = time.time()
                            job.error_code = error_code({"error": body.get("error")})
            self.stop_all.wait(1.0)

    def maybe_cancel(self, job: JobTrack, now: float) -> None:
        sub = self.plan[job.submission]
        if sub.cancel_after_s is None or sub.job_ids[:1] != [job.job_id]:
            return
        if sub.cancel is not None and sub.cancel.get("done"):
            return
        accepted = next((a["at"] for a in sub.attempts if a.get("outcome") == "accepted"), sub.first_attempt_at or now)
        if now < accepted + sub.cancel_after_s:
            return
        sub.cancel = sub.cancel or {"tries": 0}
        sub.cancel["tries"] += 1
        try:
            status, _, body = call(self.port, "POST", f"/api/v1/cancel/{job.job_id}", timeout_s=10)
        except (NotSent, AnswerLost) as exc:
            sub.cancel["last"] = type(exc).__name__
            return
        sub.cancel.update(done=status in (200, 409, 404), status=status, code=error_code(body),
                          at_s=round(now - accepted, 2), job_status=(body or {}).get("status"))

    # -- the killer --
    def killer(self) -> None:
        rng = random.Random(self.args.seed + 1)
        rpc = self.system.rpc()
        kill_until = self.t0 + min(self.args.time_limit, self.args.kill_for or self.args.time_limit)
        try:
            while not self.stop_killer.is_set() and len(self.kills) < self.args.max_kills:
                if self.stop_killer.wait(rng.uniform(0.5, 1.5) * self.args.kill_every):
                    break
                if time.monotonic() >= kill_until:
                    break
                if self.submitting_done.is_set() and self.active() == 0:
                    break  # nothing left to disturb
                program = rng.choice(PROGRAMS)
                action = "SIGKILL" if rng.random() < self.args.kill_fraction else "SIGSTOP"
                pause = round(rng.uniform(1.0, self.args.max_pause), 2)
                event: dict[str, Any] = {"t_s": self.elapsed(), "program": program, "action": action}
                try:
                    info = self.system.processes(rpc).get(program)
                except OSError as exc:  # supervisord busy: count it as a skipped turn
                    self.kills.append({**event, "skipped": f"supervisord: {exc!r}"[:120]})
                    continue
                if info is None or info.state != "RUNNING" or info.pid <= 0 \
                        or COMMANDS[program] not in cmdline(info.pid):
                    event["skipped"] = f"state {info.state if info else 'unknown'}"
                    self.kills.append(event)
                    continue
                pid, ticks = info.pid, start_ticks(info.pid)
                event["pid"] = pid
                try:
                    if action == "SIGKILL":
                        os.kill(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGSTOP)
                        event["pause_s"] = pause
                        self.stop_killer.wait(pause)
                        if start_ticks(pid) == ticks:  # the watchdog may have killed it meanwhile
                            os.kill(pid, signal.SIGCONT)
                        else:
                            event["gone_before_sigcont"] = True
                except ProcessLookupError:
                    event["gone_before_signal"] = True
                self.kills.append(event)
                self.say(f"killer: {action} {program} (pid {pid}){f' for {pause} s' if action == 'SIGSTOP' else ''}")
        finally:
            self.resume_all(rpc)
            self.killer_done.set()

    def resume_all(self, rpc: Any) -> None:
        """SIGCONT every process of ours, whatever happened: none may stay stopped."""
        for info in self.system.processes(rpc).values():
            if info.pid > 0 and COMMANDS[info.name] in cmdline(info.pid):
                try:
                    os.kill(info.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    # -- memory --
    def sampler(self) -> None:
        rpc = self.system.rpc()
        while not self.stop_all.is_set():
            try:
                self.sample(rpc)
            except OSError:  # supervisord's socket busy: the next sample will do
                pass
            self.stop_all.wait(3.0)

    def sample(self, rpc: Any) -> list[dict[str, Any]]:
        try:
            status, body = self.system.get_json("/ready", timeout_s=2)
            ready = status == 200 and bool(body.get("ready"))
        except (OSError, ValueError):
            ready = False
        rows = []
        for name, info in self.system.processes(rpc).items():
            rows.append({"t_s": self.elapsed(), "program": name, "pid": info.pid, "state": info.state,
                         "rss_kib": rss_kib(info.pid) if info.pid > 0 else None, "ready": ready})
        with self.lock:
            self.samples.extend(rows)
        return rows

    # -- a WebSocket that counts `complete` events per job --
    def watcher(self) -> None:
        from websockets.sync.client import connect

        while not self.stop_all.is_set():
            try:
                with connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=5, close_timeout=1) as ws:
                    self.ws_connects += 1
                    ws.send(json.dumps({"action": "subscribe", "all": True}))
                    while not self.stop_all.is_set():
                        try:
                            event = json.loads(ws.recv(timeout=1.0))
                        except TimeoutError:
                            continue
                        if event.get("event") == "complete":
                            with self.lock:
                                self.ws_complete[event.get("job_id", "")] += 1
            except Exception:  # noqa: BLE001 - the gateway was killed or stopped: connect again
                self.stop_all.wait(1.0)

    def warm_up(self) -> dict[str, Any]:
        """One job of each variant before anything is measured or killed, so that memory each
        process allocates once, on its first job of a kind, is not counted as growth."""
        t0 = time.monotonic()
        ids = []
        for i, (model, via) in enumerate(VARIANTS):
            sub = Submission(index=-1 - i, prompt=f"chaos warm-up {i}", model=model, image_via=via, preset="draft",
                             seed=i, priority=0, cancel_after_s=None, image_size=(48, 32) if via else None)
            body, ctype = request_body(sub)
            status, _, payload = call(self.port, "POST", "/api/v1/generate", body, ctype)
            if status != 202:
                raise RuntimeError(f"warm-up submit answered {status}: {payload}")
            ids.append(payload["job_id"])
        self.warm_ids = set(ids)
        statuses: dict[str, str] = {}
        while len(statuses) < len(ids) and time.monotonic() - t0 < 300:
            for job_id in ids:
                status, _, body = call(self.port, "GET", f"/api/v1/status/{job_id}", timeout_s=10)
                if status == 200 and body["status"] in FINAL:
                    statuses[job_id] = body["status"]
            time.sleep(0.5)
        return {"jobs": len(ids), "statuses": dict(collections.Counter(statuses.values())),
                "seconds": round(time.monotonic() - t0, 1)}

    # -- run --
    def run(self) -> dict[str, Any]:
        rpc = self.system.rpc()
        ready_rows = self.sample(rpc)
        warm = self.warm_up()
        self.say(f"warm-up: {warm}")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.args.time_limit
        start_rows = self.sample(rpc)
        threads = [threading.Thread(target=fn, name=fn.__name__, daemon=True)
                   for fn in (self.killer, self.poller, self.sampler, self.watcher)]
        for t in threads:
            t.start()
        submitter = threading.Thread(target=self.submitter, name="submitter", daemon=True)
        submitter.start()
        try:
            submitter.join()
            self.say(f"submissions done; {self.active()} unfinished; waiting for the killer")
            # The killer stops at its bounds, or once there is nothing left to disturb.
            while not self.killer_done.wait(1.0):
                if time.monotonic() >= self.deadline:
                    self.stop_killer.set()
            killer_stopped_at = self.elapsed()
            self.say(f"killer stopped after {sum(1 for k in self.kills if 'pid' in k)} signals; draining")
            drain = self.drain()
        finally:
            self.stop_all.set()
            for t in threads:
                t.join(timeout=10)
        end_rows = self.sample(rpc)
        report = self.report(start_rows, end_rows, killer_stopped_at, drain)
        report["warm_up"] = warm
        for row in ready_rows:  # before the warm-up, for reference
            report["rss"][row["program"]]["at_ready_mib"] = mib(row["rss_kib"])
        return report

    def drain(self) -> dict[str, Any]:
        """Wait for every job to be final (the poller follows them), matching listed jobs as we go,
        so a job created behind a lost answer is waited for too."""
        t0 = time.monotonic()
        bound = t0 + self.args.drain_s
        listed_ok = False
        while time.monotonic() < bound:
            try:
                self.scan_listing()
                listed_ok = True
            except (NotSent, AnswerLost, RuntimeError):
                listed_ok = False
            if listed_ok and self.active() == 0:
                break
            time.sleep(2.0)
        return {"drain_s": round(time.monotonic() - t0, 1), "all_final": listed_ok and self.active() == 0}

    # ---- the report ----
    def final_statuses(self) -> dict[str, dict[str, Any]]:
        out = {}
        for job_id in list(self.jobs):
            for _ in range(5):
                try:
                    status, _, body = call(self.port, "GET", f"/api/v1/result/{job_id}", timeout_s=15)
                    out[job_id] = {"http": status, **(body if isinstance(body, dict) else {})}
                    break
                except (NotSent, AnswerLost):
                    time.sleep(1.0)
            else:
                out[job_id] = {"http": None}
        return out

    def log_counts(self) -> tuple[dict[str, int], dict[str, int], dict[str, list[str]]]:
        completed: collections.Counter[str] = collections.Counter()
        written: collections.Counter[str] = collections.Counter()
        lines: dict[str, list[str]] = collections.defaultdict(list)
        for program in PROGRAMS:
            for line in self.system.log_text(program).splitlines():
                m = JOB_LINE.search(line)
                if not m:
                    continue
                job_id, text = m.groups()
                lines[job_id].append(f"{program}: {line.strip()[:300]}")
                if program == "broker" and text.startswith("completed: "):
                    completed[job_id] += 1
                if program == "muxer" and text.startswith("wrote "):
                    written[job_id] += 1
        return dict(completed), dict(written), lines

    def store_rows(self) -> dict[str, dict[str, Any]]:
        try:
            db = sqlite3.connect(f"file:{self.system.store_path}?mode=ro", uri=True, timeout=10)
            db.row_factory = sqlite3.Row
            rows = {r["id"]: dict(r) for r in db.execute("SELECT id, status, attempt, error, output_path FROM jobs")}
            db.close()
            return rows
        except sqlite3.Error as exc:
            return {"_error": {"status": str(exc)}}

    def report(self, start_rows: list[dict], end_rows: list[dict], killer_stopped_at: float,
               drain: dict[str, Any]) -> dict[str, Any]:
        finals = self.final_statuses()
        completed_lines, mp4_writes, lines = self.log_counts()
        store = self.store_rows()
        results_files = sorted(p.name for p in self.system.results_dir.iterdir()) \
            if self.system.results_dir.is_dir() else []

        by_status: collections.Counter[str] = collections.Counter()
        failed_codes: collections.Counter[str] = collections.Counter()
        unknown, not_final, latencies, server_latencies = [], [], [], []
        per_job: list[tuple[float, str, str, Any]] = []
        for job_id, body in finals.items():
            if body.get("http") == 404:
                unknown.append(job_id)
                continue
            status = body.get("status")
            by_status[str(status)] += 1
            if status not in FINAL:
                not_final.append(job_id)
                continue
            if status == "failed":
                failed_codes[str((body.get("error") or {}).get("code"))] += 1
            meta = body.get("metadata") or {}
            finished = meta.get("finished_at")
            sub = self.plan[self.jobs[job_id].submission]
            if finished and sub.job_ids[:1] == [job_id] and sub.first_attempt_at:
                latencies.append(finished - sub.first_attempt_at)
                per_job.append((finished - sub.first_attempt_at, job_id, status, meta.get("attempts")))
            if finished and meta.get("created_at"):
                server_latencies.append(finished - meta["created_at"])

        twice = {
            "broker_completed_lines": {j: n for j, n in completed_lines.items() if n > 1},
            "websocket_complete_events": {j: n for j, n in self.ws_complete.items() if n > 1},
        }
        mp4_of_not_completed = [f for f in results_files if f.endswith(".mp4") and f[:-4] not in self.warm_ids
                                and finals.get(f[:-4], {}).get("status") != "completed"]
        completed_without_mp4 = [j for j, b in finals.items() if b.get("status") == "completed"
                                 and f"{j}.mp4" not in results_files]
        other_files = [f for f in results_files if not f.endswith(".mp4")]
        completed_twice = sorted(set(twice["broker_completed_lines"]) | set(twice["websocket_complete_events"]))

        attempts = [a for s in self.plan for a in s.attempts]
        outcomes = collections.Counter(a["outcome"] for a in attempts)
        lost_answers = [
            (s, a) for s in self.plan for a in s.attempts if a["outcome"] in ("answer_lost", "error_answer")
        ]
        duplicates = {s.index: s.job_ids for s in self.plan if len(s.job_ids) > 1}
        created_behind_error = [s.index for s in self.plan if s.found_by_listing]
        submitted = [s for s in self.plan if s.job_ids]

        rss = self.rss_report(start_rows, end_rows)
        slowest = sorted(per_job, reverse=True)[:3]
        orphans = [f[:-4] for f in mp4_of_not_completed]
        problems = sorted(set(unknown) | set(not_final) | set(completed_twice) | set(completed_without_mp4)
                          | set(orphans)) + [j for _, j, _, _ in slowest]
        report: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "machine": {"cpus": os.cpu_count(), "load_average_at_end": round(os.getloadavg()[0], 2)},
            "elapsed_s": self.elapsed(),
            "killer_stopped_at_s": killer_stopped_at,
            "drain": drain,
            "submissions": {
                "planned": len(self.plan),
                "submitted": len(submitted),
                "never_accepted": {str(s.index): s.gave_up for s in self.plan if not s.job_ids},
                "by_model": dict(collections.Counter(f"{s.model}{'+image' if s.image_via else ''}" for s in submitted)),
                "attempt_outcomes": dict(outcomes),
                "answers_lost_or_5xx": len(lost_answers),
                "jobs_found_by_listing_after_a_lost_answer": len(created_behind_error),
                "duplicate_jobs": sum(len(v) - 1 for v in duplicates.values()),
                "duplicates": {str(k): v for k, v in duplicates.items()},
            },
            "jobs": len(self.jobs),
            "completed": by_status.get("completed", 0),
            "failed": by_status.get("failed", 0),
            "failed_by_code": dict(failed_codes),
            "cancelled": by_status.get("cancelled", 0),
            "cancels": {
                "planned": sum(1 for s in self.plan if s.cancel_after_s is not None and s.job_ids),
                "answered": dict(collections.Counter(
                    str(s.cancel.get("status")) if s.cancel else "not sent: the job was final before its time"
                    for s in self.plan if s.cancel_after_s is not None and s.job_ids)),
            },
            "lost": len(unknown) + len(not_final),
            "lost_unknown_to_server": unknown,
            "not_final_at_end": not_final,
            "completed_twice": len(completed_twice),
            "completed_twice_evidence": twice,
            "mp4_writes_more_than_once": {j: n for j, n in mp4_writes.items() if n > 1},
            "mp4_of_jobs_not_completed": mp4_of_not_completed,
            "completed_without_mp4": completed_without_mp4,
            "results_other_files": other_files,
            "store_status_counts": dict(collections.Counter(r["status"] for j, r in store.items()
                                                            if j not in self.warm_ids)),
            "store_jobs_unknown_to_the_client": sorted(set(store) - set(self.jobs) - self.warm_ids),
            "latency_s": {"submit_to_final": {"n": len(latencies), "p50": pct(latencies, 50), "p99": pct(latencies, 99),
                                              "max": pct(latencies, 100)},
                          "server_created_to_final": {"n": len(server_latencies), "p50": pct(server_latencies, 50),
                                                      "p99": pct(server_latencies, 99)}},
            "kills": {"signals_sent": sum(1 for k in self.kills if "pid" in k),
                      "by_program": dict(collections.Counter(f"{k['program']} {k['action']}" for k in self.kills
                                                             if "pid" in k)),
                      "skipped": sum(1 for k in self.kills if "skipped" in k),
                      "events": self.kills},
            "websocket": {"connects": self.ws_connects, "jobs_with_complete_event": len(self.ws_complete)},
            "rss": rss,
            "process_states_at_end": {r["program"]: r["state"] for r in end_rows},
            "slowest_jobs": [{"job_id": j, "submit_to_final_s": round(t, 2), "status": st, "attempts": a}
                             for t, j, st, a in slowest],
            "problem_job_logs": {j: lines.get(j, [])[-40:] for j in problems[:20]},
        }
        # Not targets, but what a run should not show either; the state folder is kept when any is there.
        report["findings"] = {k: v for k, v in {
            "mp4_of_jobs_not_completed": len(mp4_of_not_completed),
            "mp4_writes_more_than_once": len(report["mp4_writes_more_than_once"]),
            "duplicate_jobs": report["submissions"]["duplicate_jobs"],
            "jobs_created_behind_a_lost_answer": len(created_behind_error),
            "store_jobs_unknown_to_the_client": len(report["store_jobs_unknown_to_the_client"]),
            "results_other_files": len(other_files),
        }.items() if v}
        growth = [v["growth_pct"] for v in rss.values() if v.get("growth_pct") is not None]
        report["targets"] = {
            "lost_0": report["lost"] == 0,
            "completed_twice_0": report["completed_twice"] == 0,
            "every_job_final": not not_final and not unknown and drain["all_final"],
            "rss_growth_under_10pct": bool(growth) and max(growth) < 10.0,
            "submitted_all": len(submitted) == len(self.plan),
        }
        return report

    def rss_report(self, start_rows: list[dict], end_rows: list[dict]) -> dict[str, Any]:
        """Per program: RSS at the start (after the warm-up) and at the end (after the drain), and
        whether supervisord restarted it meanwhile (then the end is a younger process's RSS)."""
        spawns = self.system.spawns()
        start = {r["program"]: r for r in start_rows}
        out: dict[str, Any] = {}
        for end in sorted(end_rows, key=lambda r: r["program"]):
            name, first = end["program"], start.get(end["program"], {})
            seen = [r["rss_kib"] for r in self.samples if r["program"] == name and r["rss_kib"]]
            entry: dict[str, Any] = {
                "start": {"pid": first.get("pid"), "rss_mib": mib(first.get("rss_kib"))},
                "end": {"pid": end["pid"], "rss_mib": mib(end["rss_kib"])},
                "peak_seen_mib": mib(max(seen)) if seen else None,
                "spawns": spawns.get(name),
                "restarted": first.get("pid") != end["pid"] or (spawns.get(name) or 1) > 1,
            }
            if first.get("rss_kib") and end["rss_kib"]:
                entry["growth_pct"] = round(100.0 * (end["rss_kib"] / first["rss_kib"] - 1), 1)
            out[name] = entry
        return out


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def summary(r: dict[str, Any]) -> str:
    s = r["submissions"]
    lines = [
        (f"submissions {s['submitted']}/{s['planned']} accepted; {r['jobs']} jobs on the server "
         f"({s['duplicate_jobs']} duplicates of retried submits; {s['answers_lost_or_5xx']} answers lost or 5xx, "
         f"{s['jobs_found_by_listing_after_a_lost_answer']} of their jobs found by listing)"),
        f"completed {r['completed']}, failed {r['failed']} {r['failed_by_code']}, cancelled {r['cancelled']}",
        (f"lost {r['lost']} (unknown to the server {len(r['lost_unknown_to_server'])}, not final "
         f"{len(r['not_final_at_end'])}), completed twice {r['completed_twice']}, "
         f"MP4s of jobs not completed {len(r['mp4_of_jobs_not_completed'])}, completed without MP4 "
         f"{len(r['completed_without_mp4'])}"),
        (f"latency submit->final p50 {r['latency_s']['submit_to_final']['p50']} s, "
         f"p99 {r['latency_s']['submit_to_final']['p99']} s"),
        f"signals {r['kills']['signals_sent']} {r['kills']['by_program']}",
    ]
    for name, v in r["rss"].items():
        restarted = f", restarted ({v['spawns']} spawns)" if v["restarted"] else ""
        lines.append(f"  {name:12s} RSS {v['start']['rss_mib']} -> {v['end']['rss_mib']} MiB "
                     f"({v.get('growth_pct')}%; peak {v['peak_seen_mib']}){restarted}")
    lines.append(f"targets: {r['targets']}")
    lines.append(f"findings: {r['findings'] or 'none'}; slowest: {r['slowest_jobs']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="unfinished jobs at most at once (default 8)")
    parser.add_argument("--submit-every", type=float, default=1.0,
                        help="mean seconds between submissions (default 1; 0: as fast as --concurrency allows)")
    parser.add_argument("--kill-every", type=float, default=5.0, help="mean seconds between signals (default 5)")
    parser.add_argument("--kill-fraction", type=float, default=0.6, help="SIGKILL share; the rest SIGSTOP")
    parser.add_argument("--max-pause", type=float, default=8.0, help="longest SIGSTOP before SIGCONT, seconds")
    parser.add_argument("--max-kills", type=int, default=60, help="signals at most (default 60)")
    parser.add_argument("--kill-for", type=float, help="the killer stops after this many seconds (default: time limit)")
    parser.add_argument("--time-limit", type=float, default=1200.0,
                        help="seconds for submitting and killing, from readiness (default 1200)")
    parser.add_argument("--drain-s", type=float, default=300.0, help="then at most this long for every job to end")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "var" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    parser.add_argument("--keep", action="store_true", help="keep the state folder (kept anyway if a target fails)")
    args = parser.parse_args()

    state = short_tmpdir("wch-")
    system = Supervised(state, args.model_cache)
    print(f"state folder {state}, gateway {system.url}", flush=True)
    system.start()
    report: dict[str, Any] | None = None
    try:
        ready_s = system.wait_ready(timeout_s=900)
        print(f"ready after {ready_s:.1f} s", flush=True)
        soak = Soak(args, system)
        report = soak.run()
        report["ready_after_s"] = round(ready_s, 1)
    finally:
        system.stop()
        keep = args.keep or report is None or not all(report["targets"].values()) or bool(report["findings"])
        if keep:
            print(f"kept the state folder {state} (logs in {system.log_dir})", flush=True)
        else:
            shutil.rmtree(state, ignore_errors=True)
    report["state_folder"] = str(state) if keep else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(summary(report), flush=True)
    print(f"full report: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
