"""Stage placement and memory, with real stage processes of the tiny profile:

- the DiT experts stored in fp8 (diffusers' layerwise casting, computing in float32 on the CPU)
  produce a valid video close to the float32 pipeline's, and each stage logs its placement line;
- a real allocation failure (the dit_high process capped with RLIMIT_AS, a job too big for it)
  fails that job with GPU_OUT_OF_MEMORY naming the device, and the same process serves the next;
- the broker, with a small memory budget, refuses a big job at submit with INSUFFICIENT_GPU_MEMORY
  and admits and completes a small one.
"""

from __future__ import annotations

import re
import time

import av
import numpy as np
import pytest
import torch
import zmq
from diffusers import WanTransformer3DModel

from broker.broker import Broker
from broker.driver import default_params
from common import messages as m
from common.config import Config
from common.errors import InsufficientMemory, JobFailedError, ModelLoadError
from stages.models import load_component, model_dir
from stages.placement import module_bytes, resolve_attention
from tests.helpers import reference, running_stack, vae_frames

HEADROOM_MIB = 256  # dit_high may grow this much past its size after loading its models


@pytest.fixture(scope="module")
def fp8_stack(model_cache):
    with running_stack(
        "wsf8-",
        model_cache,
        WAN_SERVER__RUNTIME__RECORD_DIR="{state}/record",
        WAN_SERVER__STAGES__DIT_HIGH__STORAGE_DTYPE="float8_e4m3fn",
        WAN_SERVER__STAGES__DIT_LOW__STORAGE_DTYPE="float8_e4m3fn",
        WAN_SERVER__STAGES__DIT_HIGH__ADDRESS_SPACE_HEADROOM_MIB=str(HEADROOM_MIB),
    ) as s:
        yield s


def test_fp8_experts_give_a_video_close_to_float32(fp8_stack):
    p = default_params(fp8_stack.config, "t2v-A14B", prompt="a red car drives through the city at night",
                       seed=3, steps=6, height=32, width=48, num_frames=9, guidance_scale=4.0, guidance_scale_2=3.0)
    outcome = fp8_stack.driver.run(p, timeout_s=300)
    ours = vae_frames(fp8_stack, outcome.done.job_id)
    ref = reference(model_dir(fp8_stack.config, p.model), p)  # float32 WanPipeline = our float32 stages
    assert ours.shape == ref.shape == (9, 32, 48, 3) and ours.std() > 1.0
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 4.0, diff.mean()  # close (8-bit weights), on a 0..255 scale
    assert not np.array_equal(ours, ref)  # and the fp8 storage really was used
    with av.open(outcome.done.path) as container:
        assert len(list(container.decode(video=0))) == 9


def test_each_stage_logs_its_placement_and_reports_memory(fp8_stack):
    beats = fp8_stack.driver.heartbeats
    for stage in ("text_encoder", "dit_high", "dit_low", "vae"):
        lines = [ln for ln in fp8_stack.log(stage).splitlines() if f"stage {stage}: device" in ln]
        assert len(lines) == 1, fp8_stack.log(stage)[-2000:]
        line = lines[0]
        storage = "float8_e4m3fn" if stage.startswith("dit") else "same"
        assert f"stage {stage}: device cpu; compute float32; storage {storage}; " in line
        assert ("attention sdpa (auto: flash-attn needs CUDA)" in line) == stage.startswith("dit")
        logged = int(re.search(r"weights [0-9.]+ GiB = ([0-9]+) bytes", line).group(1))
        beat = beats[stage]
        assert beat.device == "cpu" and beat.weight_bytes == logged > 0
        assert beat.device_total_bytes >= beat.device_free_bytes > 0
    # fp8 storage: dit_high holds exactly its experts with layerwise casting, less than in float32.
    fp32 = fp8 = 0
    for model in fp8_stack.config.model_names():
        # as the stage loads it (the S2V DiT comes from its official-layout folder)
        expert = load_component(WanTransformer3DModel, model_dir(fp8_stack.config, model), "transformer",
                                torch_dtype=torch.float32)
        fp32 += module_bytes(expert)
        expert.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        fp8 += module_bytes(expert)
    assert beats["dit_high"].weight_bytes == fp8 < 0.9 * fp32, (fp8, fp32)  # tiny: norms and embeddings are a big share


