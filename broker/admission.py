"""Admission: a client's generate request -> resolved job parameters, or a clear 4xx error.

The request is the plan's: `prompt`, `negative_prompt?`, `model`, `quality_preset` (or `quality`),
`seed?`, `priority?`, `custom_options?` {`steps`, `cfg_scale`, `cfg_scale_2`, `resolution`, `fps`,
`duration`, `num_frames`}. Presets and the sizes each model supports come from the profile
(`[presets.<model>.<preset>]`, `[models.<model>]`), so a profile can scale them to its hardware.
"""

from __future__ import annotations

import secrets
from typing import Any

from common import messages as m
from common.config import Config
from common.errors import ModelNotServed, ValidationError

MODELS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B")
ALIASES = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B", "s2v": "s2v-14B"}
PRESETS = ("draft", "standard", "pro", "cinema", "ultimate")
REQUEST_FIELDS = {"prompt", "negative_prompt", "model", "quality_preset", "quality", "seed", "priority", "custom_options"}
OPTION_FIELDS = {"steps", "cfg_scale", "cfg_scale_2", "resolution", "fps", "duration", "num_frames"}
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


def _bad(field: str, message: str, **details: Any) -> ValidationError:
    return ValidationError(message, {"field": field, **details})


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"{field} must be an integer", got=type(value).__name__)
    if not lo <= value <= hi:
        raise _bad(field, f"{field} must be between {lo} and {hi}, got {value}", min=lo, max=hi)
    return value


def _number(value: Any, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(field, f"{field} must be a number", got=type(value).__name__)
    if not lo <= value <= hi:
        raise _bad(field, f"{field} must be between {lo} and {hi}, got {value}", min=lo, max=hi)
    return float(value)


def _text(value: Any, field: str, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _bad(field, f"{field} must be a string", got=type(value).__name__)
    if required and not value.strip():
        raise _bad(field, f"{field} is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise _bad(field, f"{field} is longer than {MAX_PROMPT_CHARS} characters", max=MAX_PROMPT_CHARS, got=len(value))
    return value


def resolve_model(config: Config, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad("model", "model must be a string", allowed=list(MODELS))
    name = ALIASES.get(value, value)
    if name not in MODELS:
        raise _bad("model", f"unknown model {value[:64]!r}", allowed=[*MODELS, *ALIASES])
    if name not in config.model_names():
        raise ModelNotServed(
            f"model {name} is not served by this server's profile", {"model": name, "served": config.model_names()}
        )
    return name


def preset_table(config: Config, model: str) -> dict[str, dict[str, Any]]:
    table = config.section("presets").get(model, {})
    return {p: dict(table[p]) for p in PRESETS if p in table}


def supported_resolutions(config: Config, model: str) -> list[str]:
    return list(config.model(model).get("resolutions", []))


def max_frames(config: Config, model: str) -> int:
    return int(config.model(model).get("max_frames", 121))


def max_steps(config: Config) -> int:
    return int(config.section("admission").get("max_steps", 100))


def round_frames(frames: float) -> int:
    """The nearest 4n+1 frame count."""
    return max(1, int(round((frames - 1) / 4)) * 4 + 1)


def resolve(config: Config, request: Any) -> tuple[str, m.JobParams, int]:
    """Validate `request` and resolve it against the model's preset; returns (preset, params, priority)."""
    if not isinstance(request, dict):
        raise ValidationError("the request body must be a JSON object", {"got": type(request).__name__})
    unknown = sorted(set(request) - REQUEST_FIELDS)
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})
    if "model" not in request:
        raise _bad("model", "model is required", allowed=list(MODELS))
    model = resolve_model(config, request["model"])
    prompt = _text(request.get("prompt"), "prompt", required=True)
    negative = _text(request.get("negative_prompt"), "negative_prompt", required=False)
    preset = request.get("quality_preset", request.get("quality", "standard"))
    if preset not in PRESETS:
        raise _bad("quality_preset", f"unknown quality preset {str(preset)[:32]!r}", allowed=list(PRESETS))
    table = preset_table(config, model)
    if preset not in table:
        raise ValidationError(
            f"preset {preset} is not configured for {model} in this profile", {"field": "quality_preset", "model": model}
        )
    base = table[preset]
    seed = request.get("seed")
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _int(seed, "seed", 0, MAX_SEED)
    priority = _int(request.get("priority", 0), "priority", -10, 10)
    options = request.get("custom_options") or {}
    if not isinstance(options, dict):
        raise _bad("custom_options", "custom_options must be an object")
    unknown = sorted(set(options) - OPTION_FIELDS)
    if unknown:
        raise ValidationError(f"unknown custom option(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})

    steps = _int(options.get("steps", base["steps"]), "custom_options.steps", 1, max_steps(config))
    guidance = _number(options.get("cfg_scale", base["guidance_scale"]), "custom_options.cfg_scale", 0.0, 20.0)
    guidance_2 = options.get("cfg_scale_2", base.get("guidance_scale_2"))
    if guidance_2 is not None:
        guidance_2 = _number(guidance_2, "custom_options.cfg_scale_2", 0.0, 20.0)
    resolution = options.get("resolution", base["resolution"])
    allowed = supported_resolutions(config, model)
    if not isinstance(resolution, str) or resolution not in allowed:
        raise _bad("custom_options.resolution", f"resolution {str(resolution)[:32]!r} is not supported by {model}",
                   allowed=allowed)
    width, height = (int(x) for x in resolution.split("x"))
    fps = _int(options.get("fps", base["fps"]), "custom_options.fps", 1, 60)
    limit = max_frames(config, model)
    if "num_frames" in options:
        frames = _int(options["num_frames"], "custom_options.num_frames", 1, limit)
        if (frames - 1) % 4:
            raise _bad("custom_options.num_frames", f"num_frames must be 4n+1 (5, 9, 13, ...), got {frames}")
    elif "duration" in options:
        duration = _number(options["duration"], "custom_options.duration", 0.01, 600.0)
        frames = round_frames(duration * fps)
        if frames > limit:
            raise _bad("custom_options.duration", f"{duration} s at {fps} fps is {frames} frames; {model} allows {limit}",
                       max_frames=limit)
    else:
        frames = int(base["num_frames"])
    params = m.JobParams(
        model=model, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, height=height, width=width,
        num_frames=frames, fps=fps, guidance_scale=guidance, guidance_scale_2=guidance_2,
    )
    return preset, params, priority

