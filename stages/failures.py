"""How a job's failure in a stage becomes the error its client sees.

The error in a `JobFailed` report travels to the broker and from there to the API, so it holds only
what we wrote: a code, a message naming the stage, and details without library text, file paths or
spool folders. The exception's own text goes to the stage's log, with the job id (`job_context`).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from common.errors import OutOfMemory, ServerError

log = logging.getLogger(__name__)


def stage_error(exc: BaseException, stage: str) -> ServerError:
    """The client-visible error for an exception that is not one of ours: the stage and the
    exception's type, never its text."""
    return ServerError(
        f"stage {stage} failed while running this job",
        {"stage": stage, "exception": type(exc).__name__},
        code="STAGE_ERROR",
    )


def error_body(exc: BaseException, stage: str) -> dict[str, Any]:
    """The `error` of the `JobFailed` report for `exc`."""
    if isinstance(exc, ServerError):
        return exc.to_dict()
    return stage_error(exc, stage).to_dict()


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure, whichever way torch reported it.

    On CUDA torch raises `torch.OutOfMemoryError`; the CPU allocator raises a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory ..."), and Python's own allocations MemoryError.
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def as_out_of_memory(exc: BaseException, stage: str, device: str) -> OutOfMemory | None:
    """The structured error for an allocation failure (None for any other exception). The
    allocator's own text (sizes, addresses) stays in the stage's log."""
    if not is_out_of_memory(exc):
        return None
    return OutOfMemory(
        f"{device} ran out of memory in stage {stage} while running this job; try a lower resolution or fewer frames",
        {"stage": stage, "device": device, "exception": type(exc).__name__},
    )


def free_memory(device: str) -> None:
    """After an allocation failure: collect what the failed job held and give cached blocks back."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        log.info("after freeing: %s allocated %.2f GiB, reserved %.2f GiB", device,
                 torch.cuda.memory_allocated(device) / 2**30, torch.cuda.memory_reserved(device) / 2**30)
