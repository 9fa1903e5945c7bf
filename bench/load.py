"""Load on the running system: status polling, submissions beyond capacity, 500 WebSocket subscribers.

A bounded asyncio client (httpx for HTTP/1.1 keep-alive, websockets for /ws), loopback only. By
default it starts its own system (supervisord with the repo's programs, tiny profile, a private
state folder, a small queue bound so "beyond capacity" is reachable); `--url` points it at one that
is already running instead (then `--gateway-pid` lets it read the gateway's memory).

1. Polling: `--poll-rate` GET /api/v1/status/{id} a second, spread over `--pollers` connections,
   for `--poll-seconds` while `--jobs` jobs run. Latency p50/p99 and the error rate.
2. Beyond capacity: `--burst` submissions at once against a queue bound of `--max-queued`. Every
   answer must be 202 or an immediate 429/503; every accepted job must complete, once.
3. WebSocket: `--subscribers` clients connect and subscribe to all jobs; then jobs run. Connect
   time p50/p99, and each event's lag: when a subscriber got it, after the first subscriber did
   (the fan-out spread), p50/p99 over all deliveries. Gateway RSS before and after.

    .venv/bin/python bench/load.py [--subscribers 500] [--out bench/results/load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def pct_ms(values: list[float], q: float) -> float | None:
    p = pct(values, q)
    return None if p is None else round(1000 * p, 2)


def ms(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50_ms": pct_ms(values, 50),
        "p99_ms": pct_ms(values, 99),
        "max_ms": None if not values else round(1000 * max(values), 2),
    }


def rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def submit(client: httpx.AsyncClient, prompt: str, **extra) -> httpx.Response:
    body = {"prompt": prompt, "model": "t2v", "quality_preset": "draft", **extra}
    return await client.post("/api/v1/generate", json=body)


async def wait_final(client: httpx.AsyncClient, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    final: dict[str, str] = {}
    while time.monotonic() < deadline and len(final) < len(job_ids):
        for job_id in job_ids:
            if job_id in final:
                continue
            r = await client.get(f"/api/v1/status/{job_id}")
            if r.status_code == 200 and r.json()["status"] in ("completed", "failed", "cancelled"):
                final[job_id] = r.json()["status"]
        await asyncio.sleep(0.5)
    return final


async def polling(url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        jobs = [(await submit(client, f"poll load {i}")).json()["job_id"] for i in range(args.jobs)]
        latencies: list[float] = []
        errors = 0
        interval = args.pollers / args.poll_rate  # each poller's period
        stop_at = time.monotonic() + args.poll_seconds

        async def poller(index: int) -> None:
            nonlocal errors
            async with httpx.AsyncClient(base_url=url, timeout=30) as own:
                next_at = time.monotonic() + index * interval / args.pollers
                while next_at < stop_at:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    start = time.perf_counter()
                    try:
                        r = await own.get(f"/api/v1/status/{jobs[index % len(jobs)]}")
                        ok = r.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    latencies.append(time.perf_counter() - start)
                    errors += not ok
                    next_at += interval  # fixed rate: a slow answer does not lower the offered load

        t0 = time.perf_counter()
        await asyncio.gather(*(poller(i) for i in range(args.pollers)))
        elapsed = time.perf_counter() - t0
        final = await wait_final(client, jobs, timeout_s=600)
    return {
        "offered_rate_per_s": args.poll_rate,
        "achieved_rate_per_s": round(len(latencies) / elapsed, 1),
        "requests": len(latencies),
        "errors": errors,
        "error_rate": round(errors / max(1, len(latencies)), 4),
        "latency": ms(latencies),
        "jobs_running_meanwhile": args.jobs,
        "jobs_completed": sum(1 for s in final.values() if s == "completed"),
    }


async def burst(url: str, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30,
                                 limits=httpx.Limits(max_connections=args.burst)) as client:
        timed: list[tuple[float, httpx.Response]] = []

        async def one(i: int) -> None:
            start = time.perf_counter()
            r = await submit(client, f"burst {i}")
            timed.append((time.perf_counter() - start, r))

        await asyncio.gather(*(one(i) for i in range(args.burst)))
        accepted = [r.json()["job_id"] for _, r in timed if r.status_code == 202]
        refused = [(t, r) for t, r in timed if r.status_code in (429, 503)]
        other = [r.status_code for _, r in timed if r.status_code not in (202, 429, 503)]
        final = await wait_final(client, accepted, timeout_s=900)
        listing = (await client.get("/api/v1/jobs", params={"limit": 100})).json()
    completed = [j for j, s in final.items() if s == "completed"]
    return {
        "submitted": args.burst,
        "accepted": len(accepted),
        "refused_429_503": len(refused),
        "other_statuses": other,
        "refusal_latency": ms([t for t, _ in refused]),
        "retry_after_headers": sorted({r.headers.get("retry-after") for _, r in refused}),
        "accepted_completed": len(completed),
        "accepted_not_completed": len(accepted) - len(completed),
        "listed_total_jobs": listing.get("total"),
    }


async def websockets_load(url: str, args, gateway_pid: int | None) -> dict:
    ws_url = url.replace("http://", "ws://") + "/ws"
    rss_before = rss_mib(gateway_pid)
    connect_times: list[float] = []
    received: list[list[tuple[float, str]]] = []

    async def subscriber(index: int, ready: asyncio.Event, done: asyncio.Event) -> None:
        got: list[tuple[float, str]] = []
        received.append(got)
        start = time.perf_counter()
        async with websockets.connect(ws_url, open_timeout=60, max_queue=None) as ws:
            await ws.send(json.dumps({"action": "subscribe", "all": True}))
            connect_times.append(time.perf_counter() - start)
            ready.set()
            while not done.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout=0.5)
                except TimeoutError:
                    continue
                event = json.loads(raw)
                if event.get("event") in ("progress", "complete", "status"):
                    key = f"{event['job_id']}:{event['event']}:{event.get('progress')}:{event.get('status')}"
                    got.append((time.perf_counter(), key))

    done = asyncio.Event()
    readies = [asyncio.Event() for _ in range(args.subscribers)]
    t0 = time.perf_counter()
    tasks = []
    for i in range(args.subscribers):  # connect in waves of 50, as many clients arriving at once would
        tasks.append(asyncio.create_task(subscriber(i, readies[i], done)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=300)
    all_connected_s = time.perf_counter() - t0
    rss_connected = rss_mib(gateway_pid)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        jobs = [(await submit(client, f"ws load {i}")).json()["job_id"] for i in range(args.ws_jobs)]
        final = await wait_final(client, jobs, timeout_s=600)
    await asyncio.sleep(2.0)  # let the last events reach everyone
    rss_after = rss_mib(gateway_pid)
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    first: dict[str, float] = {}
    for got in received:
        for at, key in got:
            first[key] = min(first.get(key, at), at)
    lags = [at - first[key] for got in received for at, key in got]
    per_sub = [len(got) for got in received]
    return {
        "subscribers": args.subscribers,
        "all_connected_s": round(all_connected_s, 2),
        "connect_and_subscribe": ms(connect_times),
        "events_distinct": len(first),
        "deliveries": len(lags),
        "deliveries_per_subscriber_min_max": [min(per_sub), max(per_sub)] if per_sub else None,
        "event_lag_behind_first_subscriber": ms(lags),
        "jobs": args.ws_jobs,
        "jobs_completed": sum(1 for s in final.values() if s == "completed"),
        "gateway_rss_mib": {"before": rss_before, "with_subscribers": rss_connected, "after_events": rss_after},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running gateway (default: start a private system)")
    parser.add_argument("--gateway-pid", type=int, help="with --url: the gateway's pid, to read its memory")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "var" / "models")
    parser.add_argument("--poll-rate", type=float, default=100.0)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--poll-seconds", type=float, default=20.0)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--burst", type=int, default=60)
    parser.add_argument("--max-queued", type=int, default=20, help="queue bound of the private system")
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--ws-jobs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = parser.parse_args()

    system = None
    if args.url:
        url, gateway_pid = args.url.rstrip("/"), args.gateway_pid
    else:
        from tests.helpers import System, short_tmpdir

        state = short_tmpdir("wsl-")
        system = System(state, args.model_cache)
        system.env["WAN_SERVER__ADMISSION__MAX_QUEUED"] = str(args.max_queued)
        system.start()
        system.wait_ready(timeout_s=600)
        url, gateway_pid = system.url, system.pid("gateway")
    try:
        results = {
            "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
            "polling": asyncio.run(polling(url, args)),
            "beyond_capacity": asyncio.run(burst(url, args)),
            "websocket": asyncio.run(websockets_load(url, args, gateway_pid)),
        }
    finally:
        if system is not None:
            system.stop()
            shutil.rmtree(system.state_dir, ignore_errors=True)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
