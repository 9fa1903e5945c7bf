"""torch.compile for a DiT stage's experts (`[stages.<dit>] compile = true`).

Regional compilation: diffusers' `compile_repeated_blocks` compiles the repeated transformer block
(`WanTransformer3DModel._repeated_blocks` = `WanTransformerBlock`) instead of the whole model. The
40 blocks of an expert share one compiled graph (their weights are graph inputs), so compiling
costs one block's trace, not forty; the published figure for Wan is the same speed as a whole-model
compile at an eighth of the compile time. The embeddings, the rotary table and the output head
(a few percent of the FLOPs) stay eager.

- Warm-up at startup. Before the stage reports ready (`stages/runtime.py` sets `ready` after
  `setup()`), every expert runs one pass at each size the profile's presets give its models (the
  sizes the blocks see are token counts: latent frames x latent height x width / patch), until no
  size compiles anything more; then one more pass per size under `fail_on_recompile`, which
  proves that size runs compiled, and one eager pass (`force_eager`) to measure the eager/compiled
  max |difference|. The compile time, the sizes, the graphs compiled and that difference are
  logged and sent in the stage's heartbeat (`compile`), which the broker shows in `/ready` and in
  each result's metadata (`compile`).
- Sizes (`compile_dynamic`). `true` (the default): the blocks compile with symbolic shapes
  (`dynamic=True`), so one or two graphs serve every token count, including sizes no preset
  names (custom_options.resolution / num_frames). `false`: one static graph per warmed size
  (what a whole-model benchmark compiles), and other sizes run eager.
- After warm-up nothing compiles again: the stance is `eager_on_recompile`, so a pass whose
  inputs or modules the warm-up did not see (a size outside the compiled graphs with
  `compile_dynamic = false`; a job with LoRAs, whose peft layers change the blocks; a job with a
  step cache, whose diffusers hooks wrap the blocks) runs its blocks eager: the exact path, never
  a compile stall inside a job, never a recompile loop. `graphs` in the heartbeat counts every
  graph the process compiled, so a test (or an operator) sees that no job compiled one.
- Cache (`compile_cache_dir`, default `<model_cache_dir>/torch-compile`): inductor's FX-graph and
  AOTAutograd caches live there (`TORCHINDUCTOR_CACHE_DIR`), shared by the stage processes, so a
  restarted stage loads its kernels instead of generating and compiling them again. Only
  `inductor` writes it; `aot_eager` and `eager` (cheap backends, for tests: no code generation,
  the same ATen ops as eager, so bit-identical frames) have nothing to keep.
- Works with `compute_dtype` (torchao's quantized Linear layers compile with the blocks); refused
  with `storage_dtype` (diffusers' layerwise-casting hooks on every Linear: not compiled here,
  refused at config load). S2V-14B's DiT (our own class) runs eager.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import Config, StageSpec
from common.errors import ModelLoadError
from stages.models import PipelineInfo

log = logging.getLogger(__name__)

BLOCK_CLASS = "WanTransformerBlock"
TEXT_TOKENS = 512  # the text encoder pads every prompt to max_sequence_length (WanPipeline's 512)
MIN_DYNAMIC_SIZES = 2  # warm a symbolic graph on at least this many token counts
RECOMPILE_LIMIT = 64  # graphs per code object during warm-up (torch's default 8 is too few for many sizes)


@dataclass(frozen=True)
class Size:
    """One latent size a stage's experts see: what the blocks see is `tokens`."""

    num_frames: int
    height: int
    width: int
    latent: tuple[int, int, int]  # latent frames, height, width

    @property
    def tokens(self) -> int:
        return math.prod(self.latent)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.num_frames}"


