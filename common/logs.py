"""Log lines in the project's format: `[2025-01-11 10:30:45] [INFO] [module.function] message`.

The job being handled is kept in a context variable; every line logged while it is set carries
`job=<id>` so a job can be followed through the logs of every process with one grep.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job", default=None)

LOG_FORMAT = "[%(asctime)s] [%(levelname)s] [%(module)s.%(funcName)s] %(job_prefix)s%(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _JobFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job = getattr(record, "job_id", None) or _current_job.get()
        record.job_prefix = f"job={job} " if job else ""
        return True


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_wan_server", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._wan_server = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_JobFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO about things we already log.
    for name in ("diffusers", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    token = _current_job.set(job_id)
    try:
        yield
    finally:
        _current_job.reset(token)
