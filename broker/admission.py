"""Admission: a client's generate request -> resolved job parameters, or a clear 4xx error.

The request is the plan's: `prompt`, `negative_prompt?`, `model`, `quality_preset` (or `quality`),
`seed?`, `priority?`, `custom_options?` {`steps`, `cfg_scale`, `cfg_scale_2`, `shift`, `resolution`,
`fps`, `duration`, `num_frames`, `codec`, `crf`, `bit_depth`, `lossless_master`, `interpolate_fps`,
`interpolate_method`, `upscale`, `upscale_to`, `upscale_method`}; common/catalog.py defines each field and
its bounds, and the OpenAPI document is generated from the same tables. Presets and the sizes each
model supports come from the profile (`[presets.<model>.<preset>]`, `[models.<model>]`), so a profile
can scale them to its hardware.
"""

from __future__ import annotations

import secrets
from typing import Any

from broker import distill, loras
from common import catalog
from common import messages as m
from common.catalog import (  # broker.broker and the tests read these from here
    ALIASES,
    MODELS,
    POSTPROCESS_FIELDS,
    PRESET_FIELDS,
    PRESETS,
    round_frames,
)
from common.config import Config
from common.errors import ConfigError, ModelNotServed, ValidationError

__all__ = ["ALIASES", "MODELS", "POSTPROCESS_FIELDS", "PRESETS", "PRESET_FIELDS", "check_cache", "check_presets",
           "max_frames", "max_steps", "oriented", "preset_table", "resolve", "round_frames", "supported_resolutions",
           "variants"]

# Which models take an input image, and how ("required" or "optional").
IMAGE_INPUT = {x.id: x.takes("image") for x in catalog.CATALOG if x.takes("image") != "none"}


def _bad(field: str, message: str, **details: Any) -> ValidationError:
    return ValidationError(message, {"field": field, **details})


def _option(options: dict[str, Any], name: str, default: Any, maximum: int | None = None) -> Any:
    return catalog.check(catalog.OPTION_FIELDS[name], options.get(name, default), f"custom_options.{name}",
                         maximum=maximum)