def size_of(info: PipelineInfo, num_frames: int, height: int, width: int) -> Size:
    p = info.patch_size
    latent = ((num_frames - 1) // info.vae_scale_temporal + 1,
              height // info.vae_scale_spatial // p[1], width // info.vae_scale_spatial // p[2])
    return Size(num_frames, height, width, latent)


def warmup_sizes(config: Config, model: str, info: PipelineInfo, dynamic: bool) -> list[Size]:
    """The sizes the stage warms up for `model`: one per token count its presets give (a preset's
    resolution turned to portrait has the same count), smallest first. With symbolic shapes, a
    profile whose presets give a single count adds the next allowed size, so the symbolic graph
    is compiled (and checked) at startup rather than by the first job of another size."""
    sizes: dict[int, Size] = {}
    for row in config.presets.get(model, {}).values():
        if "resolution" in row and "num_frames" in row:
            w, h = (int(x) for x in str(row["resolution"]).split("x"))
            size = size_of(info, int(row["num_frames"]), h, w)
            sizes.setdefault(size.tokens, size)
    if dynamic and len(sizes) < MIN_DYNAMIC_SIZES:
        spec = config.model(model)
        for res in spec.resolutions:
            w, h = (int(x) for x in res.split("x"))
            for frames in (5, 1 + 4 * ((spec.max_frames - 1) // 8)):
                size = size_of(info, frames, h, w)
                if size.tokens > 1:  # a size-1 dimension is specialised, not symbolic
                    sizes.setdefault(size.tokens, size)
            if len(sizes) >= MIN_DYNAMIC_SIZES:
                break
    return [sizes[k] for k in sorted(sizes)]


def graphs_compiled() -> int:
    """Graphs dynamo compiled in this process so far (every backend counts here)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cache_counts() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hits": int(inductor["fxgraph_cache_hit"]), "misses": int(inductor["fxgraph_cache_miss"])}


def configure_cache(folder: Path) -> Path:
    """Point inductor's persistent caches at `folder` (before anything compiles)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return folder


def check_backend(backend: str, stage: str) -> None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ModelLoadError(f"stage {stage}: compile_backend {backend!r} is not a torch.compile backend here",
                             {"stage": stage, "compile_backend": backend, "known": sorted(known)})


class CountingBackend:
    """A torch.compile backend: the named one (`inductor`, `aot_eager`, `eager`), with a count of
    the calls of the graphs it compiled, so the stage can tell that a job's blocks ran compiled
    (the count grows by blocks x passes) and did not fall back to eager. One per process: dynamo
    keeps a code object's graphs for one backend object."""

    def __init__(self, name: str) -> None:
        import torch._dynamo

        self.name = name
        self.compiler = torch._dynamo.lookup_backend(name)
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        compiled = self.compiler(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            return compiled(*args)

        return run


@contextmanager
def stance(name: str) -> Iterator[None]:
    with torch.compiler.set_stance(name):
        yield


@dataclass
class StageCompile:
    """The compiled experts of one DiT process: how they were compiled and what the warm-up measured."""

    stage: str
    backend: str
    dynamic: bool
    cache_dir: Path
    counter: CountingBackend
    compile_s: float = 0.0  # the passes that compiled (tracing + code generation + first run)
    warmup_s: float = 0.0  # the whole warm-up: compiling, checking, and the eager comparison
    max_abs_diff: float = 0.0  # eager vs compiled outputs over the warm-up passes
    sizes: dict[str, list[str]] = field(default_factory=dict)  # model -> sizes warmed
    graphs_at_ready: int = 0
    cache: dict[str, int] = field(default_factory=dict)
    # The batch sizes warmed: 1, and with [stages.<dit>] max_batch > 1 (stages/batching.py) also 2
    # (where symbolic shapes make the batch dimension dynamic) and max_batch, so batches run compiled.
    batches: tuple[int, ...] = (1,)

    @classmethod
    def for_spec(cls, config: Config, spec: StageSpec) -> StageCompile:
        check_backend(spec.compile_backend, spec.name)
        folder = Path(spec.compile_cache_dir) if spec.compile_cache_dir else config.model_cache_dir / "torch-compile"
        if not folder.is_absolute():
            folder = config.path(str(folder))
        batches = tuple(sorted({1, min(2, spec.max_batch), spec.max_batch}))
        return cls(spec.name, spec.compile_backend, spec.compile_dynamic, configure_cache(folder),
                   CountingBackend(spec.compile_backend), batches=batches)

    def compile(self, expert: torch.nn.Module) -> None:
        """Compile `expert`'s repeated blocks (in place; nothing runs until the warm-up)."""
        blocks = getattr(expert, "_repeated_blocks", None) or []
        if BLOCK_CLASS not in blocks or not hasattr(expert, "compile_repeated_blocks"):
            raise ModelLoadError(f"stage {self.stage}: the DiT has no repeated {BLOCK_CLASS} to compile",
                                 {"stage": self.stage, "repeated_blocks": list(blocks)})
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # No "duck sizing": a first size whose latent is as high as wide (or as long) would tie those
        # sizes together in the symbolic graph, and the first other size would compile a second one.
        fx_config.use_duck_shape = False
        model: Any = expert
        model.compile_repeated_blocks(backend=self.counter, dynamic=self.dynamic)

    def warm_up(self, models: dict[str, dict[str, Any]], sizes: dict[str, list[Size]],
                text_tokens: int = TEXT_TOKENS) -> None:
        """Run every expert of `models` at each of its `sizes` until nothing compiles, check each
        size runs compiled, and measure eager against compiled; then stop compiling for good."""
        started = time.monotonic()
        torch.compiler.set_stance("default")  # compiling again (a benchmark compiling a second model)
        before = graphs_compiled()
        for model, entry in models.items():
            info: PipelineInfo = entry["info"]
            self.sizes[model] = [str(s) for s in sizes[model]]
            for expert in entry["experts"].values():
                for size, batch in ((size, batch) for size in sizes[model] for batch in self.batches):
                    inputs = pass_inputs(expert, info, size, text_tokens, batch)
                    for _ in range(3):  # a new size may compile twice (a static graph, then a symbolic one)
                        count = graphs_compiled()
                        t0 = time.monotonic()
                        run_pass(expert, inputs)
                        if graphs_compiled() == count:
                            break
                        self.compile_s += time.monotonic() - t0
                    with stance("fail_on_recompile"):  # raises if this size would still compile
                        compiled = run_pass(expert, inputs)
                    with stance("force_eager"):
                        eager = run_pass(expert, inputs)
                    diff = float((compiled.float() - eager.float()).abs().max())
                    self.max_abs_diff = max(self.max_abs_diff, diff)
                    log.info("compile: %s at %s (%d tokens), batch %d: max |eager - compiled| %.3g", model, size,
                             size.tokens, batch, diff)
        torch.compiler.set_stance("eager_on_recompile")  # from here on, nothing compiles
        self.warmup_s = time.monotonic() - started
        self.graphs_at_ready = graphs_compiled()
        self.cache = cache_counts()
        log.info("compile: warmed up in %.1f s (%.1f s compiling; %d graphs, backend %s, %s shapes; inductor cache "
                 "%d hits, %d misses in %s); max |eager - compiled| %.3g over %s", self.warmup_s, self.compile_s,
                 self.graphs_at_ready - before, self.backend, "symbolic" if self.dynamic else "static",
                 self.cache["hits"], self.cache["misses"], self.cache_dir, self.max_abs_diff,
                 "; ".join(f"{m} {', '.join(s)}" for m, s in self.sizes.items()))

    def report(self) -> dict[str, Any]:
        """What the heartbeat carries (`compile`)."""
        return {"backend": self.backend, "dynamic": self.dynamic, "batches": list(self.batches),
                "compile_s": round(self.compile_s, 3),
                "warmup_s": round(self.warmup_s, 3), "max_abs_diff": self.max_abs_diff,
                "graphs": graphs_compiled(), "graphs_at_ready": self.graphs_at_ready, "sizes": self.sizes,
                "compiled_calls": self.counter.calls,
                "cache_hits": self.cache.get("hits", 0), "cache_misses": self.cache.get("misses", 0)}


def pass_inputs(expert: torch.nn.Module, info: PipelineInfo, size: Size,
                text_tokens: int = TEXT_TOKENS, batch: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs of one DiT pass at `size` for `batch` jobs, shaped as the DiT stage (or a
    batch of stages/batching.py) builds them (seeded)."""
    cfg: Any = expert.config
    model: Any = expert
    device, dtype = model.device, model.dtype  # a diffusers model's, as the DiT stage reads them
    g = torch.Generator().manual_seed(size.tokens)
    f, h, w = size.latent
    p = info.patch_size
    latents = torch.randn(batch, cfg.in_channels, f * p[0], h * p[1], w * p[2], generator=g)
    text = torch.randn(batch, text_tokens, cfg.text_dim, generator=g)
    t = torch.tensor(500.0)
    timestep = torch.full((batch, size.tokens), 500.0) if info.expand_timesteps else t.expand(batch)
    return {"hidden_states": latents.to(device, dtype), "timestep": timestep.to(device),
            "encoder_hidden_states": text.to(device, dtype)}


@torch.no_grad()
def run_pass(expert: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out: torch.Tensor = expert(**inputs, return_dict=False)[0]
    return out


def compile_stage(config: Config, spec: StageSpec, models: dict[str, dict[str, Any]]) -> StageCompile:
    """Compile and warm up the experts of `models` (the DiT stage's `models`) as `spec` says."""
    compiler = StageCompile.for_spec(config, spec)
    for entry in models.values():
        for expert in entry["experts"].values():
            compiler.compile(expert)
    compiler.warm_up(models, {model: warmup_sizes(config, model, entry["info"], compiler.dynamic)
                              for model, entry in models.items()})
    return compiler

