"""Timing on a device: synchronised clocks, peak memory, a time budget, and measurements that
record their error instead of ending the run."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

START = time.perf_counter()  # the budget counts from the first import, i.e. from the start of the run


class Env:
    def __init__(self, device: str, budget_s: float):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.deadline = START + budget_s

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def alloc_gib(self) -> float | None:
        return round(torch.cuda.memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def elapsed() -> str:
    return f"[{time.perf_counter() - START:6.1f}s]"


def say(*args: Any) -> None:
    print(elapsed(), *args, flush=True)


def r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(env: Env, fn: Callable[[], Any], reps: int) -> dict[str, Any]:
    """Median wall time of `fn` over `reps` calls (device synchronised), and the peak memory."""
    times = []
    env.reset_peak()
    for _ in range(reps):
        t0 = env.now()
        out = fn()
        times.append(env.now() - t0)
        del out
    return {"median_s": r4(med(times)), "all_s": [r4(t) for t in times], "peak_gib": env.peak_gib()}


def reps_that_fit(env: Env, one_s: float | None, reps: int, reserve_s: float = 40.0) -> int:
    """`reps`, or fewer (at least 1) when `reps` + a warm-up of a call taking `one_s` would run past
    the budget less `reserve_s` (so a pathologically slow card still finishes)."""
    if not one_s:
        return reps
    return max(1, min(reps, int((env.left_s() - reserve_s) / one_s) - 1))


def sub(out: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """One measurement inside a section: an error is recorded and the section goes on."""
    try:
        out[key] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and carries on
        traceback.print_exc()
        traceback.clear_frames(exc.__traceback__)
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """max |a - b| (in float64, on the CPU) and where the two disagree; shapes must match."""
    if tuple(a.shape) != tuple(b.shape):
        return {"error": f"shapes differ: {list(a.shape)} vs {list(b.shape)}"}
    x, y = a.detach().cpu().double(), b.detach().cpu().double()
    d = (x - y).abs()
    finite = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
    return {"max_abs_diff": float(d.max()) if d.numel() else 0.0,
            "mean_abs_diff": float(d.mean()) if d.numel() else 0.0,
            "max_abs_ref": float(y.abs().max()) if y.numel() else 0.0, "identical": bool(torch.equal(x, y)),
            "all_finite": finite, "shape": list(a.shape)}
