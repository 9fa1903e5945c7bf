"""The API operations the gateway asks for (ApiRequest.op -> a handler taking `args`, returning the
ApiReply result, or raising a ServerError that becomes the reply's structured error).

- submit: admit a request (broker/admission.py resolves presets and checks bounds; broker/memory.py
  checks it fits the cards the stages reported; broker/webhooks.py checks its webhook_url), store the
  uploaded image in the job's spool folder, add the job to the queue, try to dispatch.
- promote: a video-to-video child of the caller's completed job at a higher preset (broker/promote.py
  builds its request and reads the parent's video), submitted as submit does.
- status / result / list: what the store knows, with queue position and ETA.
- cancel: final in the store first, then CancelJob to the stages.
- models / presets / loras / ready: what is served (loras: broker/loras.py scans the LoRA folder), and
  whether every stage of a route is alive.
- metrics: the Prometheus text of broker/metrics.py.
- video / videos / delete: one job, a cursor page of jobs, and deleting a job (cancelled first if
  it runs, its files removed), for the OpenAI-style /v1/videos routes (gateway/openai_api.py).

`idempotency_key` on submit (the Idempotency-Key header): the same owner, key and request (its
fingerprint: the request object, the image's digest and the API it came through) within
IDEMPOTENCY_TTL_S return the job the first submit made; another request under the key is refused
(409). The key is stored with the job in one transaction, so the answer survives a restart.

`owner` (the API key's id, set by the gateway) scopes jobs: another owner's job is not found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import admission, loras, memory
from broker import promote as promotion
from broker.progress import preview_url
from broker.store import FINAL, Job
from common import catalog, spool
from common import messages as m
from common.errors import (
    IdempotencyKeyReused,
    JobNotFound,
    NotCancellable,
    QueueFull,
    TooManyActiveJobs,
    ValidationError,
)
from common.logs import job_context

if TYPE_CHECKING:
    from broker.broker import Broker
    from common.config import Config

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg", "m4a")  # common/audio.py's, the file's extension in the spool
VIDEO_FORMATS = ("mp4", "webm")
V2V_FORMATS = ("mp4", "webm", "mkv")  # a video-to-video input (and a promote's source)
MEDIA_KEYS = ("format", "sample_rate", "channels", "samples", "duration_s", "width", "height", "frames", "fps")
IDEMPOTENCY_TTL_S = 24 * 3600.0
PAGE_LIMIT = next(f for f in catalog.LIST_QUERY if f.name == "limit")  # the same bounds as GET /api/v1/jobs


def cache_metadata(job: Job) -> dict[str, Any] | None:
    """The job's step cache (its params' `cache`) with what each DiT reported: passes run and skipped."""
    cache = job.params.get("cache")
    if not cache:
        return None
    stages = job.timings.get("cache") or {}
    return {**cache, "passes": sum(int(s.get("passes", 0)) for s in stages.values()),
            "skipped": sum(int(s.get("skipped", 0)) for s in stages.values()), "stages": stages}


def batch_metadata(job: Job) -> dict[str, Any] | None:
    """The DiT stages that denoised the job in a batch with others (size, max_batch), by name; None: none.
    A batch may change the last bits of the job's frames (README "Batching")."""
    stages = job.timings.get("batch") or {}
    return {stage: dict(b) for stage, b in stages.items()} or None


def compute_metadata(config: Config, route: list[str]) -> dict[str, str] | None:
    """The stages of `route` that compute quantized (`compute_dtype`: fp8 / int8), by name; None: none."""
    quantized = {name: spec.compute_dtype for name in route
                 if (spec := config.stages.get(name)) is not None and spec.compute_dtype is not None}
    return quantized or None


