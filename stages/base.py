"""The base of every stage, and the context a stage is handed by whoever runs it.

A stage is a class with `setup()` (load models) and `handle(message) -> messages`. What it needs
from its surroundings while it handles a job (sending a progress report, asking whether the job
was cancelled or the process is stopping, a point where tests inject a delay) comes through its
`StageContext`. The runtime (`stages/runtime.py`) hands it one backed by sockets and signals; the
default context, for in-process use (tests, replay, benchmarks), sends nothing and never cancels.
"""

from __future__ import annotations

from typing import Any, ClassVar

from common import messages as m
from common.config import Config, StageSpec
from common.errors import JobCancelled, StageStopping
from stages.placement import Placement


class StageContext:
    """What a stage may ask of whoever runs it. This one is for in-process use: reports go nowhere,
    no job is ever cancelled, the process never stops, and fault points do nothing."""

    def emit(self, report: m.Message) -> None:
        """Send a side report (a step's progress) while a job is handled."""

    def cancelled(self, job_id: str) -> bool:
        """True once `job_id` was cancelled."""
        return False

    def stopping(self) -> bool:
        """True once the process was asked to stop."""
        return False

    def fault_point(self, name: str) -> None:
        """A place where tests inject a delay or a hang."""


class Stage:
    """Base of every stage. Subclasses set `kind` and implement `setup` and `handle`; stages that
    compute on a device set `placement` in `setup`."""

    kind: ClassVar[str] = ""

    def __init__(self, config: Config, spec: StageSpec, context: StageContext | None = None):
        self.config = config
        self.spec = spec
        self.name = spec.name
        self.context = context if context is not None else StageContext()
        self.ready = False
        # Where the stage's models live (device, dtypes, weights); None until setup() places them.
        self.placement: Placement | None = None

    def setup(self) -> None:
        """Load models. Called once before the first message."""

    def handle(self, msg: m.Message) -> list[m.Message]:
        raise NotImplementedError

    def batch_key(self, msg: m.Message) -> Any:
        """What a message must share with others to be handled in one batch with them
        (`handle_batch`); None: it is handled alone. Stages that do not batch keep this."""
        return None

    def handle_batch(self, msgs: list[m.Message]) -> list[list[m.Message] | Exception]:
        """Handle messages of one `batch_key` together: per message, what `handle` would have
        returned, or the exception that failed it (that job only)."""
        out: list[list[m.Message] | Exception] = []
        for msg in msgs:
            try:
                out.append(self.handle(msg))
            except Exception as exc:  # noqa: BLE001 - one job's failure
                out.append(exc)
        return out

    def memory(self) -> dict[str, Any]:
        """Heartbeat memory fields (see `Heartbeat`), once set up; none for a stage without a device."""
        return self.placement.memory() if self.placement is not None and self.ready else {}

    def device_name(self) -> str:
        """The device this stage computes on (for error details)."""
        return str(self.placement.device) if self.placement is not None else self.spec.device

    def emit(self, report: m.Message) -> None:
        self.context.emit(report)

    def fault_point(self, name: str) -> None:
        self.context.fault_point(name)

    def check_cancelled(self, job_id: str) -> None:
        """Called between steps of long work: stops a cancelled job there, or any job when stopping."""
        if self.context.cancelled(job_id):
            raise JobCancelled(f"job {job_id} was cancelled", {"job_id": job_id})
        if self.context.stopping():
            raise StageStopping(f"{self.name} is stopping", {"stage": self.name})
