"""torch.compile in a DiT stage (`[stages.<dit>] compile = true`, stages/compilation.py) through the
real stage processes. The stack is conftest's `int8_stack` (shared with test_compute: one start):
int8 compute on both DiTs, and dit_high compiling its expert's repeated block with the `aot_eager`
backend: dynamo's graph, functionalised and decomposed by AOTAutograd, run as the same ATen ops as
eager, so the frames are bit-identical to diffusers' WanPipeline quantized the same way. (Inductor's
generated kernels reorder float sums: measured on the tiny model at 7e-7 max |difference| per pass;
and they would cost this 2-core machine about 44 s of compiling per process cold, 11-13 s from the
cache.) The warm-up runs before the stage reports ready; a job then runs its blocks compiled (the
compiled graph's call count grows by blocks x passes) and compiles nothing, at a size no preset
names too; a job with a step cache compiles nothing either and equals WanPipeline with the same
hook. In process: LoRAs switched on a compiled expert give the eager expert's outputs (their
blocks run eager); inductor's cache folder is written and read back; an unknown backend and
compile beside storage_dtype are refused at config load."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from broker.api import compile_metadata
from broker.driver import default_params
from common import messages as m
from common.config import Config
from common.errors import ConfigError
from stages import compilation
from stages.models import PipelineInfo, model_dir
from stages.vae import to_uint8
from tests.helpers import StageStack, reference, vae_frames, wait_for
from tests.test_caching import FIRST_BLOCK, hook
from tests.test_compute import quantize_blocks

LAYERS = 2  # the tiny experts' transformer blocks


def fresh_beat(stack: StageStack, after: float) -> m.Heartbeat:
    """dit_high's first heartbeat sent after `after` (time.time())."""
    def beat() -> m.Heartbeat | None:
        stack.driver._poll(0.2)
        hb = stack.driver.heartbeats.get("dit_high")
        return hb if hb is not None and hb.at > after else None

    return wait_for(beat, 10, "a fresh dit_high heartbeat")


def high_passes(reports: list[m.StageReport], guidance: float) -> int:
    steps = sum(1 for r in reports if r.stage == "dit_high" and r.event == "step")
    return steps * (2 if guidance > 1.0 else 1)


def int8_reference(folder: Path, p: m.JobParams) -> np.ndarray:
    """WanPipeline's frames with both experts int8-quantized as the stages are (and `p.cache`'s hook)."""
    def prepare(pipe: Any) -> None:
        for expert in (pipe.transformer, pipe.transformer_2):
            quantize_blocks(expert)
            if p.cache is not None:
                expert.enable_cache(hook(p.cache))

    if p.cache is None:
        return reference(folder, p, prepare=prepare)
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prepare(pipe)
    out = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=p.height, width=p.width,
               num_frames=p.num_frames, num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
               guidance_scale_2=p.guidance_scale_2, generator=torch.Generator().manual_seed(p.seed),
               output_type="np").frames
    frames: np.ndarray = to_uint8(out)[0]
    return frames


def test_a_compiled_job_equals_wanpipeline_and_compiles_nothing(int8_stack):
    stack = int8_stack
    warm = fresh_beat(stack, 0).compile
    assert warm["backend"] == "aot_eager" and warm["dynamic"] is True
    # Warmed at every size the t2v-A14B presets give, before `ready`, with one symbolic graph.
    sizes = {f"{r['resolution']}x{r['num_frames']}" for r in stack.config.presets["t2v-A14B"].values()}
    assert set(warm["sizes"]["t2v-A14B"]) == sizes
    assert warm["graphs"] == warm["graphs_at_ready"] >= 1 and warm["compiled_calls"] > 0
    assert warm["max_abs_diff"] == 0.0 and warm["compile_s"] > 0
    log = stack.log("dit_high")
    assert log.index("compile: warmed up in") < log.index("dit_high ready in")

    # A size no preset names (48x48, 13 frames): the symbolic graph serves it too.
    p = default_params(stack.config, "t2v-A14B", prompt="a lantern on a pier", negative_prompt="", seed=41,
                       steps=4, height=48, width=48, num_frames=13, guidance_scale=4.0, guidance_scale_2=3.0)
    outcome = stack.driver.run(p, timeout_s=300)
    after = fresh_beat(stack, time.time()).compile
    assert after["graphs"] == warm["graphs"]  # nothing compiled during the job
    # ... and its blocks ran compiled: each pass of the high part called the graph once per block.
    passes = high_passes(outcome.reports, p.guidance_scale)
    assert passes > 0 and after["compiled_calls"] - warm["compiled_calls"] == LAYERS * passes
    ours = vae_frames(stack, outcome.done.job_id)
    exact = int8_reference(model_dir(stack.config, p.model), p)
    assert ours.std() > 1.0 and np.array_equal(ours, exact), f"max |diff| {np.abs(ours.astype(int) - exact).max()}"


