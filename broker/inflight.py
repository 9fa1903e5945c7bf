"""What the broker knows, in memory, about jobs in flight and the stages that hold them.

The store (broker/store.py) is the truth about each job's state; this is the bookkeeping around
it that does not survive a broker restart and need not (after a restart every job that was
processing is dispatched again, see broker/dispatch.py):

- one `JobInFlight` per dispatched job: where it is along its route, which process holds it, when
  it last made progress (for the watchdog), and when each stage accepted it (for timings);
- one `StageSeen` per stage that sends heartbeats: its last heartbeat and when it arrived.

Forgetting a job is dropping its record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from common import messages as m


@dataclass
class JobInFlight:
    """One attempt of a job, from dispatch until it ends or is lost."""

    job_id: str
    attempt: int
    route: list[str]
    # Where the job is: the stage holding it, or the stage it was forwarded to; for an S2V job,
    # in which clip (the route's DiT..VAE part runs once per clip).
    stage: str
    # The process of `stage` that holds it; None while that stage is down (the job is in transit to
    # whichever process comes up next). A job whose process dies is lost with it.
    pid: int | None
    # The stage the watchdog holds to account for progress, and when it last reported some
    # (monotonic); None until a stage accepts the job, and after it forwards it.
    watched: str | None = None
    progressed_at: float = 0.0
    # stage -> when (wall clock) it accepted the job; popped when the stage is done with it.
    started: dict[str, float] = field(default_factory=dict)
    clip: int = 0

    def position(self, stage: str, clip: int = 0) -> tuple[int, int]:
        """Where `stage` of clip `clip` lies along the job's way: clips first, then the route."""
        return clip, self.route.index(stage)

    def move_to(self, stage: str, pid: int | None, clip: int = 0) -> bool:
        """Move the job to `stage` (of clip `clip`) when that is not behind where it is: reports of
        two stage processes arrive out of order, and a late one must not move the job back along
        its route, nor back to an earlier clip (an S2V job goes round the route's DiT..VAE part
        once per clip)."""
        if stage not in self.route or self.position(stage, clip) < self.position(self.stage, self.clip):
            return False
        self.stage, self.pid, self.clip = stage, pid, clip
        return True

    def progressed(self, stage: str, now: float) -> None:
        self.watched, self.progressed_at = stage, now


@dataclass
class StageSeen:
    """The latest heartbeat of one stage and when it arrived (monotonic)."""

    beat: m.Heartbeat
    seen: float

    @property
    def pid(self) -> int:
        return self.beat.pid


class InFlight:
    """The records, by job id and by stage name."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobInFlight] = {}
        self.stages: dict[str, StageSeen] = {}
        self.killed: set[tuple[int, int]] = set()  # (pid, start ticks) of processes the watchdog killed

    def pid_of(self, stage: str) -> int | None:
        """The pid of the process that now serves `stage`; None while it is down or not yet seen."""
        seen = self.stages.get(stage)
        return None if seen is None else seen.pid

    def dispatched(self, job_id: str, attempt: int, route: list[str], stage: str) -> JobInFlight:
        record = JobInFlight(job_id, attempt, list(route), stage, self.pid_of(stage))
        self.jobs[job_id] = record
        return record

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def held_by(self, stage: str, dead: Callable[[int | None], bool]) -> list[str]:
        """Jobs at `stage` whose holding process (by pid) `dead` says is gone."""
        return [j.job_id for j in self.jobs.values() if j.stage == stage and dead(j.pid)]

    def heartbeats(self) -> dict[str, m.Heartbeat]:
        return {stage: seen.beat for stage, seen in self.stages.items()}
