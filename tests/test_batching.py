"""Batching in the DiT stages (`max_batch`, stages/batching.py) through the real stage processes:
compatible jobs submitted together run as one batch in each DiT process, each job's frames equal
the frames diffusers' `WanPipeline` makes for it alone (within the bound below), a job of another
size runs too (alone, and then bit for bit), a job cancelled mid-way leaves the batch and stops
while the others go on, and no job waits longer than `batch_wait_ms` for company. In-process: the
grouping rule, and memory admission counting the batch.

The bound: on the CPU in float32 a batch changes the last bits of two of the transformer's layers
(measured on the tiny models: the patch embedding's Conv3d and the time embedder's Linears pick
other kernels for a batch of 4 than for 1, about 6e-7 apart); every other layer, attention
included, gives each job's rows bit for bit. After the steps and the VAE, measured: of the two jobs
compared, one bit for bit, the other one uint8 value in 15,360 off by one level. The test allows
one level in up to 1 in 1,000 values (`MAX_LEVELS`, `MAX_PIXELS`).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from broker import memory
from broker.driver import default_params
from common import messages as m
from common.config import Config
from common.errors import InsufficientMemory
from stages import batching
from stages.models import model_dir
from tests.helpers import reference, running_stack, short_tmpdir, vae_frames

WAIT_MS = {"dit_high": 1000, "dit_low": 300}  # each DiT's batch_wait_ms
SLACK_S = 0.5  # decoding, reports and a loaded machine, on top of a wait
MAX_LEVELS = 1  # a batched job's uint8 frames differ from its lone frames by at most this ...
MAX_PIXELS = 0.001  # ... in at most this share of the values
STEPS = 12


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def stack(model_cache):
    env = {f"WAN_SERVER__STAGES__{name.upper()}__{key}": str(value) for name, wait in WAIT_MS.items()
           for key, value in (("MAX_BATCH", 4), ("BATCH_WAIT_MS", wait))}
    with running_stack("wsb-", model_cache, WAN_SERVER__RUNTIME__RECORD_DIR="{state}/record", **env) as s:
        yield s


def publisher(stack) -> zmq.Socket[bytes]:
    """The broker's events socket (this stack has none): cancellations go out on it."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    sock.bind(stack.config.endpoint("events"))
    return sock


@pytest.fixture(scope="module")
def batch(stack) -> dict[str, Any]:
    """Four compatible jobs (other seeds, prompts and guidance) and one of another size, submitted
    at once; the third compatible one is cancelled after its first step in dit_high."""
    driver = stack.driver
    events = publisher(stack)
    same = dict(steps=STEPS, height=32, width=32, num_frames=5)
    params = [default_params(stack.config, "t2v-A14B", prompt=f"a boat on a lake {i}", seed=40 + i,
                             guidance_scale=3.0 + i / 2, **same) for i in range(4)]
    other = default_params(stack.config, "t2v-A14B", prompt="a boat on a lake", seed=50, steps=STEPS, height=48,
                           width=32, num_frames=5)
    ids = [driver.submit(p) for p in params]
    other_id = driver.submit(other)
    victim = ids[2]
    reports: dict[str, list[m.StageReport]] = {}

    def cancel_after_first_step(r: m.StageReport) -> None:
        reports.setdefault(victim, []).append(r)
        if r.event == "step" and r.stage == "dit_high":
            events.send_multipart([b"cancel", *m.encode(m.CancelJob(job_id=victim))])
        if r.event == "cancelled":
            raise Cancelled

    try:
        with pytest.raises(Cancelled):
            driver.wait(victim, timeout_s=120, on_report=cancel_after_first_step)
    finally:
        events.close(0)
    outcomes = {job: driver.wait(job, timeout_s=120) for job in ids + [other_id] if job != victim}
    for job, outcome in outcomes.items():
        reports[job] = outcome.reports
    return {"ids": ids, "other": other_id, "victim": victim, "reports": reports,
            "params": dict(zip(ids, params, strict=True)) | {other_id: other}}


def events_of(reports: list[m.StageReport], stage: str, event: str) -> list[m.StageReport]:
    return [r for r in reports if r.stage == stage and r.event == event]


def test_compatible_jobs_run_as_one_batch_in_each_dit(batch, stack):
    reports = batch["reports"]
    for job in batch["ids"]:
        (high,) = events_of(reports[job], "dit_high", "batch")
        assert high.step == 4 and high.total_steps == 4
    for job in batch["ids"]:
        if job != batch["victim"]:  # the three left go on to dit_low together
            (low,) = events_of(reports[job], "dit_low", "batch")
            assert low.step == 3
    assert not [r for r in reports[batch["other"]] if r.event == "batch"]  # another size: alone
    assert "batch of 4" in stack.log("dit_high") and "batch of 3" in stack.log("dit_low")