def test_a_cached_job_on_a_compiled_stage_compiles_nothing_and_equals_wanpipeline(int8_stack):
    """diffusers' cache hooks wrap the blocks the warm-up compiled: where dynamo's guards no longer
    hold, the stage runs them eager instead of compiling inside the job; the frames are
    WanPipeline's with the same hook."""
    stack = int8_stack
    before = fresh_beat(stack, 0).compile
    p = default_params(stack.config, "t2v-A14B", prompt="a kite over dunes", negative_prompt="", seed=42, steps=4,
                       height=32, width=32, num_frames=5, guidance_scale=4.0, guidance_scale_2=3.0,
                       cache=dict(FIRST_BLOCK))
    done = stack.driver.run(p, timeout_s=300).done
    assert fresh_beat(stack, time.time()).compile["graphs"] == before["graphs"]
    ours = vae_frames(stack, done.job_id)
    cached = int8_reference(model_dir(stack.config, p.model), p)
    assert np.array_equal(ours, cached), f"max |diff| {np.abs(ours.astype(int) - cached).max()}"


def test_the_result_names_the_compiled_stages(int8_stack):
    route = int8_stack.config.route("t2v-A14B")
    meta = compile_metadata(int8_stack.config, route, int8_stack.driver.heartbeats)
    assert meta is not None and set(meta) == {"dit_high"}
    assert meta["dit_high"]["backend"] == "aot_eager" and meta["dit_high"]["max_abs_diff"] == 0.0
    assert compile_metadata(Config.load(environ={}), route, {}) is None


def test_warmup_sizes_are_the_presets_token_counts():
    config = Config.load(environ={})
    # The release's A14B layout: 4x temporal, 8x spatial VAE, 1x2x2 patches.
    info = PipelineInfo(Path("."), boundary_ratio=0.875, expand_timesteps=False, has_transformer_2=True,
                        vae_scale_temporal=4, vae_scale_spatial=8, z_dim=16, patch_size=(1, 2, 2), in_channels=16)
    sizes = compilation.warmup_sizes(config, "t2v-A14B", info, dynamic=True)
    tokens = [s.tokens for s in sizes]
    assert tokens == sorted(set(tokens)) and len(sizes) == 5  # the tiny presets give five counts
    # One preset size only: a symbolic graph is warmed on a second allowed size as well.
    one = Config.load(environ={f"WAN_SERVER__PRESETS__T2V_A14B__{p.upper()}": '{ steps = 2, resolution = "32x32", '
                               'num_frames = 5, fps = 16, guidance_scale = 3.0 }'
                               for p in ("draft", "standard", "pro", "cinema", "ultimate")})
    assert len(compilation.warmup_sizes(one, "t2v-A14B", info, dynamic=True)) == 2
    assert len(compilation.warmup_sizes(one, "t2v-A14B", info, dynamic=False)) == 1


def test_inductor_writes_its_cache_folder_and_reads_it_back(tmp_path, monkeypatch):
    """What a restarted stage relies on: after `configure_cache`, inductor's FX-graph cache is in
    the folder, and a compile with dynamo's and inductor's in-memory state dropped (as in a new
    process) loads it from there (a hit, no miss) instead of generating and compiling again. (A
    graph of one matmul, which inductor calls as an extern kernel: building a C++ kernel here
    would cost the suite 20 s.)"""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no compile-worker pool in the test process
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    folder = compilation.configure_cache(tmp_path / "cache")

    def f(x: torch.Tensor) -> torch.Tensor:  # one extern matmul: a wrapper to generate, no C++ kernel to build
        return torch.mm(x, x)

    x = torch.randn(8, 8)
    first = compilation.cache_counts()
    torch._dynamo.reset()
    y = torch.compile(f, backend="inductor")(x)
    assert compilation.cache_counts()["misses"] == first["misses"] + 1 and any(folder.rglob("*"))
    torch._dynamo.reset()
    PyCodeCache.cache_clear(purge=False)
    again = compilation.cache_counts()
    assert torch.equal(torch.compile(f, backend="inductor")(x), y)
    counts = compilation.cache_counts()
    assert counts["hits"] == again["hits"] + 1 and counts["misses"] == again["misses"]
    torch._dynamo.reset()


