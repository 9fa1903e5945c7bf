"""Tensor transport through the wire format over ipc://, against a plain memory copy.

A sender process packs a 64 MiB tensor and sends it (zero-copy); the receiver decodes it into a
tensor over the received frame and acks. One transfer = send start to ack received. The memory copy
baseline copies the same bytes in the same run. Prints medians of the runs and writes JSON.

    .venv/bin/python bench/transport.py [--mib 64] [--runs 9]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import zmq  # noqa: E402

from common import wire  # noqa: E402
from common.sockets import SocketOptions, make_socket  # noqa: E402

LIMITS = wire.Limits(max_message_bytes=1 << 31)


def receiver(endpoint: str, ack_endpoint: str, runs: int) -> None:
    ctx = zmq.Context()
    opts = SocketOptions(max_message_bytes=1 << 31)
    pull = make_socket(ctx, zmq.PULL, endpoint, bind=True, options=opts)
    ack = make_socket(ctx, zmq.PUSH, ack_endpoint, bind=False, options=opts)
    for _ in range(runs):
        fields = wire.unpack(pull.recv_multipart(copy=False), LIMITS)
        t = fields["t"]
        ack.send(str(t.numel()).encode())
    pull.close(0)
    ack.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transport.json")
    args = parser.parse_args()
    nbytes = args.mib << 20
    tensor = torch.randn(nbytes // 4, dtype=torch.float32)
    tmp = tempfile.mkdtemp(prefix="wsb-", dir="/tmp")
    endpoint, ack_endpoint = f"ipc://{tmp}/data.sock", f"ipc://{tmp}/ack.sock"
    ctx = zmq.Context()
    opts = SocketOptions(max_message_bytes=1 << 31)
    acks = make_socket(ctx, zmq.PULL, ack_endpoint, bind=True, options=opts)
    proc = mp.get_context("spawn").Process(target=receiver, args=(endpoint, ack_endpoint, args.runs + 1))
    proc.start()
    push = make_socket(ctx, zmq.PUSH, endpoint, bind=False, options=opts)

    def transfer() -> float:
        start = time.perf_counter()
        push.send_multipart(wire.pack({"t": tensor}), copy=False)
        assert int(acks.recv()) == tensor.numel()
        return time.perf_counter() - start

    transfer()  # warm-up: connection set-up, page faults on both sides
    wire_s = [transfer() for _ in range(args.runs)]
    proc.join()

    src = tensor.view(torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    copy_s = []
    for _ in range(args.runs):
        start = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - start)

    wire_med, copy_med = statistics.median(wire_s), statistics.median(copy_s)
    result = {
        "bytes": nbytes,
        "runs": args.runs,
        "wire_ipc_median_s": wire_med,
        "wire_ipc_GBps": nbytes / wire_med / 1e9,
        "memcpy_median_s": copy_med,
        "memcpy_GBps": nbytes / copy_med / 1e9,
        "wire_over_memcpy_time": wire_med / copy_med,
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={mp.cpu_count()}".strip(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{args.mib} MiB over ipc:// through the wire format: {result['wire_ipc_GBps']:.2f} GB/s "
        f"(median {wire_med * 1e3:.1f} ms of {args.runs}); memory copy: {result['memcpy_GBps']:.2f} GB/s "
        f"(median {copy_med * 1e3:.1f} ms); ratio {result['wire_over_memcpy_time']:.1f}x"
    )


if __name__ == "__main__":
    main()
