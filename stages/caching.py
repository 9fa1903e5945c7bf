"""Step caching in a DiT process: diffusers' cache hooks on the experts this process owns.

A job's `params.cache` (admission normalised it from `custom_options.cache` or its preset: see
common/catalog.py CACHE_FIELDS) names a method; the DiT stage asks `StepCache.start` to set the
hooks of the job's experts to it before the first step, and `finish` after the last:

- `first_block`: diffusers' First Block Cache (`FirstBlockCacheConfig(threshold)`). Every pass runs
  the first transformer block; when its residual changed by less than `threshold` (relative
  absmean) since the last full pass, the other blocks are skipped and their cached residual added.
- `taylorseer`: diffusers' TaylorSeer in its lite mode (`TaylorSeerCacheConfig(use_lite_mode=True)`):
  a full pass every `interval` passes after `warmup` full ones; in between the blocks are skipped
  and the output projection is predicted by a first-order Taylor expansion (factors in float32).
  Lite mode because the default patterns hook nothing in Wan's blocks (their attentions are
  `attn1`/`attn2`), and caching every block's output would hold two tensors of the whole token
  sequence per block and per guidance branch (tens of GiB for an A14B expert at 480p).
- `mag` (MagCache) is refused at admission: it skips by magnitude ratios calibrated for the weights
  and the step count (a calibration run per expert), and no profile carries calibrated ratios.

The hooks keep their state per expert and per guidance branch (`cache_context("cond")` /
`("uncond")`, as WanPipeline names them). `start` resets that state for every job, so nothing of
one job's cache reaches the next; an expert whose job asks for no cache has no hooks at all (the
exact path is unchanged). Each DiT process owns its experts, so for the two-expert models (A14B)
the cache of each expert lives where diffusers' WanPipeline keeps it, and the frames equal
WanPipeline's with the same hook on both experts. A one-expert model (TI2V-5B) split across two
processes starts its cache afresh in the second one (its first pass there is computed in full),
where WanPipeline would carry it over: a cached TI2V-5B job split in two is not WanPipeline's.

`finish` returns a `cache` StageReport (step = passes skipped, total_steps = passes run, to = the
method); the broker records it in the job's timings and the result's metadata (broker/progress.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook

from common import messages as m
from common.errors import InvalidRequest

log = logging.getLogger(__name__)

METHODS = ("first_block", "taylorseer")


def hook_config(cache: dict[str, Any]) -> FirstBlockCacheConfig | TaylorSeerCacheConfig:
    """The diffusers config a job's cache option stands for."""
    method = cache.get("method")
    if method == "first_block":
        return FirstBlockCacheConfig(threshold=float(cache["threshold"]))
    if method == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(cache["interval"]),
                                     disable_cache_before_step=int(cache["warmup"]),
                                     taylor_factors_dtype=torch.float32, use_lite_mode=True)
    raise InvalidRequest(f"cache method {str(method)[:32]!r} is not served by the DiT stages",
                         {"field": "cache.method", "allowed": list(METHODS)})


def _skip_probe(model: torch.nn.Module) -> Callable[[str], bool]:
    """A function telling whether the last pass of branch `name` through `model` was skipped, read
    from the state of the hook that decides it (First Block Cache's head-block hook; TaylorSeer's
    hook on the output projection, the one that predicts)."""
    for module_name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, FBCHeadBlockHook):
                states = hook.state_manager._state_cache
                return lambda name: not states[name].should_compute if name in states else False
            if isinstance(hook, TaylorSeerCacheHook) and module_name == "proj_out":
                states = hook.state_manager._state_cache

                def predicted(name: str, states: dict[str, Any] = states) -> bool:
                    state = states.get(name)
                    return state is not None and state.last_update_step != state.current_step

                return predicted
    return lambda name: False


class StepCache:
    """The cache hooks of one DiT process's experts, set and reset for each job, and its counts."""

    def __init__(self) -> None:
        self.applied: dict[int, tuple[tuple[str, Any], ...] | None] = {}  # id(expert) -> the cache its hooks are
        self.probes: dict[int, Callable[[str], bool]] = {}
        self.cache: dict[str, Any] | None = None
        self.passes = 0
        self.skipped = 0

    def start(self, experts: Iterable[Any], cache: dict[str, Any] | None) -> None:
        """Hook `experts` for `cache` (None: no hooks) with fresh state; zero the counts."""
        key = None if cache is None else tuple(sorted(cache.items()))
        if cache is not None:
            hook_config(cache)  # refuses an unknown method before any hook changes
        for expert in experts:
            if self.applied.get(id(expert), None) != key or expert.is_cache_enabled != (key is not None):
                if expert.is_cache_enabled:
                    expert.disable_cache()
                if cache is not None:
                    expert.enable_cache(hook_config(cache))
                self.applied[id(expert)] = key
                self.probes[id(expert)] = _skip_probe(expert)
            if expert.is_cache_enabled:
                expert._reset_stateful_cache()
        self.cache = cache
        self.passes = self.skipped = 0

    @contextmanager
    def context(self, model: Any, name: str, **kwargs: Any) -> Iterator[None]:
        """`model.cache_context(name, **kwargs)` around one pass, counting it (and whether it was skipped)."""
        with model.cache_context(name, **kwargs):
            yield
        self.passes += 1
        probe = self.probes.get(id(model))
        if self.cache is not None and probe is not None and probe(name):
            self.skipped += 1

    def finish(self, experts: Iterable[Any], job_id: str, attempt: int, stage: str) -> m.StageReport | None:
        """Drop the job's cached tensors; the `cache` report of a cached job (None without a cache)."""
        for expert in experts:
            if expert.is_cache_enabled:
                expert._reset_stateful_cache()
        if self.cache is None:
            return None
        log.info("%s cache: %d of %d passes skipped", self.cache["method"], self.skipped, self.passes)
        return m.StageReport(job_id, attempt, stage, "cache", self.skipped, self.passes, time.time(),
                             to=self.cache["method"])


def for_stage(stage: Any) -> StepCache:
    """The stage's StepCache, made on first use (a benchmark may build a DiT stage without setup())."""
    cache: StepCache | None = getattr(stage, "_step_cache", None)
    if cache is None:
        cache = stage._step_cache = StepCache()
    return cache