def resolve_model(config: Config, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad("model", "model must be a string", allowed=list(MODELS))
    name = catalog.canonical(value)
    if name is None:
        raise _bad("model", f"unknown model {value[:64]!r}", allowed=[*MODELS, *ALIASES])
    if name not in config.model_names():
        raise ModelNotServed(
            f"model {name} is not served by this server's profile", {"model": name, "served": config.model_names()}
        )
    return name


def preset_table(config: Config, model: str) -> dict[str, dict[str, Any]]:
    """The model's presets as configured, with each one's sampler (a distilled draft: broker/distill.py)."""
    table = config.presets.get(model, {})
    return distill.apply(config, model, {p: dict(table[p]) for p in PRESETS if p in table})


def check_presets(config: Config) -> None:
    """Every model of the profile has all five presets, each complete and within the model's limits;
    the profile's limits are within the catalog's (what the API schema promises at most)."""
    if not 1 <= max_steps(config) <= catalog.MAX_STEPS:
        raise ConfigError(f"[admission] max_steps {max_steps(config)} is outside 1..{catalog.MAX_STEPS}",
                          {"key": "max_steps"})
    if not 1 <= config.admission.max_variants <= catalog.MAX_VARIANTS:
        raise ConfigError(f"[admission] max_variants {config.admission.max_variants} is outside "
                          f"1..{catalog.MAX_VARIANTS}", {"key": "max_variants"})
    for model in config.defined_model_names():
        table = config.presets.get(model, {})
        missing = [p for p in PRESETS if p not in table]
        if missing:
            raise ConfigError(f"presets {missing} are missing for {model}", {"model": model, "missing": missing})
        resolutions, limit = supported_resolutions(config, model), max_frames(config, model)
        if not 1 <= limit <= catalog.MAX_FRAMES or (limit - 1) % 4:
            raise ConfigError(f"models.{model}: max_frames {limit} must be 4n+1 and at most {catalog.MAX_FRAMES}",
                              {"model": model, "key": "max_frames"})
        for res in resolutions:
            try:
                catalog.check(catalog.OPTION_FIELDS["resolution"], res)
            except ValidationError as exc:
                raise ConfigError(f"models.{model}: {exc.message}", {"model": model, "key": "resolutions"}) from None
        for name in PRESETS:
            _check_preset(f"presets.{model}.{name}", table[name], model, resolutions, limit, max_steps(config))


def _check_preset(where: str, row: dict[str, Any], model: str, resolutions: list[str], limit: int, steps: int) -> None:
    def bad(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}", {"preset": where})

    unknown = sorted(set(row) - PRESET_FIELDS)
    if unknown:
        raise bad(f"unknown key(s) {unknown}")
    for key in catalog.PRESET_REQUIRED:
        if key not in row:
            raise bad(f"{key} is missing")
    if not 1 <= row["steps"] <= steps:
        raise bad(f"steps {row['steps']} is outside 1..{steps}")
    if row["resolution"] not in resolutions:
        raise bad(f"resolution {row['resolution']} is not one of {model}'s {resolutions}")
    frames = row["num_frames"]
    if not 1 <= frames <= limit or (frames - 1) % 4:
        raise bad(f"num_frames {frames} must be 4n+1 and at most {limit}")
    for key, option in catalog.PRESET_OPTIONS.items():
        if key == "cache":
            continue  # an object: check_cache below
        # A preset must be a request a client could send: within the options' bounds.
        try:
            catalog.check(catalog.OPTION_FIELDS[option], row.get(key), key)
        except ValidationError as exc:
            raise bad(exc.message) from None
    if row.get("cache") is not None:
        try:
            check_cache(row["cache"], "cache")
        except ValidationError as exc:
            raise bad(exc.message) from None
    if row.get("interpolate_fps", row["fps"] + 1) <= row["fps"]:
        raise bad("interpolate_fps must be above fps")
    if row.get("upscale", 1.0) < 1.0:
        raise bad("upscale must be at least 1")
    for key in POSTPROCESS_FIELDS:
        try:
            catalog.check(catalog.OPTION_FIELDS[key], row.get(key), key)
        except ValidationError as exc:
            raise bad(exc.message) from None
    if "upscale" in row and "upscale_to" in row:
        raise bad("give upscale or upscale_to, not both")


def check_cache(value: Any, where: str = "custom_options.cache") -> dict[str, Any] | None:
    """The cache option normalised (catalog.check_cache), or None. MagCache is refused: its skip
    decisions rest on magnitude ratios calibrated for the weights (per expert, per step count), and
    no profile carries calibrated ratios yet; with made-up ratios it would skip passes blindly."""
    cache = catalog.check_cache(value, where)
    if cache is not None and cache["method"] == "mag":
        raise _bad(f"{where}.method", "cache method mag (MagCache) needs magnitude ratios calibrated for these "
                   "weights and this server has none; use first_block or taylorseer",
                   reason="not_calibrated", allowed=["none", "first_block", "taylorseer"])
    return cache


def variants(config: Config, request: dict[str, Any]) -> int:
    """The request's `n` (1 when absent), within the profile's [admission] max_variants."""
    spec = catalog.REQUEST_FIELDS["n"]
    n: int = catalog.check(spec, request.get("n", spec.default), maximum=config.admission.max_variants)
    return n


def supported_resolutions(config: Config, model: str) -> list[str]:
    return list(config.model(model).resolutions)


def max_frames(config: Config, model: str) -> int:
    return config.model(model).max_frames


def max_steps(config: Config) -> int:
    return config.admission.max_steps


def check_image_input(model: str, image_sha256: str | None) -> None:
    takes = catalog.BY_ID[model].takes("image")
    if image_sha256 is None and takes == "required":
        raise _bad("image", f"{model} needs an input image (multipart part `image`, or base64 in `image`)")
    if image_sha256 is not None and takes == "none":
        raise _bad(
            "image", f"{model} takes no input image", models_taking_images=sorted(catalog.models_taking("image"))
        )


def check_input(model: str, name: str, given: bool) -> None:
    """A file input (`audio`, `pose_video`) given to a model that takes none, or missing where required."""
    takes = catalog.BY_ID[model].takes(name)
    if not given and takes == "required":
        raise _bad(name, f"{model} needs {name} (multipart part `{name}`, or base64 in `{name}`)")
    if given and takes == "none":
        raise _bad(name, f"{model} takes no {name}", models=sorted(catalog.models_taking(name)))


S2V_ONLY = ("max_area", "frames_per_clip", "num_clips")
S2V_REFUSED = ("num_frames", "duration")  # its length follows the audio


def resolve_s2v(config: Config, model: str, options: dict[str, Any], base: dict[str, Any],
                image_size: tuple[int, int] | None, audio: dict[str, Any], fps: int) -> dict[str, Any]:
    """An s2v-14B job's size, clips and frames: {width, height, frames_per_clip, num_clips, num_frames}.

    Without `custom_options.resolution`, the size keeps the reference image's aspect within
    `max_area` (catalog.s2v_size); the clips are what the audio gives (catalog.s2v_clips), or fewer."""
    for name in S2V_REFUSED:
        if options.get(name) is not None:
            raise _bad(f"custom_options.{name}", f"{model}'s length follows its audio: give num_clips, not {name}")
    allowed = supported_resolutions(config, model)
    largest = max((int(w) * int(h) for w, h in (r.split("x") for r in allowed)), default=catalog.S2V_MAX_AREA)
    if options.get("resolution") is not None:
        resolution = _option(options, "resolution", None)
        if resolution not in allowed:
            raise _bad("custom_options.resolution", f"resolution {resolution[:32]!r} is not supported by {model}",
                       allowed=allowed)
        width, height = (int(x) for x in resolution.split("x"))
    else:
        bw, bh = (int(x) for x in base["resolution"].split("x"))
        area = _option(options, "max_area", base.get("max_area", bw * bh), maximum=largest)
        iw, ih = image_size if image_size is not None else (bw, bh)
        width, height = catalog.s2v_size(iw, ih, area)
    per_clip = _option(options, "frames_per_clip", base.get("frames_per_clip", catalog.S2V_FRAMES_PER_CLIP))
    per_clip = catalog.S2V_FRAMES_PER_CLIP if per_clip is None else per_clip
    available = catalog.s2v_clips(int(audio["samples"]), int(audio["sample_rate"]), per_clip, fps)
    clips = _option(options, "num_clips", None)
    if clips is None:
        clips = min(available, catalog.S2V_MAX_CLIPS)
    elif clips > available:
        raise _bad("custom_options.num_clips", f"the audio gives {available} clips of {per_clip} frames, not {clips}",
                   max=available)
    return {"width": width, "height": height, "frames_per_clip": per_clip, "num_clips": clips,
            "num_frames": catalog.s2v_frames(per_clip, clips)}


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
    config: Config, request: Any, image_sha256: str | None = None, image_size: tuple[int, int] | None = None,
    audio: dict[str, Any] | None = None, pose_video: dict[str, Any] | None = None,
    video: dict[str, Any] | None = None,
) -> tuple[str, m.JobParams, int]:
    """Validate `request` and resolve it against the model's preset; returns (preset, params, priority).
    `image_sha256` and `image_size` (width, height) describe the request's input image, if it has one:
    without a resolution in `custom_options`, the preset's resolution follows the image's orientation.
    `audio` and `pose_video` describe the files of an s2v-14B request as the broker stored them
    (JobParams.audio / pose_video, less `start_s`). `video` describes a video-to-video input
    (JobParams.video): the job's size follows its orientation, its frames bound num_frames, and
    `strength` applies.
    Each field is checked against its catalog entry (common/catalog.py), narrowed by the profile."""
    if not isinstance(request, dict):
        raise ValidationError("the request body must be a JSON object", {"got": type(request).__name__})
    fields = catalog.REQUEST_FIELDS
    unknown = sorted(set(request) - set(fields))
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})
    if "model" not in request:
        raise _bad("model", "model is required", allowed=list(MODELS))
    model = resolve_model(config, request["model"])
    check_input(model, "video", video is not None)  # first: i2v-A14B given a video is told it takes none
    check_image_input(model, image_sha256)
    check_input(model, "audio", audio is not None)
    check_input(model, "pose_video", pose_video is not None)
    if video is not None and image_sha256 is not None:
        raise _bad("video", f"{model} takes an input image or an input video, not both")
    strength = catalog.check(fields["strength"], request.get("strength"))
    if strength is not None and video is None:
        raise _bad("strength", "strength is for video-to-video: send a video (or promote a job)")
    if video is not None:
        image_size = (int(video["width"]), int(video["height"]))  # the video's orientation decides, as an image's
        strength = catalog.DEFAULT_STRENGTH if strength is None else strength
    prompt = catalog.check(fields["prompt"], request.get("prompt"))
    negative = catalog.check(fields["negative_prompt"], request.get("negative_prompt")) or ""
    preset = request.get("quality_preset", request.get("quality", catalog.DEFAULT_PRESET))
    preset = catalog.check(fields["quality_preset"], preset)
    table = preset_table(config, model)
    if preset not in table:
        raise ValidationError(
            f"preset {preset} is not configured for {model} in this profile",
            {"field": "quality_preset", "model": model},
        )
    base = table[preset]
    seed = catalog.check(fields["seed"], request.get("seed"))
    if seed is None:
        seed = secrets.randbelow(catalog.MAX_SEED + 1)
    priority = catalog.check(fields["priority"], request.get("priority", fields["priority"].default))
    variants(config, request)  # checked with the rest; the broker's submit makes the n jobs
    options = catalog.check(fields["custom_options"], request.get("custom_options")) or {}
    unknown = sorted(set(options) - set(catalog.OPTION_FIELDS))
    if unknown:
        raise ValidationError(f"unknown custom option(s): {', '.join(unknown)[:200]}", {"fields": unknown[:20]})

    distill.check_options(base, options)
    s2v = audio is not None
    for name in S2V_ONLY:  # checked for every model (as cfg_scale_2 is), used by those that take audio
        _option(options, name, None)

    steps = _option(options, "steps", base["steps"], maximum=max_steps(config))
    guidance = _option(options, "cfg_scale", base["guidance_scale"])
    shift = _option(options, "shift", base.get("shift"))
    guidance_2 = _option(options, "cfg_scale_2", base.get("guidance_scale_2"))
    fps = _option(options, "fps", base["fps"])
    clips: dict[str, Any] = {}
    if s2v:
        assert audio is not None
        clips = resolve_s2v(config, model, options, base, image_size, audio, fps)
        width, height, frames = clips.pop("width"), clips.pop("height"), clips.pop("num_frames")
        audio = {**audio, "start_s": catalog.S2V_DROPPED_FRAMES / fps}
    else:
        width, height, frames = resolve_size_and_frames(config, model, options, base, image_size, fps)
    if video is not None:
        assert strength is not None
        frames = video_frames(options, video, fps, frames)
    if options.get("cache") is not None:
        cache = check_cache(options["cache"])
    else:
        cache = check_cache(base["cache"], "cache") if base.get("cache") is not None else None
    if s2v and cache is not None:  # the S2V DiT has no cache hooks: refused here, not by the stage later
        raise _bad("custom_options.cache", f"step caching is not available for {model}")
    postprocess = resolve_interpolation(config, model, options, resolve_postprocess(options, base, width, height, fps))
    postprocess = resolve_upscale(config, model, options, postprocess, width, height)
    # A distilled draft's LoRA goes first, at scale 1, before the request's own.
    distilling = loras.resolve(config, model, [{"name": base["distill_lora"], "scale": 1.0}]) \
        if base.get("distill_lora") else []
    params = m.JobParams(
        model=model, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, height=height, width=width,
        num_frames=frames, fps=fps, guidance_scale=guidance, guidance_scale_2=guidance_2, shift=shift,
        image_sha256=image_sha256, postprocess=postprocess,
        encoding=resolve_encoding(options, catalog.output_size(width, height, postprocess)),
        loras=distilling + loras.check_request(config, model, options), cache=cache, sigmas=base.get("sigmas"),
        sampler="dmd" if base.get("sampler") == "dmd" else None,
        audio=audio, pose_video=pose_video, **clips, video=video, strength=strength,
    )
    return preset, params, priority