def test_a_batched_job_makes_its_lone_frames(batch, stack):
    folder = model_dir(stack.config, "t2v-A14B")
    survivors = [job for job in batch["ids"] if job != batch["victim"]]
    for job in survivors[:2]:  # two of them: the WanPipeline reference costs a second each
        got, want = vae_frames(stack, job), reference(folder, batch["params"][job])
        assert got.shape == want.shape
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_PIXELS, (diff.max(), (diff > 0).mean())
    # The job that ran alone in the same processes: bit for bit.
    other = batch["other"]
    assert np.array_equal(vae_frames(stack, other), reference(folder, batch["params"][other]))


def test_a_cancelled_job_leaves_the_batch_and_the_others_go_on(batch):
    reports = batch["reports"]
    victim = reports[batch["victim"]]
    assert [r for r in victim if r.event == "cancelled"]
    stopped = max((r.step for r in victim if r.event == "step"), default=0)
    for job in batch["ids"]:
        if job != batch["victim"]:
            steps = [r.step for r in reports[job] if r.event == "step"]
            assert steps[-1] == STEPS and max(steps) > stopped
    assert stopped < STEPS
    assert not [r for r in victim if r.stage in ("vae", "muxer")]


def test_no_job_waits_longer_than_batch_wait_ms_for_company(batch):
    """A job is taken (`accepted`) no later than its arrival (the stage before sent it) plus the
    wait, or when the stage finished what it was doing then."""
    reports = batch["reports"]
    for stage, before in (("dit_high", "text_encoder"), ("dit_low", "dit_high")):
        done = sorted(r.at for rs in reports.values() for r in events_of(rs, stage, "forwarded"))
        for job, rs in reports.items():
            accepted = events_of(rs, stage, "accepted")
            if not accepted:
                continue  # the victim, stopped in dit_high
            arrived = events_of(rs, before, "forwarded")[0].at
            busy_until = max([t for t in done if t <= accepted[0].at] + [arrived])
            waited = accepted[0].at - max(arrived + WAIT_MS[stage] / 1000, busy_until)
            assert waited <= SLACK_S, (stage, job, waited)


def test_a_lone_job_waits_for_company_no_longer_than_batch_wait_ms(stack, batch):
    p = default_params(stack.config, "t2v-A14B", prompt="alone", seed=60, steps=2, height=32, width=32, num_frames=5)
    outcome = stack.driver.run(p, timeout_s=60)
    rs = outcome.reports
    arrived = events_of(rs, "text_encoder", "forwarded")[0].at
    accepted = events_of(rs, "dit_high", "accepted")[0].at
    assert WAIT_MS["dit_high"] / 1000 - 0.05 <= accepted - arrived <= WAIT_MS["dit_high"] / 1000 + SLACK_S
    assert not [r for r in rs if r.event == "batch"]


# ---- in-process ----

def job(stage_models: dict[str, Any], **changes: Any) -> m.DenoiseJob:
    p = m.JobParams("t2v-A14B", "x", "", 0, 4, 32, 32, 5, 16, 4.0)
    for key, value in changes.pop("params", {}).items():
        setattr(p, key, value)
    embeds = torch.zeros(1, 8, 32)
    fields: dict[str, Any] = dict(job_id="j", attempt=1, route=["dit_high"], params=p, prompt_embeds=embeds,
                                  negative_prompt_embeds=embeds)
    fields.update(changes)
    return m.DenoiseJob(**fields)


class Models:
    models: dict[str, Any] = {"t2v-A14B": {}, "ti2v-5B": {}}


