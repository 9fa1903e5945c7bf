"""Every hand-off of a job at its real size, through the runtime's own send and receive path over
ipc://, framed (ZeroMQ carries the tensor bytes; `runtime.shared_memory = false`) and shared (the
bytes go through a reused shared-memory segment, `common/shm.py`; the default), against a plain
memory copy of the same bytes into a buffer allocated once.

One transfer = `messages.encode` (+ filling the segment) on the sender, to the receiver having
decoded the message with `messages.decode`, read one byte of every page of every tensor, dropped it
and acked. `--gap-s` idles before each transfer, as between the hand-offs of real jobs (on a VM
whose idle memory goes back to the hypervisor, a fresh buffer then costs ~0.4 GB/s to touch).
Prints a table and writes JSON and a short md. `--small`: tiny shapes, for the test suite.

    .venv/bin/python bench/transport.py [--runs 5] [--gap-s 0] [--only frames_720p] [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import zmq  # noqa: E402

from common import messages as m  # noqa: E402
from common import wire  # noqa: E402
from common.errors import WireError  # noqa: E402
from common.shm import SegmentPool, SharedReceiver  # noqa: E402
from common.sockets import SocketOptions, make_socket  # noqa: E402

LIMITS = wire.Limits(max_message_bytes=1 << 31)
OPTIONS = SocketOptions(max_message_bytes=1 << 31)
MODES = ("framed", "shared")


def handoffs(small: bool) -> dict[str, tuple[str, m.JobMessage]]:
    """name -> (what it is, the message as the stage sends it). Real sizes, or tiny ones."""
    s = 8 if small else 1  # divides every spatial size

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape).to(dtype)

    def frames(f: int, h: int, w: int) -> torch.Tensor:
        return torch.randint(0, 256, (f, h // s, w // s, 3), dtype=torch.uint8)

    params = m.JobParams("t2v-A14B", "a prompt", "", 1, 40, 480, 832, 81, 16, 4.0, 3.0)
    text = 512 // s
    emb: dict[str, Any] = {"prompt_embeds": randn(1, text, 4096 // s, dtype=torch.bfloat16),
           "negative_prompt_embeds": randn(1, text, 4096 // s, dtype=torch.bfloat16)}
    lat = (1, 16, 21, 60 // s, 104 // s)
    # UniPC (solver_order 2) mid-loop, as stages/schedule.export_state returns it.
    state = {"step_index": 20, "begin_index": None, "model_outputs": [randn(*lat), randn(*lat)],
             "timestep_list": [torch.tensor(875), torch.tensor(850)], "lower_order_nums": 2, "this_order": 2,
             "last_sample": randn(*lat)}
    route = ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
    job: dict[str, Any] = {"job_id": "bench", "attempt": 1, "route": route, "params": params}
    tlat = (1, 48, 31, 44 // s, 80 // s)
    tstate = {**state, "model_outputs": [randn(*tlat), randn(*tlat)], "last_sample": randn(*tlat)}
    return {
        "text_embeddings": ("umt5-xxl 512x4096 bf16, prompt + negative (text_encoder -> dit)",
                            m.DenoiseJob(**job, **emb)),
        "a14b_handoff": ("A14B 16x21x60x104 latents + UniPC state + embeddings (dit_high -> dit_low)",
                         m.DenoiseJob(**job, **emb, latents=randn(*lat), scheduler_state=state, step=20)),
        "ti2v_handoff": ("TI2V-5B 48x31x44x80 latents + UniPC state + embeddings (dit_high -> dit_low)",
                         m.DenoiseJob(**job, **emb, latents=randn(*tlat), scheduler_state=tstate, step=25)),
        "a14b_latents": ("A14B 16x21x60x104 float32 latents (dit -> vae)", m.DecodeJob(**job, latents=randn(*lat))),
        "ti2v_latents": ("TI2V-5B 48x31x44x80 float32 latents (dit -> vae)",
                         m.DecodeJob(**job, latents=randn(*tlat))),
        "frames_480p": ("832x480x81 uint8 frames (vae -> muxer)", m.MuxJob(**job, frames=frames(81, 480, 832))),
        "frames_720p": ("1280x704x121 uint8 frames (vae -> muxer)", m.MuxJob(**job, frames=frames(121, 704, 1280))),
        "chunk_4k": ("3840x2160x16 uint8, a post-processed 4K chunk of 16 frames",
                     m.MuxJob(**job, frames=frames(16, 2160, 3840))),
    }


def tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors(getattr(obj, f.name))]
    return []


def message_bytes(msg: m.Message) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(msg))


def receiver(endpoint: str, ack_endpoint: str, shm_folder: str) -> None:
    """Decode each message as a stage does, read every page of it, drop it, ack with the decode time;
    until an empty message."""
    ctx = zmq.Context()
    shared = SharedReceiver(Path(shm_folder))
    shared.start()
    pull = make_socket(ctx, zmq.PULL, endpoint, bind=True, options=OPTIONS)
    ack = make_socket(ctx, zmq.PUSH, ack_endpoint, bind=False, options=OPTIONS)
    while True:
        parts = pull.recv_multipart(copy=False)
        if not parts[0].bytes:
            break
        start = time.perf_counter()
        try:
            msg = m.decode(parts, LIMITS, shared)
        except WireError as exc:
            ack.send_string(f"{exc.code} 0")
            continue
        decode_s = time.perf_counter() - start
        touched = sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in tensors(msg) if t.numel())
        del msg, parts
        ack.send_string(f"{decode_s} {touched}")
    pull.close(0)
    ack.close()
    shared.stop()


class Link:
    """A sender here and a receiver process over ipc://, with a segment pool for the receiver."""

    def __init__(self, tmp: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="wsb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        endpoint, ack_endpoint = f"ipc://{tmp}/data.sock", f"ipc://{tmp}/ack.sock"
        self.ctx = zmq.Context()
        self.acks = make_socket(self.ctx, zmq.PULL, ack_endpoint, bind=True, options=OPTIONS)
        self.proc = mp.get_context("spawn").Process(target=receiver, args=(endpoint, ack_endpoint, str(self.folder)))
        self.proc.start()
        self.push = make_socket(self.ctx, zmq.PUSH, endpoint, bind=False, options=OPTIONS)
        self.pool = SegmentPool(self.folder, "bench", pool_bytes=4 << 30, min_bytes=0)

    def measure(self, msg: m.JobMessage, mode: str, runs: int, gap_s: float) -> dict[str, Any]:
        total_s, send_s, decode_s = [], [], []
        for i in range(runs + 1):  # the first is a warm-up: connection set-up, the segment's creation
            if gap_s and i:
                time.sleep(gap_s)
            # As the runtime does: fill a segment once the receiver is bound (it clears its folder first).
            assert self.push.poll(120_000, zmq.POLLOUT), "the receiver did not come up"
            start = time.perf_counter()
            parts = m.encode(msg)
            if mode == "shared":
                parts, segment = self.pool.share(parts)
                assert segment is not None, "the message went framed"
            self.push.send_multipart(parts, copy=False)
            sent = time.perf_counter()
            decoded, _ = self.acks.recv_string().split()
            end = time.perf_counter()
            if decoded.startswith("WIRE_"):
                raise RuntimeError(f"the receiver refused the message: {decoded}")
            if i:
                total_s.append(end - start)
                send_s.append(sent - start)
                decode_s.append(float(decoded))
        nbytes = message_bytes(msg)
        median = statistics.median(total_s)
        return {"median_s": median, "GBps": nbytes / median / 1e9, "min_s": min(total_s),
                "sender_median_s": statistics.median(send_s), "decode_median_s": statistics.median(decode_s)}

    def close(self) -> None:
        self.push.send(b"")
        self.proc.join(timeout=60)
        self.push.close(0)
        self.acks.close(0)
        self.ctx.term()
        self.pool.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def memcpy(nbytes: int, runs: int) -> dict[str, Any]:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "GBps": nbytes / median / 1e9}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Hand-offs over ipc:// ({result['machine']}, {result['date']}, median of {result['runs']}, "
        f"idle {result['gap_s']} s before each)",
        "",
        "framed: ZeroMQ carries the bytes (before); shared: a reused shared-memory segment (after, the default).",
        "",
        "| hand-off | MiB | framed ms | framed GB/s | shared ms | shared GB/s | memcpy ms | shared / memcpy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, h in result["handoffs"].items():
        f, s, c = h["framed"], h["shared"], h["memcpy"]
        lines.append(
            f"| {name}: {h['what']} | {h['bytes'] / 2**20:.1f} | {f['median_s'] * 1e3:.1f} | {f['GBps']:.2f} "
            f"| {s['median_s'] * 1e3:.1f} | {s['GBps']:.2f} | {c['median_s'] * 1e3:.1f} "
            f"| {s['median_s'] / c['median_s']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gap-s", type=float, default=0.0, help="idle seconds before each transfer")
    parser.add_argument("--only", nargs="*", help="hand-off names (default: all)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (the test suite)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "runs": args.runs, "gap_s": args.gap_s, "small": args.small,
        "machine": f"{platform.machine()} cores={mp.cpu_count()}", "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"), "handoffs": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="wsb-", dir="/tmp"))
    link = Link(tmp)
    try:
        for name, (what, msg) in handoffs(args.small).items():
            if args.only and name not in args.only:
                continue
            nbytes = message_bytes(msg)
            entry: dict[str, Any] = {"what": what, "bytes": nbytes}
            for mode in MODES:
                entry[mode] = link.measure(msg, mode, args.runs, args.gap_s)
            entry["memcpy"] = memcpy(nbytes, args.runs)
            assert all(math.isfinite(entry[k]["median_s"]) for k in (*MODES, "memcpy"))
            result["handoffs"][name] = entry
            f, s, c = entry["framed"], entry["shared"], entry["memcpy"]
            print(f"{name:16s} {nbytes / 2**20:7.1f} MiB  framed {f['median_s'] * 1e3:7.1f} ms {f['GBps']:5.2f} GB/s"
                  f"  shared {s['median_s'] * 1e3:6.1f} ms {s['GBps']:5.2f} GB/s  memcpy {c['median_s'] * 1e3:6.1f} ms",
                  flush=True)
        result["segments"] = [s.capacity for s in link.pool.segments]
    finally:
        link.close()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