def video_frames(options: dict[str, Any], video: dict[str, Any], fps: int, frames: int) -> int:
    """A video-to-video job's frames: the ones asked for (custom_options num_frames or duration, else
    the preset's), which the video must have at the job's fps; without a request, at most the largest
    4n+1 the video has."""
    available = catalog.video_frames(int(video["frames"]), video.get("fps"), fps)
    if frames <= available:
        return frames
    asked = next((name for name in ("num_frames", "duration") if options.get(name) is not None), None)
    if asked is not None:
        raise _bad(f"custom_options.{asked}", f"the video gives {available} frames at {fps} fps, not {frames}",
                   available=available)
    return (available - 1) // 4 * 4 + 1


def resolve_size_and_frames(config: Config, model: str, options: dict[str, Any], base: dict[str, Any],
                            image_size: tuple[int, int] | None, fps: int) -> tuple[int, int, int]:
    """(width, height, num_frames) of a job of the models that take no audio."""
    allowed = supported_resolutions(config, model)
    resolution = _option(options, "resolution", oriented(base["resolution"], image_size, allowed))
    if resolution not in allowed:
        raise _bad("custom_options.resolution", f"resolution {resolution[:32]!r} is not supported by {model}",
                   allowed=allowed)
    width, height = (int(x) for x in resolution.split("x"))
    limit = max_frames(config, model)
    if "num_frames" in options:
        frames: int = _option(options, "num_frames", None, maximum=limit)
    elif "duration" in options:
        duration = _option(options, "duration", None)
        frames = round_frames(duration * fps)
        if frames > limit:
            raise _bad("custom_options.duration",
                       f"{duration} s at {fps} fps is {frames} frames; {model} allows {limit}", max_frames=limit)
    else:
        frames = int(base["num_frames"])
    return width, height, frames