def test_the_grouping_rule():
    stage = Models()
    key = batching.batch_key(stage, job(stage.models))
    assert key is not None
    # Free: the seed, the prompt, the guidance scales (guidance stays on), the job id.
    for free in ({"params": {"seed": 9}}, {"params": {"prompt": "y"}}, {"params": {"guidance_scale": 7.0}},
                 {"params": {"guidance_scale_2": 2.0}}, {"job_id": "k"}):
        assert batching.batch_key(stage, job(stage.models, **free)) == key, free
    # Must match: the model, the size, the schedule, the step position, guidance on/off, the LoRAs,
    # the embeddings' shape, the image condition.
    for bound in ({"params": {"model": "ti2v-5B"}}, {"params": {"height": 48}}, {"params": {"width": 64}},
                  {"params": {"num_frames": 9}}, {"params": {"steps": 5}}, {"params": {"shift": 3.0}},
                  {"params": {"sigmas": [1.0, 0.5]}}, {"params": {"guidance_scale": 1.0}}, {"step": 2},
                  {"params": {"loras": [{"name": "a", "scale": 1.0}]}}, {"prompt_embeds": torch.zeros(1, 9, 32)},
                  {"condition": torch.zeros(1, 20, 2, 4, 4)}):
        other = batching.batch_key(stage, job(stage.models, **bound))
        assert other is not None and other != key, bound
    # Alone: a step cache, a model not served here, guidance without negative embeddings, not a DenoiseJob.
    assert batching.batch_key(stage, job(stage.models, params={"cache": {"method": "first_block"}})) is None
    assert batching.batch_key(stage, job(stage.models, params={"model": "i2v-A14B"})) is None
    assert batching.batch_key(stage, job(stage.models, negative_prompt_embeds=None)) is None
    assert batching.batch_key(stage, m.CancelJob(job_id="j")) is None


@pytest.fixture(scope="module")
def dits(model_cache, tmp_path_factory) -> dict[str, Any]:
    """The two DiT parts of the tiny profile in this process (previews on, into a spool of their own)."""
    from stages.dit import DitStage

    served = '["t2v-A14B", "i2v-A14B", "ti2v-5B"]'  # not the S2V DiT (clips run alone)
    config = Config.load(environ={"WAN_SERVER__RUNTIME__MODEL_CACHE_DIR": str(model_cache),
                                  "WAN_SERVER__RUNTIME__SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
                                  "WAN_SERVER__STAGES__DIT_HIGH__MODELS": served,
                                  "WAN_SERVER__STAGES__DIT_LOW__MODELS": served})
    out = {}
    for name in ("dit_high", "dit_low"):
        out[name] = DitStage(config, config.stage(name))
        out[name].setup()
    return out


@pytest.mark.parametrize("model,image", [("i2v-A14B", True), ("ti2v-5B", False), ("ti2v-5B", True)])
def test_image_conditioned_jobs_batch_through_both_parts_as_they_run_alone(dits, model, image):
    """Through both DiT parts (the hand-off's latents and UniPC state, then the latents for the
    VAE): a batch of three gives each job its lone outputs within the bound, with its condition."""
    high, low = dits["dit_high"], dits["dit_low"]
    entry = high.models[model]
    info, text_dim = entry["info"], entry["experts"]["transformer"].config.text_dim
    g = torch.Generator().manual_seed(5)
    f, h, w = 2, 32 // info.vae_scale_spatial, 32 // info.vae_scale_spatial  # the latents of 5 frames at 32x32
    extra: dict[str, Any] = {}
    if model == "i2v-A14B":
        extra = {"condition": torch.randn(1, info.in_channels - info.z_dim, f, h, w, generator=g)}
    elif image:
        mask = torch.ones(1, 1, f, h, w)
        mask[:, :, 0] = 0
        extra = {"condition": torch.randn(1, info.z_dim, 1, h, w, generator=g), "first_frame_mask": mask}
    jobs = [job(high.models, job_id=f"{model}-{image}-{i}", params={"model": model, "seed": i, "steps": 6},
                prompt_embeds=torch.randn(1, 8, text_dim, generator=g),
                negative_prompt_embeds=torch.randn(1, 8, text_dim, generator=g), **extra) for i in range(3)]
    assert len({high.batch_key(j) for j in jobs}) == 1
    handoffs = high.handle_batch(jobs)
    alone = [high.handle(j)[0] for j in jobs]
    for got, want in zip(handoffs, alone, strict=True):
        assert isinstance(got, list) and isinstance(got[0], m.DenoiseJob) and isinstance(want, m.DenoiseJob)
        assert got[0].step == want.step > 0 and torch.allclose(got[0].latents, want.latents, rtol=0, atol=1e-5)
        assert got[0].condition is want.condition
    nexts = [x[0] for x in handoffs if isinstance(x, list)]
    assert len({low.batch_key(j) for j in nexts}) == 1
    decoded = low.handle_batch(nexts)
    for got, want in zip(decoded, (low.handle(x)[0] for x in alone), strict=True):
        assert isinstance(got, list) and isinstance(got[0], m.DecodeJob) and isinstance(want, m.DecodeJob)
        assert torch.allclose(got[0].latents, want.latents, rtol=0, atol=1e-5)
        if image and model == "ti2v-5B":  # the image's latent put back in the first frame, as alone
            assert torch.equal(got[0].latents[:, :, :1], extra["condition"])