def test_text_encoder_stored_in_fp8_encodes_close_to_float32(model_cache):
    from stages.text_encoder import TextEncoderStage

    env = {"WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache)}
    out = {}
    for storage in (None, "float8_e4m3fn"):
        extra = {"WAN_SERVER__STAGES__TEXT_ENCODER__STORAGE_DTYPE": storage} if storage else {}
        config = Config.load(environ={**env, **extra})
        stage = TextEncoderStage(config, config.stage("text_encoder"))
        stage.setup()
        with torch.no_grad():
            out[storage] = (stage.encode("t2v-A14B", "a cat walks on the beach", 64), stage.placement.weight_bytes)
    (ref, ref_bytes), (fp8, fp8_bytes) = out[None], out["float8_e4m3fn"]
    assert fp8.dtype == torch.float32 and fp8_bytes < 0.7 * ref_bytes
    assert 0 < (fp8 - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_flash_attention_refused_at_startup_when_not_importable():
    with pytest.raises(ModelLoadError, match="flash-attn is not importable"):
        resolve_attention("flash", torch.device("cuda:0"), "dit_high")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        resolve_attention("flash", torch.device("cpu"), "dit_high")
    auto = resolve_attention("auto", torch.device("cuda:0"), "dit_high")
    assert auto == ("sdpa", "auto: flash-attn is not importable")
    assert resolve_attention("sdpa", torch.device("cpu"), "dit_high") == ("sdpa", "configured")


def test_out_of_memory_fails_the_job_and_the_stage_serves_the_next(fp8_stack):
    driver, pid = fp8_stack.driver, fp8_stack.procs["dit_high"].pid
    # 8192x8192x33: the initial latents alone are 604 MB, past dit_high's address-space cap.
    big = default_params(fp8_stack.config, "t2v-A14B", prompt="a dog runs", seed=1, steps=2, height=8192,
                         width=8192, num_frames=33, guidance_scale=1.0)
    job_id = driver.submit(big)
    with pytest.raises(JobFailedError) as info:
        driver.wait(job_id, timeout_s=120)
    err = info.value.details["error"]
    assert info.value.details["stage"] == "dit_high" and err["code"] == "GPU_OUT_OF_MEMORY", err
    assert err["details"]["device"] == "cpu" and err["details"]["stage"] == "dit_high"
    # The allocator's own text (sizes) stays in the stage's log; the client gets the exception type.
    assert err["details"]["exception"] in ("RuntimeError", "MemoryError") and "detail" not in err["details"], err
    log = fp8_stack.log("dit_high")
    assert "address space capped" in log
    (line,) = [ln for ln in log.splitlines() if f"job={job_id}" in ln and "out of memory on cpu: " in ln]
    assert "can't allocate memory" in line or "MemoryError" in line, line
    small = default_params(fp8_stack.config, "t2v-A14B", prompt="a dog runs", seed=1, steps=2, height=32,
                           width=32, num_frames=5, guidance_scale=4.0)
    done = driver.run(small, timeout_s=120).done
    assert done.num_frames == 5 and fp8_stack.procs["dit_high"].pid == pid and fp8_stack.alive("dit_high")


def pump(broker: Broker, until, timeout_s: float) -> None:
    """Run the broker's report loop in this thread until `until()` holds."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        if broker.recv_from_stages.poll(100):
            for _ in range(100):
                try:
                    parts = broker.recv_from_stages.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                broker.on_report(m.decode(parts, broker.limits))
        broker.dispatcher.dispatch()


def test_memory_budget_refuses_big_job_at_submit_and_admits_small(fp8_stack):
    fp8_stack.driver.close()  # the broker takes over the reports endpoint
    config = Config.load(environ={**fp8_stack.env, "WAN_SERVER__ADMISSION__MEMORY_BUDGET_GIB": "0.25"})
    broker = Broker(config)
    try:
        stages = ("text_encoder", "dit_high", "dit_low", "vae")
        beats = broker.inflight.stages
        pump(broker, lambda: all(s in beats and beats[s].beat.weight_bytes for s in stages), 60)
        big = {"prompt": "a cat", "model": "t2v", "custom_options": {"resolution": "64x64", "num_frames": 33}}
        with pytest.raises(InsufficientMemory) as info:
            broker.api.submit({"request": big})
        d = info.value.details
        assert info.value.code == "INSUFFICIENT_GPU_MEMORY" and d["device"] == "cpu"
        assert d["available_gib"] == 0.25 < d["needed_gib"]
        assert set(d["stages"]) == set(stages) and d["suggestion"]
        assert broker.store.count("queued") == 0
        job = broker.api.submit({"request": {"prompt": "a cat", "model": "t2v", "quality": "draft", "seed": 4}})
        pump(broker, lambda: broker.store.get(job["job_id"]).final, 180)
        result = broker.api.result({"job_id": job["job_id"]})
        assert result["status"] == "completed", result["error"]
        with av.open(result["output_path"]) as container:
            assert len(list(container.decode(video=0))) == result["metadata"]["params"]["num_frames"]
    finally:
        broker.close()