def resolve_postprocess(options: dict[str, Any], base: dict[str, Any], width: int, height: int,
                        fps: int) -> dict[str, Any]:
    """The post-processing a job asks for: the preset's, each field overridden by custom_options
    (`upscale_to` replaces the preset's `upscale` factor, and the other way round; given both,
    `upscale_to` wins)."""
    wanted = {k: base[k] for k in POSTPROCESS_FIELDS if k in base}
    given = {k: _option(options, k, None) for k in POSTPROCESS_FIELDS if options.get(k) is not None}
    if "upscale" in given and "upscale_to" in given:  # as num_frames over duration: the named size wins
        del given["upscale"]
    if {"upscale", "upscale_to"} & set(given):
        wanted.pop("upscale", None)
        wanted.pop("upscale_to", None)
    wanted.update(given)
    if wanted.get("interpolate_fps") is not None and wanted["interpolate_fps"] <= fps:
        raise _bad("custom_options.interpolate_fps", f"interpolate_fps must be above the video's {fps} fps",
                   min=fps + 1)
    target = wanted.get("upscale_to")
    if target is not None and catalog.UPSCALE_TARGETS[target] < min(width, height):
        raise _bad("custom_options.upscale_to", f"{target} is smaller than the {width}x{height} video",
                   width=width, height=height)
    out_w, out_h = catalog.output_size(width, height, wanted)
    if out_w * out_h > catalog.MAX_OUTPUT_PIXELS or max(out_w, out_h) > catalog.MAX_OUTPUT_SIDE:
        raise _bad("custom_options.upscale", f"the upscaled video, {out_w}x{out_h}, is larger than 8K",
                   width=out_w, height=out_h, max_pixels=catalog.MAX_OUTPUT_PIXELS, max_side=catalog.MAX_OUTPUT_SIDE)
    return wanted


