"""A small driver: submit one job to the first stage and wait for the muxer's MP4.

Stands in for the broker's submission path until the broker lands, so the data plane can be run
and tested on its own. It binds the reports endpoint (where every stage sends progress, heartbeats
and results), so run it while no broker is running.

    python -m broker.driver --prompt "a cat walks on the beach" --model t2v-A14B -o cat.mp4
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import zmq

from common import catalog
from common import messages as m
from common.config import Config, load_or_exit
from common.errors import JobFailedError, StageTimeout
from common.sockets import SocketOptions, make_socket, use_curve


@dataclass
class JobOutcome:
    done: m.JobDone
    reports: list[m.StageReport] = field(default_factory=list)
    heartbeats: dict[str, m.Heartbeat] = field(default_factory=dict)
    latency_s: float = 0.0


def default_params(config: Config, model: str, **overrides: Any) -> m.JobParams:
    defaults = config.defaults
    values: dict[str, Any] = {
        "model": model,
        "prompt": "",
        "negative_prompt": "",
        "seed": 0,
        "steps": defaults.steps,
        "height": defaults.height,
        "width": defaults.width,
        "num_frames": defaults.num_frames,
        "fps": defaults.fps,
        "guidance_scale": defaults.guidance_scale,
        "guidance_scale_2": None,
        "max_sequence_length": defaults.max_sequence_length,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    params = m.JobParams(**values)
    validate_params(config, params)
    return params


# JobParams field -> the catalog field whose bounds it keeps (common/catalog.py; the API's are the same).
PARAM_FIELDS = {
    "prompt": catalog.REQUEST_FIELDS["prompt"],
    "negative_prompt": catalog.REQUEST_FIELDS["negative_prompt"],
    "seed": catalog.REQUEST_FIELDS["seed"],
    "steps": catalog.OPTION_FIELDS["steps"],
    "num_frames": catalog.OPTION_FIELDS["num_frames"],
    "fps": catalog.OPTION_FIELDS["fps"],
    "guidance_scale": catalog.OPTION_FIELDS["cfg_scale"],
    "guidance_scale_2": catalog.OPTION_FIELDS["cfg_scale_2"],
    "shift": catalog.OPTION_FIELDS["shift"],
}


def validate_params(config: Config, p: m.JobParams) -> None:
    """The catalog's bounds, not the profile's: the driver hands stages jobs admission would refuse
    (sizes the profile does not list) so their own checks can be tested."""
    config.model(p.model)  # raises if the profile does not serve it
    for name, spec in PARAM_FIELDS.items():
        catalog.check(spec, getattr(p, name), name)


class Driver:
    """Owns the reports socket and a socket to the first stage; submits jobs and waits for them."""

    def __init__(self, config: Config, ctx: zmq.Context[zmq.Socket[bytes]] | None = None):
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        use_curve(config.curve_keys())
        options = SocketOptions(hwm=1000, max_message_bytes=config.limits.max_message_bytes)
        self.reports = make_socket(self.ctx, zmq.PULL, config.endpoint("reports"), bind=True, options=options)
        self._senders: dict[str, zmq.Socket[bytes]] = {}
        self.heartbeats: dict[str, m.Heartbeat] = {}
        self._pending: dict[str, list[m.Message]] = {}  # messages of jobs nobody is waiting on yet

    def close(self) -> None:
        self.reports.close(0)
        for s in self._senders.values():
            s.close(0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sender(self, stage: str) -> zmq.Socket[bytes]:
        if stage not in self._senders:
            opts = SocketOptions(send_timeout_ms=30_000, max_message_bytes=self.config.limits.max_message_bytes)
            self._senders[stage] = make_socket(
                self.ctx, zmq.PUSH, self.config.endpoint(stage), bind=False, options=opts
            )
        return self._senders[stage]

    def _poll(self, timeout_s: float) -> m.Message | None:
        if not self.reports.poll(int(timeout_s * 1000)):
            return None
        msg = m.decode(self.reports.recv_multipart(copy=False), self.config.limits)
        if isinstance(msg, m.Heartbeat):
            self.heartbeats[msg.stage] = msg
        elif (job_id := getattr(msg, "job_id", None)) is not None:
            self._pending.setdefault(job_id, []).append(msg)
        return msg

    def wait_ready(self, stages: list[str] | None = None, timeout_s: float = 120.0) -> None:
        """Wait until every stage has sent a heartbeat saying its models are loaded."""
        stages = stages or self.config.stage_names()
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [s for s in stages if not (s in self.heartbeats and self.heartbeats[s].ready)]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageTimeout(f"stages not ready after {timeout_s:.0f} s: {missing}", {"stages": missing})
            self._poll(min(left, 0.5))

    def submit(self, params: m.JobParams, job_id: str | None = None, image_path: str | Path | None = None,
               video_path: str | Path | None = None) -> str:
        """Send the job to its first stage; `image_path` is the conditioning image, `video_path` the
        video-to-video input (both read by the text_encoder)."""
        job_id = job_id or uuid.uuid4().hex
        route = self.config.route(params.model)
        image = None if image_path is None else str(Path(image_path).resolve())
        video = None if video_path is None else str(Path(video_path).resolve())
        job = m.EncodeJob(job_id=job_id, attempt=1, route=route, params=params, image_path=image, video_path=video)
        try:
            self._sender(route[0]).send_multipart(m.encode(job), copy=False)
        except zmq.Again:
            raise StageTimeout(f"stage {route[0]} did not take the job", {"stage": route[0]}) from None
        return job_id

    def wait(
        self, job_id: str, timeout_s: float = 600.0, on_report: Callable[[m.StageReport], None] | None = None
    ) -> JobOutcome:
        started = time.monotonic()
        deadline = started + timeout_s
        reports: list[m.StageReport] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageTimeout(f"job {job_id} did not finish in {timeout_s:.0f} s", {"job_id": job_id})
            queue = self._pending.get(job_id)
            if not queue:
                self._poll(min(left, 1.0))
                continue
            msg = queue.pop(0)
            if isinstance(msg, m.StageReport):
                reports.append(msg)
                if on_report:
                    on_report(msg)
            elif isinstance(msg, m.JobDone):
                self._pending.pop(job_id, None)
                return JobOutcome(msg, reports, dict(self.heartbeats), time.monotonic() - started)
            elif isinstance(msg, m.JobFailed):
                self._pending.pop(job_id, None)
                err = msg.error.get("error", {})
                raise JobFailedError(
                    f"job failed in {msg.stage}: {err.get('code')}: {err.get('message')}",
                    {"stage": msg.stage, "error": err},
                )

    def run(
        self, params: m.JobParams, timeout_s: float = 600.0, image_path: str | Path | None = None,
        on_report: Callable[[m.StageReport], None] | None = None, video_path: str | Path | None = None,
    ) -> JobOutcome:
        return self.wait(self.submit(params, image_path=image_path, video_path=video_path), timeout_s, on_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="submit one job to the stage pipeline and wait for its MP4")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--model", default="t2v-A14B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, dest="num_frames")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--guidance", type=float, dest="guidance_scale")
    parser.add_argument("--guidance-2", type=float, dest="guidance_scale_2", help="low-noise expert's guidance")
    parser.add_argument("--image", type=Path, help="conditioning image (i2v-A14B; optional for ti2v-5B)")
    parser.add_argument("-o", "--output", type=Path, help="copy the MP4 here")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    config = load_or_exit(args.config)
    keys = ("prompt", "negative_prompt", "seed", "steps", "height", "width", "num_frames", "fps")
    overrides = {k: getattr(args, k) for k in keys + ("guidance_scale", "guidance_scale_2")}
    try:
        params = default_params(config, args.model, **overrides)
        with Driver(config) as driver:
            driver.wait_ready(config.route(params.model), timeout_s=args.timeout)

            def show(r: m.StageReport) -> None:
                if r.event == "step":
                    print(f"\r{r.stage}: step {r.step}/{r.total_steps}", end="", file=sys.stderr, flush=True)

            outcome = driver.run(params, args.timeout, image_path=args.image, on_report=show)
    except Exception as exc:  # noqa: BLE001 - the CLI prints any failure as one line and exits 1
        body = exc.to_dict() if hasattr(exc, "to_dict") else {"error": {"message": str(exc)}}
        print(f"\nerror: {body['error'].get('code', 'ERROR')}: {body['error']['message']}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    path = Path(outcome.done.path)
    if args.output:
        shutil.copyfile(path, args.output)
        path = args.output
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