@pytest.fixture
def compile_settings():
    """The process-wide settings StageCompile.compile changes (duck sizing, the recompile limit),
    restored after the test through torch's own config patching (monkeypatch's undo of a torch
    config attribute removed it from the config module)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=fx_config.use_duck_shape), \
            torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield


def test_lora_switching_on_compiled_blocks_gives_the_eager_outputs(model_cache, tmp_path, compile_settings):
    """In process, on the tiny t2v expert: compiled and warmed up, then LoRAs switched per job by the
    stage's LoraCache (a LoRA at scale 1, at 0.5, none) give exactly the eager expert's outputs
    with the same LoRAs; the compiled graph ran before the first LoRA, and not after (peft's layers
    change the blocks: they run eager, never a compile inside a job)."""
    import torch._dynamo
    from diffusers import WanTransformer3DModel

    from stages.lora import LoraCache, file_sha256
    from stages.tiny_models import ensure
    from tests.helpers import make_lora

    folder = ensure("t2v-A14B", 0, model_cache)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    make_lora(folder, "transformer", lora_dir / "x.safetensors", seed=7)
    part = {"file": "x.safetensors", "sha256": file_sha256(lora_dir / "x.safetensors"), "prefix": "transformer."}
    experts = {name: WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
               for name in ("compiled", "eager")}
    info = PipelineInfo.read(folder)
    size = compilation.size_of(info, 5, 32, 32)
    config = Config.load(environ={"WAN_SERVER__STAGES__DIT_HIGH__COMPILE": "true",
                                  "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_BACKEND": '"eager"',
                                  "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_CACHE_DIR": f'"{tmp_path / "cache"}"'})
    compiler = compilation.StageCompile.for_spec(config, config.stage("dit_high"))
    try:
        compiler.compile(experts["compiled"])
        compiler.warm_up({"t2v-A14B": {"info": info, "experts": {"transformer": experts["compiled"]}}},
                         {"t2v-A14B": [size]})
        inputs = compilation.pass_inputs(experts["eager"], info, size)
        calls = compiler.counter.calls
        assert torch.equal(compilation.run_pass(experts["compiled"], inputs),
                           compilation.run_pass(experts["eager"], inputs))
        assert compiler.counter.calls == calls + LAYERS  # no LoRA yet: the compiled graph ran
        caches = {name: LoraCache(lora_dir, 4) for name in experts}
        outputs = []
        for loras in ([{"name": "x", "scale": 1.0, "parts": {"transformer": part}}],
                      [{"name": "x", "scale": 0.5, "parts": {"transformer": part}}], []):
            out = {}
            for name, expert in experts.items():
                caches[name].apply({"transformer": expert}, loras)
                out[name] = compilation.run_pass(expert, inputs)
            assert torch.equal(out["compiled"], out["eager"]), loras
            outputs.append(out["eager"])
        assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
        assert compiler.counter.calls == calls + LAYERS  # with peft's layers in the blocks: eager
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


@pytest.mark.parametrize(("env", "words"), [
    ({"WAN_SERVER__STAGES__DIT_HIGH__COMPILE": "true", "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_BACKEND": '"tvm9"'},
     "compile_backend = 'tvm9' is not one of"),
    ({"WAN_SERVER__STAGES__DIT_HIGH__COMPILE": "true",
      "WAN_SERVER__STAGES__DIT_HIGH__STORAGE_DTYPE": '"float8_e4m3fn"'}, "both compile and storage_dtype"),
    ({"WAN_SERVER__STAGES__VAE__COMPILE": "true"}, "unknown key"),
])
def test_bad_compile_settings_are_config_errors(env, words):
    with pytest.raises(ConfigError) as caught:
        Config.load(environ=env)
    assert words in caught.value.message and caught.value.code == "CONFIG_ERROR"


def test_a_batching_stage_warms_its_batch_sizes_too(model_cache, tmp_path, compile_settings):
    """With max_batch 4 (stages/batching.py) the warm-up also runs batches of 2 and 4, so a batch
    of 3 then runs compiled (under fail_on_recompile: nothing compiles) and gives the eager outputs."""
    import torch._dynamo
    from diffusers import WanTransformer3DModel

    from stages.tiny_models import ensure

    folder = ensure("t2v-A14B", 0, model_cache)
    expert = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    info = PipelineInfo.read(folder)
    size = compilation.size_of(info, 5, 32, 32)
    config = Config.load(environ={"WAN_SERVER__STAGES__DIT_HIGH__COMPILE": "true",
                                  "WAN_SERVER__STAGES__DIT_HIGH__MAX_BATCH": "4",
                                  "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_BACKEND": '"eager"',
                                  "WAN_SERVER__STAGES__DIT_HIGH__COMPILE_CACHE_DIR": f'"{tmp_path / "cache"}"'})
    compiler = compilation.StageCompile.for_spec(config, config.stage("dit_high"))
    assert compiler.batches == (1, 2, 4)
    try:
        compiler.compile(expert)
        compiler.warm_up({"t2v-A14B": {"info": info, "experts": {"transformer": expert}}}, {"t2v-A14B": [size]})
        inputs = compilation.pass_inputs(expert, info, size, batch=3)
        calls = compiler.counter.calls
        with compilation.stance("fail_on_recompile"):
            compiled = compilation.run_pass(expert, inputs)
        assert compiler.counter.calls == calls + LAYERS  # the batch of 3 ran the compiled graph
        with compilation.stance("force_eager"):
            assert torch.equal(compiled, compilation.run_pass(expert, inputs))
        assert compiler.report()["batches"] == [1, 2, 4]
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