def muxers_have(config: Config, model: str, weights: str) -> bool:
    """Whether every muxer on `model`'s route has the side model `weights` names (`rife_weights`,
    `upscale_weights`) configured."""
    muxers = [config.stage(name) for name in config.route(model) if config.stage(name).kind == "muxer"]
    return bool(muxers) and all(getattr(spec, weights) for spec in muxers)


def resolve_interpolation(config: Config, model: str, options: dict[str, Any],
                          postprocess: dict[str, Any]) -> dict[str, Any]:
    """`postprocess` with its `interpolate_method`: the request's, else rife where the route's muxer
    has RIFE weights (an operator who configures them wants them used), else none (minterpolate).
    RIFE asked of a profile with no weights, or a method with nothing to interpolate, is refused."""
    method = _option(options, "interpolate_method", None)
    if postprocess.get("interpolate_fps") is None:
        if method is not None:
            raise _bad("custom_options.interpolate_method", "interpolate_method needs interpolation: give "
                       "interpolate_fps (or a preset that interpolates)", method=method)
        return postprocess
    configured = muxers_have(config, model, "rife_weights")
    if method == "rife" and not configured:
        raise _bad("custom_options.interpolate_method", "RIFE interpolation is not available: this server's "
                   "profile configures no RIFE weights (the muxer's rife_weights)", method=method,
                   allowed=["minterpolate"])
    if method is None and configured:
        method = "rife"
    return postprocess if method is None else {**postprocess, "interpolate_method": method}