def compile_metadata(config: Config, route: list[str], heartbeats: dict[str, m.Heartbeat]) -> dict[str, Any] | None:
    """The stages of `route` that run compiled (`compile = true`, stages/compilation.py), by name: the
    backend, and what the stage's warm-up measured (compile time, eager/compiled max |difference|,
    graphs compiled) as its last heartbeat says; None: no compiled stage."""
    compiled = {}
    for name in route:
        spec = config.stages.get(name)
        if spec is not None and spec.compile:
            beat = heartbeats.get(name)
            compiled[name] = {"backend": spec.compile_backend, **(beat.compile if beat is not None else {})}
    return compiled or None


def audio_metadata(job: Job, done: bool) -> dict[str, Any]:
    """The job's audio (its sha256, duration, format) and, once completed, the MP4's track (JobDone.audio)."""
    audio = job.params["audio"]
    keys = ("sha256", "duration_s", "format", "sample_rate", "channels", "start_s")
    return {**{k: audio.get(k) for k in keys}, "clips": job.params.get("num_clips"),
            "track": (job.outputs or {}).get("audio") or {} if done else {}}


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
            "loras": self.loras,
            "ready": self.ready,
            "metrics": self.metrics,
            "video": self.video,
            "videos": self.videos,
            "delete": self.delete,
            "promote": self.promote,
        }

    # ---- operations ----
    def submit(self, args: dict[str, Any],
               media: dict[str, tuple[str, bytes, dict[str, Any]]] | None = None) -> dict[str, Any]:
        """`media`: the input files, given by `promote` (its parent's video); else the gateway's uploads."""
        png = self.uploaded_image(args.get("image"))
        sha = None if png is None else hashlib.sha256(png).hexdigest()
        if media is None:  # name -> (file name in the spool folder, bytes, JobParams entry)
            media = self.uploaded_media(args)
        owner = str(args.get("owner") or "")
        key = args.get("idempotency_key")
        fingerprint = ""
        if isinstance(key, str):
            fingerprint = self.fingerprint(args, sha, {name: entry["sha256"] for name, (_, _, entry) in media.items()})
            replay = self.replay(owner, key, fingerprint)
            if replay is not None:
                return replay
        size = args.get("image_size")
        image_size: tuple[int, int] | None = None
        if png is not None and isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
            image_size = (size[0], size[1])
        entries = {name: entry for name, (_, _, entry) in media.items()}
        preset, params, priority = admission.resolve(self.config, args.get("request"), image_sha256=sha,
                                                     image_size=image_size, audio=entries.get("audio"),
                                                     pose_video=entries.get("pose_video"),
                                                     video=entries.get("video"))
        route = self.config.route(params.model)
        request = args.get("request")
        assert isinstance(request, dict)  # resolve refused anything else
        webhook_url = self.broker.webhooks.guard.check_url(request.get("webhook_url"))
        n = admission.variants(self.config, request)
        # The variants differ only in their seed, so one estimate is each one's; they run one after another.
        memory.check(self.config, params, route, self.broker.inflight.heartbeats())
        queued = self.store.count("queued")
        if queued + n > self.max_queued:
            raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting at most, {queued} now, {n} asked); "
                            "try again later", {"max_queued": self.max_queued, "requested": n, "retry_after": 10})
        max_active = args.get("max_active")
        if isinstance(max_active, int) and self.store.count_active(owner) + n > max_active:
            raise TooManyActiveJobs(f"this key may have {max_active} jobs queued or running; {n} more do not fit",
                                    {"max_active_jobs": max_active, "requested": n, "retry_after": 10})
        # n variants: seeds seed..seed+n-1 (wrapping past MAX_SEED), one job each, one group.
        jobs = [(uuid.uuid4().hex, asdict(params) | {"seed": (params.seed + i) % (catalog.MAX_SEED + 1)})
                for i in range(n)]
        group_id = uuid.uuid4().hex if n > 1 else None
        try:
            for job_id, _ in jobs:  # on disk before the job exists, so a queued job always has them
                if png is not None:
                    self.write_image(job_id, png)
                for file_name, data, _ in media.values():
                    spool.write_atomic(self.config.job_spool(job_id) / file_name, data)
        except BaseException:
            for job_id, _ in jobs:
                spool.remove_job(self.config, job_id)
            raise
        try:
            idempotency = (key, fingerprint, time.time() - IDEMPOTENCY_TTL_S) if isinstance(key, str) else None
            added = self.store.add_group(jobs, owner, params.model, preset, route, priority, webhook_url=webhook_url,
                                         group_id=group_id, idempotency=idempotency)
        except BaseException:
            for job_id, _ in jobs:
                spool.remove_job(self.config, job_id)
            raise
        for job in added:
            with job_context(job.id):
                log.info("queued %s/%s %dx%d x%d frames, %d steps, seed %d%s%s", params.model, preset, params.width,
                         params.height, params.num_frames, params.steps, job.params["seed"],
                         f" (group {group_id})" if group_id else "", f" for key {owner}" if owner else "")
            self.broker.events.job(job, "status", {"status": "queued"})
        self.broker.dispatcher.dispatch()
        return self.submit_body(added[0].id)

    def promote(self, args: dict[str, Any]) -> dict[str, Any]:
        """Re-render the caller's completed job at a higher preset from its own video (broker/promote.py
        builds the child's request and finds the video), as a video-to-video job naming its parent."""
        parent = self.find({"job_id": args.get("job_id"), "owner": args.get("owner_filter")})
        request, source = promotion.child_request(self.config, parent, args.get("request"))
        data, entry = promotion.read_source(self.config, parent, source)
        entry = {**entry, "sha256": hashlib.sha256(data).hexdigest(), "parent_job_id": parent.id}
        with job_context(parent.id):
            log.info("promoting (%s, from its %s) to %s", parent.preset, source, request["quality_preset"])
        return self.submit({**args, "request": request}, media={"video": (entry["file"], data, entry)})

    def submit_body(self, job_or_id: Job | str) -> dict[str, Any]:
        """What a create answers: the first job's status (`job_id`), and with n variants every job of the group."""
        first = self.store.get(job_or_id) if isinstance(job_or_id, str) else job_or_id
        assert first is not None
        body = self.job_brief(first)
        group = [first]
        if first.group_id is not None:
            group = self.store.list(None, catalog.MAX_VARIANTS, 0, group_id=first.group_id)[0]
        body.update(group_id=first.group_id, job_ids=[j.id for j in group], seeds=[j.params["seed"] for j in group])
        if first.group_id is not None:
            body["jobs"] = [self.job_brief(j) for j in group]
        return body

    def job_brief(self, job: Job) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "status": job.status,
            "created_at": job.created_at,
            "eta_seconds": self.broker.progress.eta(job),
            "queue_position": self.broker.dispatcher.queue_position(job),
        }

    @staticmethod
    def fingerprint(args: dict[str, Any], image_sha256: str | None, media: dict[str, str] | None = None) -> str:
        """What makes two create requests the same: the request object, the input files, the API."""
        what: dict[str, Any] = {"api": str(args.get("api") or ""), "request": args.get("request"),
                                "image": image_sha256}
        if media:
            what["media"] = media
        text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def replay(self, owner: str, key: str, fingerprint: str) -> dict[str, Any] | None:
        """The answer for a create sent again under its Idempotency-Key; None for a new key."""
        if not key or len(key) > 255:
            raise ValidationError("Idempotency-Key must be 1 to 255 characters", {"field": "Idempotency-Key"})
        found = self.store.idempotent_job(owner, key, time.time() - IDEMPOTENCY_TTL_S)
        if found is None:
            return None
        stored_fingerprint, job_id = found
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request; send a new key for a new request",
                {"field": "Idempotency-Key"},
            )
        job = self.store.get(job_id)
        if job is None:  # deleted since (its keys go with it; a race with a delete at most)
            return None
        return {**self.submit_body(job), "idempotent_replay": True}

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
        group_id = args.get("group_id")
        if group_id is not None:
            group_id = catalog.check(next(f for f in catalog.LIST_QUERY if f.name == "group_id"), group_id)
        jobs, total = self.store.list(status, limit, offset, args.get("owner"), group_id=group_id)
        return {"jobs": [self.status_body(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    def models(self, args: dict[str, Any]) -> dict[str, Any]:
        alive = self.broker.liveness.alive
        models = []
        for name in admission.MODELS:
            served = name in self.config.model_names()
            model = catalog.BY_ID[name]
            entry: dict[str, Any] = {"id": name, "served": served, "summary": model.summary,
                                     "aliases": [a for a, full in admission.ALIASES.items() if full == name],
                                     # input name -> "required" | "optional"; an input not named is refused
                                     "inputs": dict(model.inputs)}
            if served:
                entry.update(
                    resolutions=admission.supported_resolutions(self.config, name),
                    max_frames=admission.max_frames(self.config, name),
                    presets=list(admission.preset_table(self.config, name)),
                    ready=all(alive(s) for s in self.config.route(name)),
                )
            models.append(entry)
        return {"models": models}

    def loras(self, args: dict[str, Any]) -> dict[str, Any]:
        return loras.listing(self.config)

    def presets(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "presets": {name: admission.preset_table(self.config, name) for name in self.config.model_names()},
            "postprocess_applied": True,  # the muxer interpolates and upscales as the preset asks
        }

    def ready(self, args: dict[str, Any]) -> dict[str, Any]:
        alive = self.broker.liveness.alive
        stages = {s: alive(s) for s in sorted(self.broker.route_stages())}
        compiled = compile_metadata(self.config, sorted(stages), self.broker.inflight.heartbeats())
        return {"ready": all(stages.values()), "stages": stages, **({"compile": compiled} if compiled else {})}

    def metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"text": self.broker.metrics.render()}

    def video(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.video_body(self.find(args))

    def videos(self, args: dict[str, Any]) -> dict[str, Any]:
        """A cursor page: up to `limit` jobs after the job `after`, `order` "desc" (newest first) or "asc"."""
        limit = catalog.check(PAGE_LIMIT, args.get("limit", PAGE_LIMIT.default))
        order = args.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ValidationError("order must be asc or desc", {"field": "order", "allowed": ["asc", "desc"]})
        owner = args.get("owner")
        after = None
        if args.get("after") is not None:
            try:
                after = self.find({"job_id": args["after"], "owner": owner})
            except JobNotFound:
                raise JobNotFound("no such job to list after", {"field": "after"}) from None
        jobs = self.store.page(owner, after, limit + 1, descending=order == "desc")
        return {"jobs": [self.video_body(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}

    def delete(self, args: dict[str, Any]) -> dict[str, Any]:
        """Cancel the job if it is not final, then remove its files and forget it."""
        job = self.find(args)
        if not job.final:
            self.cancel(args)
        spool.remove_job(self.config, job.id)
        spool.remove_result(self.config, job.id)
        deleted = self.store.delete(job.id)
        with job_context(job.id):
            log.info("deleted (was %s)", job.status)
        return {"job_id": job.id, "deleted": deleted}

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
            "seed": job.params.get("seed"),
            "group_id": job.group_id,
        }
        if job.error:
            body["error"] = job.error
        return body

    def video_body(self, job: Job) -> dict[str, Any]:
        """What the /v1 Video object is made of (the gateway shapes it)."""
        p = job.params
        return {
            "job_id": job.id,
            "status": job.status,
            "progress": round(job.progress, 4),
            "model": job.model,
            "prompt": p.get("prompt"),
            "width": p.get("width"),
            "height": p.get("height"),
            "num_frames": p.get("num_frames"),
            "fps": p.get("fps"),
            "created_at": job.created_at,
            "finished_at": job.finished_at,
            "error": job.error,
            "output_path": job.output_path if job.status == "completed" else None,  # for the gateway only
        }

    def result_body(self, job: Job) -> dict[str, Any]:
        done = job.status == "completed"
        files = (job.outputs or {}).get("files") or [] if done else []
        return {
            "job_id": job.id,
            "status": job.status,
            "output_url": f"/api/v1/files/{job.id}.mp4" if done else None,
            "output_path": job.output_path if done else None,  # for the gateway only
            # Every file the job made: the MP4 first, then the lossless master if it asked for one.
            "outputs": [{"url": f"/api/v1/files/{f['file']}", **{k: v for k, v in f.items() if k != "file"}}
                        for f in files],
            "error": job.error,
            "metadata": {
                "model": job.model,
                "quality_preset": job.preset,
                "params": job.params,
                "seed": job.params["seed"],
                # The LoRAs applied, in order: name, scale and the sha256 of each expert's file.
                "loras": [{"name": x["name"], "scale": x["scale"],
                           "sha256": {e: part["sha256"] for e, part in x["parts"].items()}}
                          for x in job.params.get("loras") or []],
                # What the preset or custom_options asked for beyond generation, and what ran (the
                # method, output size and fps of each step; empty: none, or not completed).
                "postprocess": {"requested": job.params.get("postprocess") or {},
                                "applied": (job.outputs or {}).get("postprocess") or {} if done else {}},
                # Step caching trades quality for speed: the method, its settings and the passes skipped.
                "cache": cache_metadata(job),
                # Denoised in a batch with other jobs (DiT max_batch): the stages and the batch sizes.
                "batch": batch_metadata(job),
                # Quantized compute trades quality for speed too: the stages that ran fp8 or int8 matmuls.
                "compute": compute_metadata(self.config, job.route),
                # torch.compile'd DiT stages: backend, warm-up time and the eager/compiled max |difference|.
                "compile": compile_metadata(self.config, job.route, self.broker.inflight.heartbeats()),
                # Video-to-video: the input video (for a promote, its parent and which of the parent's
                # files it started from) and the strength.
                **({"parent_job_id": job.params["video"].get("parent_job_id"),
                    "video": {**job.params["video"], "strength": job.params.get("strength")}}
                   if job.params.get("video") else {}),
                # s2v-14B: the job's audio (sha256, duration) and the MP4's AAC track made of it.
                **({"audio": audio_metadata(job, done)} if job.params.get("audio") else {}),
                "route": job.route,
                "attempts": job.attempt,
                "timings": job.timings,
                "created_at": job.created_at,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "code_version": self.broker.version,
                # Asked for a webhook: {state: pending | delivered | expired | refused, attempts, last_status},
                # or {state: "waiting"} until the job is final.
                **({"webhook": self.store.webhook(job.id) or {"state": "waiting"}} if job.webhook_url else {}),
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

    def uploaded_media(self, args: dict[str, Any]) -> dict[str, tuple[str, bytes, dict[str, Any]]]:
        """s2v's audio and pose video as the gateway checked them (bytes as they came, and what
        decoding them found): name -> (file name in the spool folder, bytes, its JobParams entry)."""
        gw = self.config.gateway
        out: dict[str, tuple[str, bytes, dict[str, Any]]] = {}
        for name, stem, limit, formats in (("audio", "audio", gw.max_audio_bytes, AUDIO_FORMATS),
                                           ("pose_video", "pose", gw.max_video_bytes, VIDEO_FORMATS),
                                           ("video", "video", gw.max_video_bytes, V2V_FORMATS)):
            data, info = args.get(name), args.get(f"{name}_info")
            if data is None:
                continue
            if (not isinstance(data, bytes) or not 0 < len(data) <= limit or not isinstance(info, dict)
                    or info.get("format") not in formats):
                raise ValidationError(f"the {name} must reach the broker as checked bytes", {"field": name})
            file_name = f"{stem}.{info['format']}"
            out[name] = file_name, data, {"file": file_name, "sha256": hashlib.sha256(data).hexdigest(),
                                          **{k: v for k, v in info.items() if k in MEDIA_KEYS}}
        return out

    def image_path(self, job_id: str) -> Path:
        return self.config.job_spool(job_id) / "image.png"

    def write_image(self, job_id: str, png: bytes) -> None:
        """Write the job's image durably (temp file, fsync, rename, fsync the folder)."""
        spool.write_atomic(self.image_path(job_id), png)