def test_a_batch_of_one_is_the_lone_path_and_bad_inputs_fail_only_their_job(dits):
    stage = dits["dit_high"]
    text_dim = stage.models["t2v-A14B"]["experts"]["transformer"].config.text_dim
    embeds = torch.randn(1, 8, text_dim, generator=torch.Generator().manual_seed(1))
    good = [job(stage.models, job_id=f"g{i}", params={"seed": i}, prompt_embeds=embeds, negative_prompt_embeds=embeds)
            for i in range(2)]
    bad = job(stage.models, job_id="bad", prompt_embeds=embeds, negative_prompt_embeds=embeds, step=3)  # wrong step
    results = stage.handle_batch([good[0], bad, good[1]])
    assert isinstance(results[1], Exception) and "arrived at step 3" in str(results[1])
    alone = [stage.handle(g)[0] for g in good]
    for result, want in zip((results[0], results[2]), alone, strict=True):
        assert isinstance(result, list) and isinstance(result[0], m.DenoiseJob)
        assert result[0].step == want.step
        assert torch.allclose(result[0].latents, want.latents, rtol=0, atol=1e-5)
    (lone,) = stage.handle_batch([good[0]])  # a batch of one is the lone path: bit for bit
    assert isinstance(lone, list) and torch.equal(lone[0].latents, alone[0].latents)


def test_memory_admission_counts_the_batch():
    """A size that fits one job's activations but not max_batch jobs' is refused at submit."""
    data: dict[str, Any] = {"admission": {"memory_budget_gib": 40.0},
                            "stages": {"dit": {"kind": "dit", "device": "cuda", "dtype": "bfloat16"}},
                            "routes": {"default": ["dit"]}}
    p = m.JobParams("t2v-A14B", "x", "", 0, 40, 480, 832, 81, 16, 4.0)
    beats = {"dit": m.Heartbeat(stage="dit", pid=1, ready=True, busy_job=None, handled=0, at=time.time(),
                                device="cuda:0", weight_bytes=int(30 * memory.GIB),
                                device_total_bytes=int(80 * memory.GIB))}
    one = Config(data)
    assert memory.check(one, p, ["dit"], beats)["cuda:0"]["needed_bytes"] < 40 * memory.GIB  # ~34 GiB
    data["stages"]["dit"]["max_batch"] = 4
    four = Config(data)
    with pytest.raises(InsufficientMemory) as refused:
        memory.check(four, p, ["dit"], beats)
    error = refused.value.to_dict()["error"]
    assert error["code"] == "INSUFFICIENT_GPU_MEMORY" and error["details"]["max_batch"] == {"dit": 4}
    weights = {"dit": int(30 * memory.GIB)}
    acts = [memory.estimate(c, p, weights, ["dit"])["cuda:0"].stages["dit"]["activations"] for c in (one, four)]
    assert acts[1] == 4 * acts[0] == 4 * memory.activation_bytes("dit", "bfloat16", p)


def test_a_bad_max_batch_is_refused():
    from common.errors import ConfigError

    for key, value in (("max_batch", 0), ("batch_wait_ms", -1)):
        with pytest.raises(ConfigError, match=key):
            Config({"stages": {"dit": {"kind": "dit", key: value}}})
    with pytest.raises(ConfigError):
        Config({"stages": {"vae": {"kind": "vae", "max_batch": 2}}})



def test_the_result_metadata_records_the_batch():
    """The broker keeps each DiT's `batch` report in the job's timings and the result's metadata."""
    from broker.broker import Broker

    state = short_tmpdir("wsr-")
    broker = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)}))
    try:
        ids = [str(broker.api.submit({"request": {"prompt": "x", "model": "t2v", "quality": "draft"}})["job_id"])
               for _ in range(2)]
        for job_id in ids:
            broker.store.start(job_id)
        broker.on_report(m.StageReport(job_id=ids[0], attempt=1, stage="dit_high", event="batch", step=3,
                                       total_steps=4))
        broker.on_report(m.StageReport(job_id=ids[0], attempt=1, stage="dit_low", event="batch", step=2,
                                       total_steps=4))
        batched, lone = (broker.api.result({"job_id": job_id})["metadata"] for job_id in ids)
        assert batched["batch"] == {"dit_high": {"size": 3, "max_batch": 4}, "dit_low": {"size": 2, "max_batch": 4}}
        assert lone["batch"] is None
    finally:
        broker.close()
        shutil.rmtree(state, ignore_errors=True)
