"""Same-host hand-offs through shared memory (common/shm.py): round trips, segment reuse, the
limits and hostile references refused with typed errors (the segment handed back at once), and the
segments of a receiver that was killed removed when it starts again."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from common import messages as m
from common import shm, wire
from common.errors import FrameMismatch, MalformedHeader, MessageTooLarge, WireError
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
LIMITS = wire.Limits(max_message_bytes=1 << 24, max_header_bytes=4096, max_frames=8)
PARAMS = m.JobParams("t2v-A14B", "p", "", 1, 4, 32, 32, 9, 16, 4.0, 3.0)


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wst-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    yield path / "vae"
    shm.remove_folder(path / "vae")
    shutil.rmtree(path, ignore_errors=True)


def pool(folder: Path, **kw: int) -> shm.SegmentPool:
    return shm.SegmentPool(folder, "dit_low", kw.get("pool_bytes", 1 << 26), kw.get("min_bytes", 0))


def receiver(folder: Path) -> shm.SharedReceiver:
    r = shm.SharedReceiver(folder)
    r.start()
    return r


def decode_job(n: int = 4096) -> m.DecodeJob:
    return m.DecodeJob(job_id="j1", attempt=1, route=["dit_low", "vae"], params=PARAMS,
                       latents=torch.arange(n, dtype=torch.float32).view(1, 4, 1, -1, 8))


def decode(*args: Any) -> Any:
    """`messages.decode`, typed loosely: the tests read the fields of the type they sent."""
    return m.decode(*args)


def segments(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.seg"))


def test_message_roundtrip_through_a_segment_is_bit_exact(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, 3, 6, 10, generator=g)
    state: Any = {"step_index": 2, "begin_index": None, "model_outputs": [None, torch.randn(2, 3, generator=g)],
             "timestep_list": [torch.tensor(875), torch.tensor(850)], "lower_order_nums": 1,
             "last_sample": torch.randn(5, generator=g).to(torch.bfloat16)}
    msg: Any = m.DenoiseJob(job_id="j1", attempt=2, route=["a", "b"], params=PARAMS,
                       prompt_embeds=torch.randn(1, 8, 4, generator=g).to(torch.bfloat16),
                       negative_prompt_embeds=torch.randn(1, 8, 4, generator=g).to(torch.float8_e4m3fn),
                       latents=lat.transpose(1, 2),  # not contiguous: packed as a copy
                       scheduler_state=state, step=2, condition=torch.empty(0, 3))
    r = receiver(folder)
    framed = m.encode(msg)
    parts, segment = pool(folder).share(framed)
    assert segment is not None and len(parts) == 1  # only the header crosses the socket
    assert msgpack.unpackb(parts[0], ext_hook=msgpack.ExtType)["shm"][0] == segment.path.name
    out = decode([bytes(parts[0])], LIMITS, r)
    assert out.type_name == "DenoiseJob" and out.params == PARAMS and out.step == 2
    for a, b in [(out.prompt_embeds, msg.prompt_embeds), (out.negative_prompt_embeds, msg.negative_prompt_embeds),
                 (out.latents, msg.latents), (out.condition, msg.condition),
                 (out.scheduler_state["model_outputs"][1], state["model_outputs"][1]),
                 (out.scheduler_state["last_sample"], state["last_sample"])]:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    assert out.scheduler_state["model_outputs"][0] is None
    assert [int(t) for t in out.scheduler_state["timestep_list"]] == [875, 850]
    # The same message framed decodes to the same thing: a receiver takes either.
    again = decode([bytes(p) for p in framed], LIMITS, r)
    assert torch.equal(again.latents, out.latents)


def test_a_segment_is_reused_once_the_receiver_drops_its_tensors(folder: Path) -> None:
    sender, r = pool(folder), receiver(folder)
    parts, first = sender.share(m.encode(decode_job()))
    held = decode(parts, LIMITS, r)
    assert first is not None and not first.free()
    # Still held: the next message gets a segment of its own.
    parts2, second = sender.share(m.encode(decode_job()))
    assert second is not None and second.path != first.path
    assert len(segments(folder)) == 2
    latents = held.latents[0, 1]  # a view keeps the segment as much as the message does
    del held
    gc.collect()
    assert not first.free()
    assert float(latents.sum()) == float(decode_job().latents[0, 1].sum())
    del latents
    assert first.free()
    decode(parts2, LIMITS, r)  # dropped at once: the segment is free again
    assert second.free()
    parts3, third = sender.share(m.encode(decode_job()))
    assert third is not None and third.path in (first.path, second.path)
    assert len(segments(folder)) == 2


def test_small_messages_and_a_full_pool_stay_framed(folder: Path) -> None:
    r = receiver(folder)
    framed = m.encode(decode_job())
    parts, segment = pool(folder, min_bytes=1 << 20).share(framed)
    assert segment is None and parts is framed
    tight = pool(folder, pool_bytes=1 << 20)
    parts, segment = tight.share(framed)
    assert segment is not None
    parts2, none = tight.share(framed)  # the one segment is in use and no other fits
    assert none is None and len(parts2) == 2
    assert torch.equal(decode(parts2, LIMITS, r).latents, decode_job().latents)


def test_a_full_tmpfs_sends_the_message_framed(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """posix_fallocate failing with ENOSPC (what a full /dev/shm does) leaves no file and no mapping
    to SIGBUS on: the message goes framed."""
    import errno

    r = receiver(folder)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    sender = pool(folder)
    framed = m.encode(decode_job())
    parts, segment = sender.share(framed)
    assert segment is None and parts is framed and segments(folder) == [] and sender.segments == []
    assert torch.equal(decode(parts, LIMITS, r).latents, decode_job().latents)


def test_over_the_limits_is_refused_and_the_segment_handed_back_at_once(folder: Path) -> None:
    sender, r = pool(folder), receiver(folder)
    parts, segment = sender.share(m.encode(decode_job(1 << 16)))  # 256 KiB of latents
    assert segment is not None
    with pytest.raises(MessageTooLarge) as info:
        decode(parts, wire.Limits(max_message_bytes=1 << 17), r)
    assert segment.free()  # while the exception (and its frames) still exist
    del info
    many = {"v": 1, "type": "DecodeJob", "t": [torch.ones(1) for _ in range(9)]}
    parts, segment = sender.share(wire.pack(many))
    assert segment is not None
    with pytest.raises(MessageTooLarge):
        wire.unpack(parts, LIMITS, r)  # 9 frames, the limit is 8
    assert segment.free()
    # A reference to a frame the segment does not hold: FrameMismatch, segment back.
    header = msgpack.unpackb(m.encode(decode_job())[0], ext_hook=msgpack.ExtType)
    parts, segment = sender.share([msgpack.packb(header)])
    assert segment is None  # no buffers: nothing to share
    parts, segment = sender.share(m.encode(decode_job()))
    assert segment is not None
    forged = msgpack.unpackb(parts[0], ext_hook=msgpack.ExtType)
    forged["shm"][3] = []
    with pytest.raises(FrameMismatch):
        decode([msgpack.packb(forged)], LIMITS, r)
    assert segment.free()


def forged(parts: list[bytes], **change: object) -> list[bytes]:
    header = msgpack.unpackb(parts[0], ext_hook=msgpack.ExtType)
    name, capacity, generation, pairs = header["shm"]
    ref = {"name": name, "capacity": capacity, "generation": generation, "pairs": pairs, **change}
    header["shm"] = [ref["name"], ref["capacity"], ref["generation"], ref["pairs"]]
    return [msgpack.packb(header)]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": "../vae/x.seg"}, MalformedHeader),
        ({"name": "/etc/passwd"}, MalformedHeader),
        ({"name": 7}, MalformedHeader),
        ({"name": "absent.seg"}, FrameMismatch),
        ({"capacity": 1 << 40}, FrameMismatch),
        ({"capacity": -1}, MalformedHeader),
        ({"generation": 99}, FrameMismatch),
        ({"pairs": [[0, 16]]}, FrameMismatch),  # over the segment's own header
        ({"pairs": [[64, 1 << 40]]}, FrameMismatch),
        ({"pairs": [[64, True]]}, MalformedHeader),
        ({"pairs": "x"}, MessageTooLarge),
    ],
    ids=lambda v: str(v)[:40],
)
def test_hostile_references_raise_typed_errors(folder: Path, change: dict[str, object], error: type) -> None:
    sender, r = pool(folder), receiver(folder)
    parts, segment = sender.share(m.encode(decode_job()))
    assert segment is not None
    with pytest.raises(error) as info:
        decode(forged(parts, **change), LIMITS, r)
    assert isinstance(info.value, WireError) and info.value.to_dict()["error"]["code"].startswith("WIRE_")


def test_links_other_users_files_and_unshared_sockets_are_refused(folder: Path, tmp_path: Path) -> None:
    sender, r = pool(folder), receiver(folder)
    parts, segment = sender.share(m.encode(decode_job()))
    assert segment is not None
    link = folder / "link.seg"
    link.symlink_to(segment.path)
    with pytest.raises(FrameMismatch):  # opened with O_NOFOLLOW
        decode(forged(parts, name="link.seg"), LIMITS, r)
    with pytest.raises(MalformedHeader):  # a decoder without a SharedReceiver takes no reference
        decode(parts, LIMITS)
    with pytest.raises(FrameMismatch):  # a shared message carries no buffer frames
        decode([parts[0], b"\0" * 16], LIMITS, r)


def test_a_restarted_sender_adopts_its_segments(folder: Path) -> None:
    receiver(folder)
    first = pool(folder)
    parts, segment = first.share(m.encode(decode_job()))
    assert segment is not None
    segment.release()
    again = pool(folder)  # a new process of the same stage
    parts, adopted = again.share(m.encode(decode_job()))
    assert adopted is not None and adopted.path == segment.path
    assert segments(folder) == [segment.path.name]
    again.close()  # in use: the receiver's to remove
    assert segments(folder) == [segment.path.name]


HOLDER = """
import sys, time
from pathlib import Path
from common import messages as m, shm, wire
r = shm.SharedReceiver(Path(sys.argv[1]))
header = sys.stdin.buffer.read()
msg = m.decode([header], wire.Limits(), r)
print("held", float(msg.latents.sum()), flush=True)
time.sleep(600)
"""


def test_segments_of_a_killed_receiver_are_removed_when_it_starts_again(folder: Path) -> None:
    sender = pool(folder)
    receiver(folder)  # the folder exists, as a running stage's does
    parts, segment = sender.share(m.encode(decode_job()))
    assert segment is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(bytes(parts[0]))
        proc.stdin.close()
        line = proc.stdout.readline().decode()
        assert line.startswith("held") and float(line.split()[1]) == float(decode_job().latents.sum())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not segment.free() and segments(folder) == [segment.path.name]  # died holding it
    assert shm.SharedReceiver(folder).start() == 1  # the restarted stage, before it binds
    assert segments(folder) == []
    parts, fresh = sender.share(m.encode(decode_job()))  # the sender forgets the removed segment
    assert fresh is not None and fresh.path != segment.path and segments(folder) == [fresh.path.name]
    r = shm.SharedReceiver(folder)
    assert torch.equal(decode(parts, LIMITS, r).latents, decode_job().latents)
    r.stop()
    assert not folder.exists()
    wait_for(lambda: not any(s.path.exists() for s in sender.segments), 5, "the segments to go")


def test_a_job_through_the_stage_processes_hands_off_in_shared_memory(stack: Any) -> None:
    """The tiny profile shares every hand-off (shm_min_bytes = 0): after a job, each receiving
    stage's folder holds the segment its sender wrote and kept for the next job, and the frames are
    the pipeline's (tests/test_pipeline_exact.py checks them bit for bit over the same path)."""
    from broker.driver import default_params
    from stages.models import model_dir
    from tests.helpers import reference, vae_frames

    p = default_params(stack.config, "t2v-A14B", prompt="shared memory", negative_prompt="", seed=5, steps=2,
                       height=32, width=32, num_frames=9)
    job_id = stack.driver.submit(p)
    outcome = stack.driver.wait(job_id, timeout_s=300)
    assert outcome.done.num_frames == 9
    ran = {r.stage for r in outcome.reports if r.event == "accepted"}
    root = stack.config.shm_dir
    assert {"dit_high", "vae", "muxer"} <= ran
    last_dit = "dit_low" if "dit_low" in ran else "dit_high"
    hops = [("dit_high", "text_encoder"), ("dit_low", "dit_high"), ("vae", last_dit), ("muxer", "vae")]
    for receiver_name, sender in hops:
        if receiver_name not in ran:
            continue
        names = segments(root / receiver_name)
        assert any(n.startswith(f"{sender}-") for n in names), (receiver_name, names)
    assert (vae_frames(stack, job_id) == reference(model_dir(stack.config, p.model), p)).all()


def test_each_deployment_has_its_own_segment_folder(tmp_path: Path) -> None:
    from common.config import Config

    a = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path / "a")})
    b = Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(tmp_path / "b")})
    assert a.shm_dir != b.shm_dir and a.shm_dir.name.startswith(f"wan-{os.getuid()}-")
    assert a.runtime.shared_memory and a.runtime.shm_min_bytes == 0  # the tiny profile shares everything
    c = Config.load(environ={"WAN_SERVER__RUNTIME__SHM_DIR": str(tmp_path / "segments"),
                             "WAN_SERVER__RUNTIME__SHARED_MEMORY": "false"})
    assert c.shm_dir == tmp_path / "segments" and not c.runtime.shared_memory
