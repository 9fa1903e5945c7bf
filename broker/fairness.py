"""The order queued jobs are dispatched in: users take turns, so one user's batch cannot starve another's job.

Among the users (job owners) with queued jobs, the next job goes to the one with the fewest jobs
in flight, then the one served least recently; within one user, `priority` (high first) then
arrival. With one user (auth off) this is plain priority-then-arrival order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from broker.store import Job


def fair_order(queued: Iterable[Job], inflight: Mapping[str, int], last_served: Mapping[str, float]) -> list[Job]:
    """`queued` in priority-then-arrival order; `inflight` jobs per owner now; `last_served` the
    (monotonic) time each owner last had a job dispatched. Returns the order to dispatch in,
    assuming each job, once dispatched, counts as in flight for its owner."""
    lines: dict[str, deque[Job]] = {}
    for job in queued:
        lines.setdefault(job.owner, deque()).append(job)
    running = dict(inflight)
    served = dict(last_served)
    tick = max(served.values(), default=0.0)
    order: list[Job] = []
    while lines:
        owner = min(lines, key=lambda o: (running.get(o, 0), served.get(o, float("-inf")), lines[o][0].seq))
        order.append(lines[owner].popleft())
        if not lines[owner]:
            del lines[owner]
        running[owner] = running.get(owner, 0) + 1
        tick += 1.0
        served[owner] = tick
    return order
