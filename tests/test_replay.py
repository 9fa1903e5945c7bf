"""Per-stage replay: a stage's recorded incoming frames, fed to its handle() in-process, give the
recorded output frames bit for bit."""

from __future__ import annotations

import msgpack
import pytest

from broker.driver import default_params
from stages.dit import DitStage
from stages.muxer import MuxerStage
from stages.recording import replay_file
from stages.text_encoder import TextEncoderStage
from stages.vae import VaeStage

STAGES = {"text_encoder": TextEncoderStage, "dit_high": DitStage, "dit_low": DitStage, "vae": VaeStage,
          "muxer": MuxerStage}


@pytest.fixture(scope="module")
def recorded_job(stack):
    p = default_params(stack.config, "t2v-A14B", prompt="a silver train crosses a river", seed=42, steps=6,
                       height=32, width=48, guidance_scale=4.5, guidance_scale_2=3.0)
    outcome = stack.driver.run(p, timeout_s=180)
    assert {r.stage for r in outcome.reports if r.event == "step"} == {"dit_high", "dit_low"}
    return outcome.done.job_id


@pytest.mark.parametrize("name", list(STAGES))
def test_replay_gives_recorded_output(stack, recorded_job, name):
    (path,) = (stack.state_dir / "record" / name).glob(f"*-{recorded_job}.msgpack")
    body = msgpack.unpackb(path.read_bytes(), raw=False)
    assert body["job_id"] == recorded_job and body["stage"] == name
    assert all(isinstance(f, bytes) for f in body["in"]) and len(body["out"]) == 1

    stage = STAGES[name](stack.config, stack.config.stage(name))
    stage.setup()
    recorded, replayed = replay_file(path, stage, stack.config.limits)
    assert len(replayed) == len(recorded)
    for rec_parts, new_parts in zip(recorded, replayed, strict=True):
        assert len(rec_parts) == len(new_parts)
        for i, (a, b) in enumerate(zip(rec_parts, new_parts, strict=True)):
            assert a == b, f"frame {i} of {name}'s output differs on replay"
