"""The API contract, written once: the models and the inputs each takes, the quality presets and
their fields, and the request of POST /api/v1/generate with the bounds of every field.

Admission (broker/admission.py), the driver (broker/driver.py) and the OpenAPI document
(gateway/openapi.py, generated from these tables) all read this module, so they cannot drift
apart. A new model, input or option is added here, once, and every reader picks it up.

The bounds here are what the schema allows at most. A profile narrows some of them at run time
(`Field.profile_limit` says which): its models' resolutions and max_frames, its max_steps, its
presets. Data and small pure functions only: no torch, no config, so any process can import it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import ValidationError

# ---- models and their inputs -------------------------------------------------------------------

Use = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class Input:
    """A file a request may carry besides its text: a base64 field of the JSON body, or a part of
    the same name in multipart/form-data. The gateway takes it out of the body before admission."""

    name: str
    media_types: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Model:
    id: str
    alias: str
    summary: str
    # Input name -> how the model uses it; an input not named is refused. Every model takes a prompt.
    inputs: tuple[tuple[str, Use], ...] = ()

    def takes(self, input_name: str) -> Use:
        return dict(self.inputs).get(input_name, "none")


INPUTS: dict[str, Input] = {
    "image": Input("image", ("image/png", "image/jpeg", "image/webp"),
                   "input image, PNG/JPEG/WebP (in a JSON body base64, a data:image/...;base64, URL is accepted)"),
    "audio": Input("audio", ("audio/wav", "audio/flac", "audio/mpeg", "audio/ogg", "audio/mp4"),
                   "speech audio, WAV/FLAC/MP3/OGG (Vorbis, Opus)/M4A (AAC), recognised by its bytes; decoded "
                   "completely before admission (in a JSON body base64, a data:audio/...;base64, URL is accepted); "
                   "the video's length follows it and the MP4 carries it as AAC"),
    "pose_video": Input("pose_video", ("video/mp4", "video/webm"),
                        "pose video (e.g. DW-pose skeletons) that drives the body's pose, MP4/WebM, decoded "
                        "completely before admission (in a JSON body base64)"),
    "video": Input("video", ("video/mp4", "video/webm", "video/x-matroska"),
                   "video-to-video: the video to re-render, MP4/WebM/MKV recognised by its bytes, decoded completely "
                   "before admission (in a JSON body base64); its frames are fitted to the job's size (cover and "
                   "centre crop), VAE-encoded and noised to `strength` (README: Promote and video-to-video)"),
}

CATALOG: tuple[Model, ...] = (
    Model("t2v-A14B", "t2v", "text to video, two 14B experts (high and low noise)",
          inputs=(("video", "optional"),)),
    Model("i2v-A14B", "i2v", "image to video, two 14B experts", inputs=(("image", "required"),)),
    Model("ti2v-5B", "ti2v", "text to video, or text and image to video, one 5B model",
          inputs=(("image", "optional"), ("video", "optional"))),
    Model("s2v-14B", "s2v", "speech to video: a reference image and a speech track (and optionally a pose video), "
          "one 14B model", inputs=(("image", "required"), ("audio", "required"), ("pose_video", "optional"))),
)

MODELS: tuple[str, ...] = tuple(x.id for x in CATALOG)
ALIASES: dict[str, str] = {x.alias: x.id for x in CATALOG}
BY_ID: dict[str, Model] = {x.id: x for x in CATALOG}


def canonical(name: str) -> str | None:
    """The model id `name` stands for (an id or an alias), or None."""
    full = ALIASES.get(name, name)
    return full if full in BY_ID else None


def models_taking(input_name: str) -> list[str]:
    return [x.id for x in CATALOG if x.takes(input_name) != "none"]


# ---- quality presets ---------------------------------------------------------------------------

PRESETS: tuple[str, ...] = ("draft", "standard", "pro", "cinema", "ultimate")
DEFAULT_PRESET = "standard"
# Post-processing a preset (or custom_options) may ask for; the muxer applies it (stages/postprocess.py).
POSTPROCESS_FIELDS: tuple[str, ...] = ("interpolate_fps", "upscale", "upscale_to")
# A preset row's keys, and the custom option that overrides each (whose bounds the row must keep).
PRESET_OPTIONS: dict[str, str] = {
    "steps": "steps", "guidance_scale": "cfg_scale", "guidance_scale_2": "cfg_scale_2", "shift": "shift",
    "resolution": "resolution", "num_frames": "num_frames", "fps": "fps", "cache": "cache",
    # s2v-14B only (optional in its rows): the size's pixel budget, and the frames of one clip.
    "max_area": "max_area", "frames_per_clip": "frames_per_clip",
}
PRESET_REQUIRED: tuple[str, ...] = ("steps", "guidance_scale", "resolution", "num_frames", "fps")
PRESET_FIELDS: frozenset[str] = frozenset({*PRESET_OPTIONS, *POSTPROCESS_FIELDS})


# ---- the generate request ----------------------------------------------------------------------

Kind = Literal["string", "integer", "number", "boolean", "object", "array"]


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    description: str
    required: bool = False
    nullable: bool = False  # null is taken as absent: the default applies
    default: Any = None  # documented; None: see the description
    minimum: int | float | None = None
    maximum: float | None = None
    step: int | None = None  # the value is minimum + step * n (num_frames: 4n+1)
    max_length: int | None = None
    nonblank: bool = False  # a string that holds more than white space
    pattern: str | None = None  # as JSON Schema's `pattern`: searched, not matched whole
    pattern_hint: str = ""  # what the pattern asks for, in words
    enum: tuple[str, ...] = ()
    fields: tuple[Field, ...] = ()  # an object's fields; an array's items are objects of these fields
    max_items: int | None = None  # an array's
    # The profile narrows this bound at run time: "max_steps" ([admission] max_steps), "max_variants"
    # ([admission] max_variants), "max_frames"
    # ([models.<id>] max_frames), "resolutions" ([models.<id>] resolutions), "max_area" (the largest
    # area of [models.<id>] resolutions), "lora_scale" ([loras] min_scale / max_scale) or "max_loras"
    # ([loras] max_per_job).
    profile_limit: str | None = None


MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_STEPS = 100
# Wan2.2 is trained on 81 (A14B) and 121 (5B) frames; twice the longer one is the most a profile may allow.
MAX_FRAMES = 241
RESOLUTION_PATTERN = "^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
MAX_URL_CHARS = 2048
MAX_VARIANTS = 64  # the most any profile's [admission] max_variants may allow
WEBHOOK_URL_PATTERN = "^https?://[^/?#@\\s]+([/?#][^\\s]*)?$"  # a host, no user:password@, no white space

# ---- speech to video (s2v-14B) -----------------------------------------------------------------
# The official clip loop: clips of `frames_per_clip` frames (80), whose audio features are the
# audio's frames r*F .. r*F+F-1 at `fps` (video frame k <-> audio time k / fps); clip 0 is decoded
# after the reference image's latent and its first S2V_DROPPED_FRAMES frames are dropped, so the
# video has F x clips - 3 frames and its frame 0 shows audio time 3 / fps (what the muxer's audio
# starts at: README "Speech to video").
S2V_FRAMES_PER_CLIP = 80
S2V_MAX_FRAMES_PER_CLIP = 120
S2V_DROPPED_FRAMES = 3
S2V_SIZE_DIVISOR = 64
S2V_MAX_AREA = 1280 * 1280
S2V_MAX_CLIPS = 64
S2V_AUDIO_RATE = 16_000  # wav2vec2's input rate
S2V_FEATURE_RATE = 30  # the audio features are interpolated from wav2vec2's 50 Hz to this rate
WAV2VEC2_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))  # (kernel, stride) of its feature encoder

# ---- encoders, containers and post-processing -------------------------------------------------


@dataclass(frozen=True)
class Codec:
    name: str
    encoder: str  # the FFmpeg encoder PyAV opens
    bit_depths: tuple[int, ...]
    max_pixels: int  # the largest frame the codec is used for here (width x height)


# H.264 stops at 4K here (level 5.2's 36864 macroblocks, 4096x2304); above it HEVC or AV1 is required.
H264_MAX_PIXELS = 4096 * 2304
MAX_OUTPUT_PIXELS = 7680 * 4320  # 8K UHD, the largest output post-processing may make
MAX_OUTPUT_SIDE = 8192
CODECS: dict[str, Codec] = {
    "h264": Codec("h264", "libx264", (8, 10), H264_MAX_PIXELS),
    "h265": Codec("h265", "libx265", (8, 10), MAX_OUTPUT_PIXELS),
    "av1": Codec("av1", "libsvtav1", (8, 10), MAX_OUTPUT_PIXELS),
}
DEFAULT_CODEC = "h264"
# Named upscale targets: the short side of the output (the aspect is kept).
UPSCALE_TARGETS: dict[str, int] = {"1080p": 1080, "4k": 2160, "8k": 4320}
MAX_UPSCALE = 8.0
# How interpolate_fps is reached: ffmpeg's minterpolate (CPU, no weights) or RIFE 4.25/4.26 (the
# muxer's device, the profile's rife_weights). Unset: rife where the muxer has weights, else minterpolate.
INTERPOLATION_METHODS: tuple[str, ...] = ("minterpolate", "rife")
# How an upscale is done: Lanczos (FFmpeg, CPU) or the profile's super-resolution model (the muxer's
# upscale_weights, on its device; then Lanczos to the exact size). Unset: model where configured.
UPSCALE_METHODS: tuple[str, ...] = ("lanczos", "model")

ENCODING_OPTIONS: tuple[Field, ...] = (
    Field("codec", "string", "video codec of the MP4: h264, h265 (tagged hvc1; required above 4K) or av1 (SVT-AV1)",
          default=DEFAULT_CODEC, enum=tuple(CODECS)),
    Field("crf", "integer", "constant rate factor, 0 (best) .. 51 for every codec (for av1, that part of SVT-AV1's "
          "0..63 scale); null: the muxer's configured default for the codec", nullable=True, minimum=0, maximum=51),
    Field("bit_depth", "integer", "8 or 10 (10-bit H.264 is High 10, which few hardware players decode: prefer "
          "h265 or av1)", default=8, minimum=8, maximum=10, step=2),
    Field("lossless_master", "boolean", "also write an FFV1 (RGB) Matroska master, bit-identical to the decoded "
          "frames, served at /api/v1/files/{job_id}.mkv", default=False),
)
ENCODING_FIELDS: tuple[str, ...] = tuple(f.name for f in ENCODING_OPTIONS)

POSTPROCESS_OPTIONS: tuple[Field, ...] = (
    Field("interpolate_fps", "integer", "interpolate the video to this frame rate (above fps; motion-compensated, "
          "ffmpeg minterpolate or RIFE: interpolate_method); null: the preset's", nullable=True, minimum=2,
          maximum=60),
    Field("interpolate_method", "string", "how to interpolate to interpolate_fps: minterpolate (ffmpeg, "
          "motion-compensated, CPU) or rife (RIFE v4.25/4.26 on the muxer's device; only where the profile "
          "configures RIFE weights); null: rife where configured, else minterpolate", nullable=True,
          enum=INTERPOLATION_METHODS),
    Field("upscale", "number", "upscale by this factor (Lanczos), keeping the aspect; null: the preset's",
          nullable=True, minimum=1.0, maximum=MAX_UPSCALE),
    Field("upscale_to", "string", "upscale to a named size (short side 1080, 2160, 4320; aspect kept); "
          "upscale_to wins if both are given", nullable=True, enum=tuple(UPSCALE_TARGETS)),
    Field("upscale_method", "string", "how to upscale: lanczos (ffmpeg, CPU) or model (the profile's "
          "super-resolution model, Real-ESRGAN compact or RRDBNet, on the muxer's device, then Lanczos to the "
          "exact size; only where the profile configures upscale weights); null: model where configured, "
          "else lanczos", nullable=True, enum=UPSCALE_METHODS),
)


def even(x: float) -> int:
    """The nearest even size of at least 2 (4:2:0 video needs even sides)."""
    return max(2, 2 * round(x / 2))


def output_size(width: int, height: int, postprocess: dict[str, Any]) -> tuple[int, int]:
    """The size a job's video has after post-processing `postprocess` (its `upscale` factor or
    `upscale_to` target; the aspect kept, even sides)."""
    target = postprocess.get("upscale_to")
    factor = UPSCALE_TARGETS[target] / min(width, height) if target else float(postprocess.get("upscale") or 1.0)
    if factor == 1.0:
        return width, height
    return even(width * factor), even(height * factor)


MAX_LORAS = 8
# A LoRA's name: the file name in the LoRA folder without `.safetensors` (and without `.high`/`.low`).
LORA_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_+-]*(\\.[A-Za-z0-9_+-]+)*$"
LORA: tuple[Field, ...] = (
    Field("name", "string", "a LoRA of GET /api/v1/loras that fits the model", required=True, max_length=128,
          pattern=LORA_NAME_PATTERN, pattern_hint="a LoRA name (letters, digits, _ + - .)"),
    Field("scale", "number", "the LoRA's weight; the server's [loras] min_scale..max_scale narrow these bounds",
          default=1.0, minimum=-4.0, maximum=4.0, profile_limit="lora_scale"),
)
LORA_FIELDS: dict[str, Field] = {f.name: f for f in LORA}


# Step caching (stages/caching.py applies diffusers' cache hooks in the DiT processes). `none` turns
# a preset's cache off; `mag` (MagCache) needs magnitude ratios calibrated for the weights and the
# step count, which no profile carries yet, so admission refuses it (CACHE_NOT_CALIBRATED).
CACHE_METHODS: tuple[str, ...] = ("none", "first_block", "taylorseer", "mag")
CACHE_FIELDS: tuple[Field, ...] = (
    Field("method", "string", "none | first_block (First Block Cache) | taylorseer (TaylorSeer) | mag (MagCache: "
          "refused until calibrated ratios are configured)", required=True, enum=CACHE_METHODS),
    Field("threshold", "number", "first_block: relative change of the first block's residual under which the other "
          "blocks are skipped (higher skips more, at more loss)", default=0.05, minimum=0.0, maximum=1.0),
    Field("interval", "integer", "taylorseer: a full pass every `interval` passes, the others predicted",
          default=5, minimum=1, maximum=20),
    Field("warmup", "integer", "taylorseer: passes computed in full before predicting starts", default=3,
          minimum=1, maximum=MAX_STEPS),
)
CACHE_FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in CACHE_FIELDS}
# The keys each method takes besides `method`.
CACHE_KEYS: dict[str, tuple[str, ...]] = {"none": (), "first_block": ("threshold",),
                                          "taylorseer": ("interval", "warmup"), "mag": ()}

OPTIONS: tuple[Field, ...] = (
    Field("steps", "integer", "denoising steps", minimum=1, maximum=MAX_STEPS, profile_limit="max_steps"),
    Field("cfg_scale", "number", "classifier-free guidance (the high-noise expert's, for the A14B models)",
          minimum=0.0, maximum=20.0),
    Field("cfg_scale_2", "number", "the low-noise expert's guidance (A14B); null: the same as cfg_scale",
          nullable=True, minimum=0.0, maximum=20.0),
    Field("shift", "number", "flow-matching timestep shift; null: the model's own", nullable=True,
          minimum=0.1, maximum=50.0),
    Field("resolution", "string", "WxH, one the model supports in this profile (GET /api/v1/models)",
          pattern=RESOLUTION_PATTERN, pattern_hint="WxH (e.g. 832x480)", profile_limit="resolutions"),
    Field("fps", "integer", "frames per second of the video", minimum=1, maximum=60),
    # At 1 fps, MAX_FRAMES seconds are MAX_FRAMES frames: no longer duration can ever be admitted.
    Field("duration", "number", "seconds; frames = the 4n+1 nearest duration x fps (num_frames wins if both)",
          minimum=0.01, maximum=float(MAX_FRAMES)),
    Field("num_frames", "integer", "4n+1 (5, 9, 13, ...), at most the model's max_frames in this profile "
          "(not for s2v-14B: its length follows the audio, see num_clips)",
          minimum=1, maximum=MAX_FRAMES, step=4, profile_limit="max_frames"),
    Field("max_area", "integer", "s2v-14B: the most pixels (width x height) of the video, whose size keeps the "
          "reference image's aspect with sides multiples of 64 (1024*704 = 720896 gives 1024x704 for a 16:11 "
          "image); null: the preset's (its max_area, else its resolution's area); at most the largest area of the "
          "model's resolutions in this profile; a `resolution` given wins", nullable=True,
          minimum=S2V_SIZE_DIVISOR * S2V_SIZE_DIVISOR, maximum=S2V_MAX_AREA, profile_limit="max_area"),
    Field("frames_per_clip", "integer", "s2v-14B: frames generated per clip, a multiple of 4 (the first clip "
          "shows 3 fewer); null: the preset's, else 80", nullable=True, minimum=4,
          maximum=S2V_MAX_FRAMES_PER_CLIP, step=4),
    Field("num_clips", "integer", "s2v-14B: clips to generate, at most what the audio gives (one per "
          "frames_per_clip / fps seconds of audio, plus one); null: all of them", nullable=True, minimum=1,
          maximum=S2V_MAX_CLIPS),
    *ENCODING_OPTIONS,
    *POSTPROCESS_OPTIONS,
    Field("loras", "array", "LoRAs applied in this order, each {name, scale}; for the A14B models a LoRA's high "
          "part goes to the high-noise expert, its low part to the low-noise expert (README: LoRAs)",
          nullable=True, fields=LORA, max_items=MAX_LORAS, profile_limit="max_loras"),
    Field("cache", "object", "step caching, trading quality for speed (the result's metadata records the method, "
          "its settings and the passes skipped); null: the preset's (none unless the profile names one)",
          nullable=True, fields=CACHE_FIELDS),
)

# Video-to-video (an uploaded `video`, or POST /api/v1/promote/{job_id}): the share of the steps re-run
# from the video's noised latents, as diffusers' WanVideoToVideoPipeline takes it: the first
# steps - int(steps x strength) steps are skipped (the last one always runs: strength_start).
DEFAULT_STRENGTH = 0.8
PROMOTE_STRENGTH = 0.6  # a promote keeps more of the draft it re-renders
STRENGTH = Field("strength", "number", "video-to-video only (with `video`, or a promote): how much of the video is "
                 "re-generated, 0 < strength <= 1; the job runs the last int(steps x strength) steps (at least one) "
                 "from the video's latents noised to the first of them; null: 0.8 (0.6 for a promote)",
                 nullable=True, minimum=0.01, maximum=1.0)

REQUEST: tuple[Field, ...] = (
    Field("prompt", "string", "what the video shows", required=True, max_length=MAX_PROMPT_CHARS, nonblank=True),
    Field("negative_prompt", "string", "what it should not show", nullable=True, max_length=MAX_PROMPT_CHARS),
    Field("model", "string", "a model id or its alias", required=True, enum=(*MODELS, *ALIASES)),
    Field("quality_preset", "string", "what the job resolves to before custom_options", default=DEFAULT_PRESET,
          enum=PRESETS),
    Field("quality", "string", "alias of quality_preset (quality_preset wins if both)", enum=PRESETS),
    Field("seed", "integer", "null or absent: a random seed (the result's metadata has it)", nullable=True,
          minimum=0, maximum=MAX_SEED),
    Field("n", "integer", "variants: n jobs, one per seed seed..seed+n-1 (a random first seed without `seed`), "
          "created together under one group_id; at most the profile's [admission] max_variants", default=1,
          minimum=1, maximum=MAX_VARIANTS, profile_limit="max_variants"),
    Field("priority", "integer", "higher runs first", default=0, minimum=-10, maximum=10),
    STRENGTH,
    Field("custom_options", "object", "overrides of the preset", nullable=True, fields=OPTIONS),
    Field("webhook_url", "string", "POSTed the job's final state (video.completed, video.failed, video.cancelled), "
          "signed as Standard Webhooks says; a host not in the server's [webhooks] allowed_hosts, or a private, "
          "loopback or link-local address it does not list, is refused (422 WEBHOOK_NOT_ALLOWED)",
          nullable=True, max_length=MAX_URL_CHARS, pattern=WEBHOOK_URL_PATTERN,
          pattern_hint="an http:// or https:// URL"),
)

REQUEST_FIELDS: dict[str, Field] = {f.name: f for f in REQUEST}

# POST /api/v1/promote/{job_id}: re-render a finished job at a higher preset from its own frames.
# The prompt, negative prompt, model, seed, LoRAs, frames, fps and encoding are the parent's unless
# given here; num_frames, duration and fps stay the parent's (the frames come from its video).
PROMOTE_FIXED_OPTIONS: tuple[str, ...] = ("num_frames", "duration", "fps")
PROMOTE: tuple[Field, ...] = (
    Field("quality_preset", "string", "the preset to re-render at: one above the parent's", required=True,
          enum=PRESETS),
    Field("strength", "number", "how much of the parent's video is re-generated, 0 < strength <= 1 (see the "
          "generate request's strength)", nullable=True, default=PROMOTE_STRENGTH, minimum=0.01, maximum=1.0),
    Field("prompt", "string", "null or absent: the parent's prompt", nullable=True, max_length=MAX_PROMPT_CHARS,
          nonblank=True),
    Field("negative_prompt", "string", "null or absent: the parent's", nullable=True, max_length=MAX_PROMPT_CHARS),
    Field("priority", "integer", "higher runs first", default=0, minimum=-10, maximum=10),
    Field("custom_options", "object", "overrides of the new preset, as in generate (loras replace the parent's; "
          "num_frames, duration and fps are the parent's and refused here); null: the parent's LoRAs and encoding",
          nullable=True, fields=OPTIONS),
    Field("webhook_url", "string", "as in generate", nullable=True, max_length=MAX_URL_CHARS,
          pattern=WEBHOOK_URL_PATTERN, pattern_hint="an http:// or https:// URL"),
)
PROMOTE_FIELDS: dict[str, Field] = {f.name: f for f in PROMOTE}
OPTION_FIELDS: dict[str, Field] = {f.name: f for f in OPTIONS}

# GET /api/v1/jobs
JOB_STATUSES: tuple[str, ...] = ("queued", "processing", "completed", "failed", "cancelled")
LIST_QUERY: tuple[Field, ...] = (
    Field("status", "string", "only jobs with this status", enum=JOB_STATUSES),
    Field("group_id", "string", "only the jobs of this group (the n variants of one request)", max_length=64),
    Field("limit", "integer", "jobs per page", default=20, minimum=1, maximum=100),
    Field("offset", "integer", "jobs to skip", default=0, minimum=0, maximum=10**9),
)


# ---- checking a value against its field --------------------------------------------------------

def _bad(where: str, message: str, **details: Any) -> ValidationError:
    return ValidationError(message, {"field": where, **details})


def check(spec: Field, value: Any, where: str | None = None, *, maximum: float | None = None) -> Any:
    """`value` if `spec` allows it (a number as float, an integer as int; None for a nullable field
    given null), else a ValidationError whose details name the field (`where`, default its name).
    `maximum` narrows the field's own maximum (a profile's limit); it never widens it."""
    where = where or spec.name
    if value is None and spec.nullable:
        return None
    if spec.enum:
        if not isinstance(value, str) or value not in spec.enum:
            raise _bad(where, f"unknown {where} {str(value)[:32]!r}", allowed=list(spec.enum))
        return value
    if spec.kind == "string":
        return _check_text(spec, value, where)
    if spec.kind == "boolean":
        if not isinstance(value, bool):
            raise _bad(where, f"{where} must be true or false", got=type(value).__name__)
        return value
    if spec.kind == "object":
        if not isinstance(value, dict):
            raise _bad(where, f"{where} must be an object", got=type(value).__name__)
        return value
    if spec.kind == "array":
        return _check_array(spec, value, where, maximum)
    if spec.kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        raise _bad(where, f"{where} must be an integer", got=type(value).__name__)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(where, f"{where} must be a number", got=type(value).__name__)
    lo, hi = bounds(spec, maximum)
    if not lo <= value <= hi:
        raise _bad(where, f"{where} must be between {lo} and {hi}, got {value}", min=lo, max=hi)
    if spec.step and (value - lo) % spec.step:
        raise _bad(where, f"{where} must be {spec.step}n+{lo} ({lo + spec.step}, {lo + 2 * spec.step}, ...), "
                          f"got {value}")
    return value if spec.kind == "integer" else float(value)


def check_cache(value: Any, where: str = "custom_options.cache") -> dict[str, Any] | None:
    """A cache option normalised ({method, and that method's keys with their defaults}), None for
    none; a ValidationError naming the bad key otherwise."""
    if not isinstance(value, dict):
        raise _bad(where, f"{where} must be an object", got=type(value).__name__)
    if "method" not in value:
        raise _bad(f"{where}.method", f"{where}.method is required", allowed=list(CACHE_METHODS))
    method = check(CACHE_FIELD_BY_NAME["method"], value["method"], f"{where}.method")
    keys = CACHE_KEYS[method]
    unknown = sorted(set(value) - {"method", *keys})
    if unknown:
        raise _bad(where, f"{where} with method {method} takes no {', '.join(unknown)[:100]}",
                   allowed=["method", *keys])
    if method == "none":
        return None
    out: dict[str, Any] = {"method": method}
    for key in keys:
        spec = CACHE_FIELD_BY_NAME[key]
        out[key] = check(spec, value.get(key, spec.default), f"{where}.{key}")
    return out


def bounds(spec: Field, maximum: float | None = None) -> tuple[int | float, int | float]:
    """A numeric field's (minimum, maximum), the maximum narrowed by `maximum` if given."""
    if spec.minimum is None or spec.maximum is None:
        raise ValueError(f"field {spec.name} has no bounds")
    hi = spec.maximum if maximum is None else min(spec.maximum, maximum)
    return spec.minimum, hi


def _check_array(spec: Field, value: Any, where: str, maximum: float | None) -> list[dict[str, Any]]:
    """A list of objects of `spec.fields`, each field checked (defaults filled in); `maximum` narrows max_items."""
    if not isinstance(value, list):
        raise _bad(where, f"{where} must be an array", got=type(value).__name__)
    limit = spec.max_items if maximum is None or spec.max_items is None else min(spec.max_items, int(maximum))
    if limit is not None and len(value) > limit:
        raise _bad(where, f"{where} may hold at most {limit} items, got {len(value)}", max=limit)
    items = []
    known = {f.name: f for f in spec.fields}
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise _bad(at, f"{at} must be an object", got=type(item).__name__)
        unknown = sorted(set(item) - set(known))
        if unknown:
            raise _bad(at, f"{at} has unknown field(s): {', '.join(unknown)[:200]}", fields=unknown[:20])
        checked = {}
        for f in spec.fields:
            if f.name not in item and f.required:
                raise _bad(f"{at}.{f.name}", f"{at}.{f.name} is required")
            checked[f.name] = check(f, item.get(f.name, f.default), f"{at}.{f.name}")
        items.append(checked)
    return items


def _check_text(spec: Field, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, f"{where} must be a string", got=type(value).__name__)
    if spec.nonblank and not value.strip():
        raise _bad(where, f"{where} is empty")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise _bad(where, f"{where} is longer than {spec.max_length} characters", max=spec.max_length, got=len(value))
    if spec.pattern is not None and not re.search(spec.pattern, value):
        raise _bad(where, f"{where} must be {spec.pattern_hint}, got {value[:32]!r}")
    return value


def s2v_size(width: int, height: int, max_area: int) -> tuple[int, int]:
    """The (width, height) of an S2V video from a reference image of `width` x `height`: the largest
    scale of the image (never above 1) whose sides, each rounded up to a multiple of 64, fit in
    `max_area` pixels, tried from the largest scale down in 100 steps as the official code does
    (the image is then scaled to cover that size and centre-cropped)."""
    d = S2V_SIZE_DIVISOR
    area = width * height
    if area <= max_area:
        low, high = 0.1, 1.0
    else:  # the smallest scale at which even the most padding fits, and the scale with none
        b, c = (d - 1) * (height + width), (d - 1) ** 2 - max_area
        low = (-b + math.sqrt(b * b - 2 * area * c)) / (2 * area)
        high = math.sqrt(max_area / area)
    for i in range(100):
        scale = high - (high - low) * i / 100
        w, h = int(width * scale), int(height * scale)
        w, h = w + (d - w % d) % d, h + (d - h % d) % d
        if w * h <= max_area:
            return w, h
    aspect = width / height  # nothing fitted: the aspect on the divisor's grid, never above the image
    w, h = int((max_area * aspect) ** 0.5 // d * d), int((max_area / aspect) ** 0.5 // d * d)
    if w >= width or h >= height:
        w, h = width // d * d, height // d * d
    return w, h


def s2v_audio_samples(samples: int, sample_rate: int) -> int:
    """How many samples `samples` at `sample_rate` become at 16 kHz: ceil(n x ratio), computed in
    floating point as librosa.resample's length fix (and common/audio.py's) computes it."""
    if sample_rate == S2V_AUDIO_RATE:
        return samples
    return math.ceil(samples * (float(S2V_AUDIO_RATE) / sample_rate))


def s2v_clips(samples: int, sample_rate: int, frames_per_clip: int = S2V_FRAMES_PER_CLIP, fps: int = 16) -> int:
    """The clips an audio of `samples` at `sample_rate` gives, as the official code counts them:
    wav2vec2's 50 Hz frames of the 16 kHz audio, interpolated to 30 Hz, over the 30 Hz frames of
    one clip, plus one (so the last clip reaches past the audio; its frames there get zero audio)."""
    n = s2v_audio_samples(samples, sample_rate)
    for kernel, stride in WAV2VEC2_CONV:
        n = (n - kernel) // stride + 1 if n >= kernel else 0
    frames30 = int(n / 50.0 * S2V_FEATURE_RATE)
    return int(frames30 / (frames_per_clip * (S2V_FEATURE_RATE / fps))) + 1


def s2v_frames(frames_per_clip: int, clips: int) -> int:
    """The video frames of `clips` clips: clip 0 drops its first S2V_DROPPED_FRAMES."""
    return frames_per_clip * clips - S2V_DROPPED_FRAMES


def strength_start(steps: int, strength: float) -> int:
    """The first step a video-to-video job of `steps` at `strength` runs (the steps before it are
    skipped), as diffusers' WanVideoToVideoPipeline.get_timesteps picks it: steps - int(steps x strength),
    except that the last step always runs (where int(steps x strength) is 0 the pipeline has no
    timestep to noise to and fails)."""
    return steps - max(1, min(int(steps * strength), steps))


def video_interval(video_fps: float | None, fps: int) -> int:
    """Every how many frames of a video at `video_fps` one frame of a job at `fps` is taken: the
    video's frames 0, k, 2k, ... with k = round(video_fps / fps), at least 1 (an unknown rate: 1)."""
    return max(1, round(video_fps / fps)) if video_fps else 1


def video_frames(frames: int, video_fps: float | None, fps: int) -> int:
    """The frames a video of `frames` frames at `video_fps` gives a job at `fps` (video_interval)."""
    k = video_interval(video_fps, fps)
    return (frames + k - 1) // k


def round_frames(frames: float) -> int:
    """The nearest 4n+1 frame count."""
    return max(1, round((frames - 1) / 4) * 4 + 1)


def _self_check() -> None:
    """What the tables must hold for the readers to work; run at import, so a bad edit fails at once."""
    assert len(ALIASES) == len(CATALOG) and not set(ALIASES) & set(MODELS), "aliases must be unique"
    for model in CATALOG:
        assert {name for name, _ in model.inputs} <= set(INPUTS), f"{model.id} takes an input INPUTS lacks"
    for spec in (*REQUEST, *OPTIONS, *LIST_QUERY, *LORA, *CACHE_FIELDS, *PROMOTE):
        if spec.kind in ("integer", "number"):
            lo, hi = bounds(spec)
            assert lo <= hi and (spec.default is None or lo <= spec.default <= hi), spec.name
        assert spec.kind == "string" or not (spec.enum or spec.pattern or spec.max_length), spec.name
        assert (spec.kind == "array") == (spec.max_items is not None), spec.name
        assert not (spec.nonblank and spec.pattern), f"{spec.name}: nonblank is a pattern of its own"
    assert set(PRESET_OPTIONS.values()) <= set(OPTION_FIELDS) and DEFAULT_PRESET in PRESETS


_self_check()
