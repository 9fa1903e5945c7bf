"""The API operations the gateway asks for (ApiRequest.op -> a handler taking `args`, returning the
ApiReply result, or raising a ServerError that becomes the reply's structured error).

- submit: admit a request (broker/admission.py resolves presets and checks bounds; broker/memory.py
  checks it fits the cards the stages reported), store the uploaded image in the job's spool
  folder, add the job to the queue, try to dispatch.
- status / result / list: what the store knows, with queue position and ETA.
- cancel: final in the store first, then CancelJob to the stages.
- models / presets / ready: what is served, and whether every stage of a route is alive.
- metrics: the Prometheus text of broker/metrics.py.

`owner` (the API key's id, set by the gateway) scopes jobs: another owner's job is not found.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import admission, memory
from broker.progress import preview_url
from broker.store import FINAL, Job
from common import spool
from common.errors import JobNotFound, NotCancellable, QueueFull, TooManyActiveJobs, ValidationError
from common.logs import job_context

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Api:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.config = broker.config
        self.store = broker.store
        self.max_queued = self.config.admission.max_queued
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "submit": self.submit,
            "status": self.status,
            "result": self.result,
            "cancel": self.cancel,
            "list": self.list,
            "models": self.models,
            "presets": self.presets,
            "ready": self.ready,
            "metrics": self.metrics,
        }

    # ---- operations ----
    def submit(self, args: dict[str, Any]) -> dict[str, Any]:
        png = self.uploaded_image(args.get("image"))
        sha = None if png is None else hashlib.sha256(png).hexdigest()
        size = args.get("image_size")
        image_size: tuple[int, int] | None = None
        if png is not None and isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
            image_size = (size[0], size[1])
        preset, params, priority = admission.resolve(self.config, args.get("request"), image_sha256=sha,
                                                     image_size=image_size)
        route = self.config.route(params.model)
        memory.check(self.config, params, route, self.broker.inflight.heartbeats())
        if self.store.count("queued") >= self.max_queued:
            raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); try again later",
                            {"max_queued": self.max_queued, "retry_after": 10})
        owner = str(args.get("owner") or "")
        max_active = args.get("max_active")
        if isinstance(max_active, int) and self.store.count_active(owner) >= max_active:
            raise TooManyActiveJobs(f"this key already has {max_active} jobs queued or running; wait for one to end",
                                    {"max_active_jobs": max_active, "retry_after": 10})
        job_id = uuid.uuid4().hex
        if png is not None:
            self.write_image(job_id, png)  # on disk before the job exists, so a queued job always has it
        try:
            job = self.store.add(job_id, owner, params.model, preset, asdict(params), route, priority)
        except BaseException:
            spool.remove_job(self.config, job_id)
            raise
        with job_context(job_id):
            log.info("queued %s/%s %dx%d x%d frames, %d steps%s", params.model, preset, params.width, params.height,
                     params.num_frames, params.steps, f" for key {owner}" if owner else "")
        self.broker.events.job(job, "status", {"status": "queued"})
        self.broker.dispatcher.dispatch()
        stored = self.store.get(job_id)
        assert stored is not None
        return {
            "job_id": stored.id,
            "status": stored.status,
            "created_at": stored.created_at,
            "eta_seconds": self.broker.progress.eta(stored),
            "queue_position": self.broker.dispatcher.queue_position(stored),
        }

    def status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status_body(self.find(args))

    def result(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.result_body(self.find(args))

    def cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self.find(args)
        if job.final:
            raise NotCancellable(f"job is already {job.status}", {"job_id": job.id, "status": job.status})
        error = {"code": "JOB_CANCELLED", "message": "cancelled by the client", "details": {}}
        if self.store.finish(job.id, "cancelled", error=error):
            self.broker.events.cancel(job.id)
            with job_context(job.id):
                log.info("cancelled (was %s)", job.status)
            self.broker.events.job(job, "status", {"status": "cancelled"})
            self.broker.finalize(job.id)
            self.broker.dispatcher.dispatch()
        return self.status_body(self.find({"job_id": job.id}))

    def list(self, args: dict[str, Any]) -> dict[str, Any]:
        status = args.get("status")
        if status is not None and status not in ("queued", "processing", *FINAL):
            raise ValidationError(f"unknown status {str(status)[:32]!r}", {"field": "status"})
        limit, offset = int(args.get("limit", 20)), int(args.get("offset", 0))
        jobs, total = self.store.list(status, limit, offset, args.get("owner"))
        return {"jobs": [self.status_body(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    def models(self, args: dict[str, Any]) -> dict[str, Any]:
        alive = self.broker.liveness.alive
        models = []
        for name in admission.MODELS:
            served = name in self.config.model_names()
            entry: dict[str, Any] = {"id": name, "served": served,
                                     "aliases": [a for a, full in admission.ALIASES.items() if full == name]}
            if served:
                entry.update(
                    resolutions=admission.supported_resolutions(self.config, name),
                    max_frames=admission.max_frames(self.config, name),
                    presets=list(admission.preset_table(self.config, name)),
                    ready=all(alive(s) for s in self.config.route(name)),
                )
            models.append(entry)
        return {"models": models}

    def presets(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "presets": {name: admission.preset_table(self.config, name) for name in self.config.model_names()},
            "postprocess_applied": False,  # interpolate_fps / upscale are recorded, not applied yet
        }

    def ready(self, args: dict[str, Any]) -> dict[str, Any]:
        alive = self.broker.liveness.alive
        stages = {s: alive(s) for s in sorted(self.broker.route_stages())}
        return {"ready": all(stages.values()), "stages": stages}

    def metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"text": self.broker.metrics.render()}

    # ---- bodies ----
    def find(self, args: dict[str, Any]) -> Job:
        job_id = args.get("job_id")
        job = self.store.get(job_id) if isinstance(job_id, str) else None
        owner = args.get("owner")
        if job is None or (owner is not None and job.owner != owner):
            raise JobNotFound("no such job", {"job_id": str(job_id)[:80]})
        return job

    def status_body(self, job: Job) -> dict[str, Any]:
        body = {
            "job_id": job.id,
            "status": job.status,
            "progress": round(job.progress, 4),
            "eta": self.broker.progress.eta(job),
            "stage": job.stage,
            "queue_position": self.broker.dispatcher.queue_position(job),
            "attempt": job.attempt,
            "created_at": job.created_at,
            # The latest live preview: while the job runs, and kept beside the MP4 once it completed.
            "preview_url": preview_url(job.id, job.preview) if job.preview and job.status in
            ("processing", "completed") else None,
        }
        if job.error:
            body["error"] = job.error
        return body

    def result_body(self, job: Job) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "status": job.status,
            "output_url": f"/api/v1/files/{job.id}.mp4" if job.status == "completed" else None,
            "output_path": job.output_path if job.status == "completed" else None,  # for the gateway only
            "error": job.error,
            "metadata": {
                "model": job.model,
                "quality_preset": job.preset,
                "params": job.params,
                "seed": job.params["seed"],
                # What the preset asked for beyond generation; nothing applies it yet.
                "postprocess": {"requested": job.params.get("postprocess") or {}, "applied": False},
                "route": job.route,
                "attempts": job.attempt,
                "timings": job.timings,
                "created_at": job.created_at,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "code_version": self.broker.version,
            },
        }

    # ---- the uploaded image, in the job's spool folder ----
    def uploaded_image(self, value: Any) -> bytes | None:
        """The PNG the gateway validated and re-encoded, sent as msgpack binary; None without one."""
        if value is None:
            return None
        limit = self.config.gateway.max_image_pixels * 4 + (1 << 20)
        if not isinstance(value, bytes) or len(value) > limit or not value.startswith(PNG_MAGIC):
            raise ValidationError("the image must reach the broker as PNG bytes", {"field": "image"})
        return value

    def image_path(self, job_id: str) -> Path:
        return self.config.job_spool(job_id) / "image.png"

    def write_image(self, job_id: str, png: bytes) -> None:
        """Write the job's image durably (temp file, fsync, rename, fsync the folder)."""
        spool.write_atomic(self.image_path(job_id), png)