def resolve_upscale(config: Config, model: str, options: dict[str, Any], postprocess: dict[str, Any],
                    width: int, height: int) -> dict[str, Any]:
    """`postprocess` with its `upscale_method`: the request's, else model where the route's muxer has
    upscale weights (an operator who places a super-resolution model wants it used: it restores
    detail Lanczos cannot), else none (Lanczos). A model asked of a profile without one, or a
    method with nothing to upscale, is refused."""
    method = _option(options, "upscale_method", None)
    if catalog.output_size(width, height, postprocess) == (width, height):
        if method is not None:
            raise _bad("custom_options.upscale_method", "upscale_method needs an upscale: give upscale or "
                       "upscale_to (or a preset that upscales)", method=method)
        return postprocess
    configured = muxers_have(config, model, "upscale_weights")
    if method == "model" and not configured:
        raise _bad("custom_options.upscale_method", "model upscaling is not available: this server's profile "
                   "configures no upscale model (the muxer's upscale_weights)", method=method, allowed=["lanczos"])
    if method is None and configured:
        method = "model"
    return postprocess if method is None else {**postprocess, "upscale_method": method}


def resolve_encoding(options: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The MP4's codec, quality and bit depth and whether a lossless master is written, checked
    against what the codec can do at the job's output `size` (after post-processing)."""
    name = _option(options, "codec", catalog.DEFAULT_CODEC)
    codec = catalog.CODECS[name]
    encoding: dict[str, Any] = {"codec": name, "bit_depth": _option(options, "bit_depth", 8),
                                "lossless_master": _option(options, "lossless_master", False)}
    crf = _option(options, "crf", None)
    if crf is not None:
        encoding["crf"] = crf
    if encoding["bit_depth"] not in codec.bit_depths:
        raise _bad("custom_options.bit_depth", f"{name} takes bit depth {' or '.join(map(str, codec.bit_depths))}, "
                   f"not {encoding['bit_depth']}", allowed=list(codec.bit_depths), codec=name)
    width, height = size
    if width * height > codec.max_pixels:
        allowed = sorted(c.name for c in catalog.CODECS.values() if c.max_pixels >= width * height)
        raise _bad("custom_options.codec", f"{name} is not used above 4K here; the {width}x{height} output needs "
                   f"one of {allowed}", codec=name, width=width, height=height, max_pixels=codec.max_pixels,
                   allowed=allowed)
    return encoding


def preset_markdown(config: Config) -> str:
    """The preset table of every model the profile describes, as the README shows it."""
    lines = [
        "| model | preset | steps | guidance (high / low) | shift | resolution | frames @ fps "
        "| post-processing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in config.defined_model_names():
        for name, row in preset_table(config, model).items():
            g2 = row.get("guidance_scale_2")
            guidance = f"{row['guidance_scale']:g}" + ("" if g2 is None else f" / {g2:g}")
            post = [f"interpolate to {row['interpolate_fps']} fps"] if "interpolate_fps" in row else []
            post += [f"upscale x{row['upscale']:g}"] if "upscale" in row else []
            post += [f"upscale to {row['upscale_to']}"] if "upscale_to" in row else []
            shift = "model's" if row.get("shift") is None else f"{row['shift']:g}"
            # s2v-14B: the resolution's area bounds the size (the image's aspect), the audio the length.
            size, frames = row["resolution"], f"{row['num_frames']}"
            if "frames_per_clip" in row:
                size, frames = f"{size} area", f"{row['frames_per_clip']} per clip"
            lines.append(
                f"| {model} | {name} | {row['steps']} | {guidance} | {shift} | {size} | "
                f"{frames} @ {row['fps']} | {', '.join(post) or '-'} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m broker.admission [PROFILE]: print the preset table
    import sys

    from common.config import profile_path

    print(preset_markdown(Config.load(profile_path(sys.argv[1] if len(sys.argv) > 1 else "single-gpu"), environ={})))
