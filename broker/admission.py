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
from common.errors import ConfigError, ModelNotServed, ValidationError

MODELS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "s2v-14B")
ALIASES = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B", "s2v": "s2v-14B"}
PRESETS = ("draft", "standard", "pro", "cinema", "ultimate")
# Post-processing a preset may ask for. Carried with the job and recorded in the MP4's metadata;
# nothing applies them yet (the video keeps the preset's fps and resolution).
POSTPROCESS_FIELDS = ("interpolate_fps", "upscale")
# Which models take an input image: I2V-A14B needs one, TI2V-5B takes one optionally.
IMAGE_INPUT = {"i2v-A14B": "required", "ti2v-5B": "optional"}
REQUEST_FIELDS = {"prompt", "negative_prompt", "model", "quality_preset", "quality", "seed", "priority", "custom_options"}
OPTION_FIELDS = {"steps", "cfg_scale", "cfg_scale_2", "resolution", "fps", "duration", "num_frames", "shift"}
PRESET_FIELDS = {"steps", "shift", "guidance_scale", "guidance_scale_2", "resolution", "num_frames", "fps",
                 *POSTPROCESS_FIELDS}
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


def check_presets(config: Config) -> None:
    """Every model of the profile has all five presets, each complete and within the model's limits."""
    for model in config.defined_model_names():
        table = config.section("presets").get(model, {})
        missing = [p for p in PRESETS if p not in table]
        if missing:
            raise ConfigError(f"presets {missing} are missing for {model}", {"model": model, "missing": missing})
        resolutions, limit = supported_resolutions(config, model), max_frames(config, model)
        for name in PRESETS:
            row, where = table[name], f"presets.{model}.{name}"

            def bad(message: str) -> ConfigError:
                return ConfigError(f"{where}: {message}", {"preset": where})

            unknown = sorted(set(row) - PRESET_FIELDS)
            if unknown:
                raise bad(f"unknown key(s) {unknown}")
            for key in ("steps", "guidance_scale", "resolution", "num_frames", "fps"):
                if key not in row:
                    raise bad(f"{key} is missing")
            if not 1 <= row["steps"] <= max_steps(config):
                raise bad(f"steps {row['steps']} is outside 1..{max_steps(config)}")
            if row["resolution"] not in resolutions:
                raise bad(f"resolution {row['resolution']} is not one of {model}'s {resolutions}")
            frames = row["num_frames"]
            if not 1 <= frames <= limit or (frames - 1) % 4:
                raise bad(f"num_frames {frames} must be 4n+1 and at most {limit}")
            if row.get("interpolate_fps", row["fps"] + 1) <= row["fps"]:
                raise bad("interpolate_fps must be above fps")
            if row.get("upscale", 1.0) < 1.0:
                raise bad("upscale must be at least 1")


def supported_resolutions(config: Config, model: str) -> list[str]:
    return list(config.model(model).get("resolutions", []))


def max_frames(config: Config, model: str) -> int:
    return int(config.model(model).get("max_frames", 121))


def max_steps(config: Config) -> int:
    return int(config.section("admission").get("max_steps", 100))


def round_frames(frames: float) -> int:
    """The nearest 4n+1 frame count."""
    return max(1, int(round((frames - 1) / 4)) * 4 + 1)


def check_image_input(model: str, image_sha256: str | None) -> None:
    takes = IMAGE_INPUT.get(model)
    if image_sha256 is None and takes == "required":
        raise _bad("image", f"{model} needs an input image (multipart part `image`, or base64 in `image`)")
    if image_sha256 is not None and takes is None:
        raise _bad("image", f"{model} takes no input image", models_taking_images=sorted(IMAGE_INPUT))


def oriented(resolution: str, image_size: tuple[int, int] | None, allowed: list[str]) -> str:
    """The preset's resolution turned to the input image's orientation (a portrait photo gives a
    portrait video), when the model supports the turned size; the image is then cropped far less."""
    if image_size is None:
        return resolution
    w, h = (int(x) for x in resolution.split("x"))
    iw, ih = image_size
    turned = f"{h}x{w}"
    if turned in allowed and (iw > ih) != (w > h) and iw != ih and w != h:
        return turned
    return resolution


def resolve(
    config: Config, request: Any, image_sha256: str | None = None, image_size: tuple[int, int] | None = None
) -> tuple[str, m.JobParams, int]:
    """Validate `request` and resolve it against the model's preset; returns (preset, params, priority).
    `image_sha256` and `image_size` (width, height) describe the request's input image, if it has one:
    without a resolution in `custom_options`, the preset's resolution follows the image's orientation."""
    if not isinstance(request, dict):
        raise ValidationError("the request body must be a JSON object", {"got": type(request).__name__})
    unknown = sorted(set(request) - REQUEST_FIELDS)
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})
    if "model" not in request:
        raise _bad("model", "model is required", allowed=list(MODELS))
    model = resolve_model(config, request["model"])
    check_image_input(model, image_sha256)
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
    shift = options.get("shift", base.get("shift"))
    if shift is not None:
        shift = _number(shift, "custom_options.shift", 0.1, 50.0)
    guidance_2 = options.get("cfg_scale_2", base.get("guidance_scale_2"))
    if guidance_2 is not None:
        guidance_2 = _number(guidance_2, "custom_options.cfg_scale_2", 0.0, 20.0)
    allowed = supported_resolutions(config, model)
    resolution = options.get("resolution", oriented(base["resolution"], image_size, allowed))
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
        num_frames=frames, fps=fps, guidance_scale=guidance, guidance_scale_2=guidance_2, shift=shift, image_sha256=image_sha256,
        postprocess={k: base[k] for k in POSTPROCESS_FIELDS if k in base},
    )
    return preset, params, priority



def preset_markdown(config: Config) -> str:
    """The preset table of every model the profile describes, as the README shows it."""
    lines = [
        "| model | preset | steps | guidance (high / low) | shift | resolution | frames @ fps | post-processing (not applied yet) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in config.defined_model_names():
        for name, row in preset_table(config, model).items():
            g2 = row.get("guidance_scale_2")
            guidance = f"{row['guidance_scale']:g}" + ("" if g2 is None else f" / {g2:g}")
            post = [f"interpolate to {row['interpolate_fps']} fps"] if "interpolate_fps" in row else []
            post += [f"upscale x{row['upscale']:g}"] if "upscale" in row else []
            shift = "model's" if row.get("shift") is None else f"{row['shift']:g}"
            lines.append(
                f"| {model} | {name} | {row['steps']} | {guidance} | {shift} | {row['resolution']} | "
                f"{row['num_frames']} @ {row['fps']} | {', '.join(post) or '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m broker.admission [PROFILE]: print the preset table
    import sys

    from common.config import profile_path

    print(preset_markdown(Config.load(profile_path(sys.argv[1] if len(sys.argv) > 1 else "single-gpu"), environ={})))
