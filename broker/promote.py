"""Promoting a finished job: POST /api/v1/promote/{job_id} -> a video-to-video job at a higher preset.

The child is an ordinary generate request (admitted, queued and run like any other) built from the
parent: its model, prompt and negative prompt (unless the promote overrides them), seed, LoRAs
(the request's own, without a distilled draft's step-distillation LoRA), encoding, frames and fps;
the promote's quality_preset, strength and custom_options on top. Its input video is the parent's
own output:

- the lossless master (`<job_id>.mkv`, FFV1 RGB) when the parent asked for one: it holds exactly the
  frames the parent's VAE decoded, before post-processing, so the child starts from the parent's
  pixels;
- else the MP4, decoded: lossy (4:2:0 chroma, the codec's crf) and post-processed (an interpolated
  MP4's frames are taken every round(its fps / the job's fps)-th, an upscaled one is fitted back
  down to the new size), which is as close as the parent's files allow.

The parent must be the caller's (another user's job is not found, as on every route) and completed;
the new preset must be above the parent's in catalog.PRESETS.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from broker.admission import preset_table
from broker.store import Job
from common import catalog
from common.config import Config
from common.errors import JobNotCompleted, ResultExpired, ValidationError

# The largest parent video a promote reads (the file goes into the child's spool folder).
MAX_SOURCE_BYTES = 2 << 30


def _bad(field: str, message: str, **details: Any) -> ValidationError:
    return ValidationError(message, {"field": field, **details})


def child_request(config: Config, parent: Job, body: Any) -> tuple[dict[str, Any], str]:
    """(the child's generate request, the source: "lossless_master" or "mp4") for promoting `parent`
    as `body` (catalog.PROMOTE) asks; a structured 4xx for what cannot be promoted."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", {"got": type(body).__name__})
    fields = catalog.PROMOTE_FIELDS
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})
    if parent.status != "completed":
        raise JobNotCompleted(f"the job is {parent.status}; only a completed job can be promoted",
                              {"job_id": parent.id, "status": parent.status})
    model, p = parent.model, parent.params
    if catalog.BY_ID[model].takes("video") == "none":
        raise _bad("job_id", f"{model} jobs cannot be promoted: {model} takes no input video",
                   model=model, models=catalog.models_taking("video"))
    if p.get("image_sha256"):
        raise _bad("job_id", "an image-conditioned job cannot be promoted (its image is not kept once it completed)",
                   model=model)
    if "quality_preset" not in body:
        raise _bad("quality_preset", "quality_preset is required: a preset above the job's",
                   allowed=list(catalog.PRESETS))
    preset = catalog.check(fields["quality_preset"], body["quality_preset"])
    higher = list(catalog.PRESETS[catalog.PRESETS.index(parent.preset) + 1:]) if parent.preset in catalog.PRESETS \
        else []
    if preset not in higher:
        raise _bad("quality_preset", f"promote to a preset above the job's {parent.preset}, not {preset}",
                   reason="not_higher", parent_preset=parent.preset, allowed=higher)
    strength = catalog.check(fields["strength"], body.get("strength"))
    options = catalog.check(fields["custom_options"], body.get("custom_options")) or {}
    fixed = sorted(set(options) & set(catalog.PROMOTE_FIXED_OPTIONS))
    if fixed:
        raise _bad(f"custom_options.{fixed[0]}", f"a promote keeps the job's frames and fps; {fixed[0]} is refused",
                   fields=fixed)
    distill = preset_table(config, model).get(parent.preset, {}).get("distill_lora")
    own = [x for i, x in enumerate(p.get("loras") or []) if not (i == 0 and distill and x["name"] == distill)]
    inherited: dict[str, Any] = {
        "num_frames": p["num_frames"], "fps": p["fps"],
        "loras": [{"name": x["name"], "scale": x["scale"]} for x in own] or None,
        **{k: v for k, v in (p.get("encoding") or {}).items() if k in catalog.ENCODING_FIELDS},
    }
    prompt = body.get("prompt")
    negative = body.get("negative_prompt")
    request: dict[str, Any] = {
        "model": model,
        "prompt": p["prompt"] if prompt is None else prompt,
        "negative_prompt": p.get("negative_prompt", "") if negative is None else negative,
        "quality_preset": preset,
        "seed": p["seed"],
        "strength": catalog.PROMOTE_STRENGTH if strength is None else strength,
        "custom_options": {**inherited, **options},
    }
    for name in ("priority", "webhook_url"):
        if body.get(name) is not None:
            request[name] = body[name]
    files = (parent.outputs or {}).get("files") or []
    source = "lossless_master" if any(f.get("file") == f"{parent.id}.mkv" for f in files) else "mp4"
    return request, source


def read_source(config: Config, parent: Job, source: str) -> tuple[bytes, dict[str, Any]]:
    """The bytes of the parent's video `source` and its JobParams.video entry (less sha256); a
    ResultExpired when the file is gone (or is not a regular file: never followed through a link)."""
    fmt = "mkv" if source == "lossless_master" else "mp4"
    name = f"{parent.id}.{fmt}"
    path = config.results_dir / name
    files = (parent.outputs or {}).get("files") or []
    described: dict[str, Any] = next((f for f in files if f.get("file") == name), {})
    gone = ResultExpired("the job's video is gone (removed since it completed); it cannot be promoted",
                         {"job_id": parent.id, "source": source})
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise gone from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= MAX_SOURCE_BYTES:
            raise gone
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    p = parent.params
    entry = {"file": f"video.{fmt}", "format": fmt, "source": source,
             "width": int(described.get("width") or p["width"]), "height": int(described.get("height") or p["height"]),
             "frames": int(described.get("frames") or p["num_frames"]), "fps": described.get("fps") or p["fps"]}
    return data, entry
