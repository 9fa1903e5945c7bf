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
}

CATALOG: tuple[Model, ...] = (
    Model("t2v-A14B", "t2v", "text to video, two 14B experts (high and low noise)"),
    Model("i2v-A14B", "i2v", "image to video, two 14B experts", inputs=(("image", "required"),)),
    Model("ti2v-5B", "ti2v", "text to video, or text and image to video, one 5B model",
          inputs=(("image", "optional"),)),
    # S2V takes an image and a speech track; its inputs are declared here when it is served.
    Model("s2v-14B", "s2v", "speech to video (not served yet)"),
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
# Post-processing a preset may ask for. Carried with the job and recorded in the MP4's metadata;
# nothing applies them yet (the video keeps the preset's fps and resolution).
POSTPROCESS_FIELDS: tuple[str, ...] = ("interpolate_fps", "upscale")
# A preset row's keys, and the custom option that overrides each (whose bounds the row must keep).
PRESET_OPTIONS: dict[str, str] = {
    "steps": "steps", "guidance_scale": "cfg_scale", "guidance_scale_2": "cfg_scale_2", "shift": "shift",
    "resolution": "resolution", "num_frames": "num_frames", "fps": "fps", "cache": "cache",
}
PRESET_REQUIRED: tuple[str, ...] = ("steps", "guidance_scale", "resolution", "num_frames", "fps")
PRESET_FIELDS: frozenset[str] = frozenset({*PRESET_OPTIONS, *POSTPROCESS_FIELDS})


# ---- the generate request ----------------------------------------------------------------------

Kind = Literal["string", "integer", "number", "object"]


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
    fields: tuple[Field, ...] = ()  # an object's fields
    # The profile narrows this bound at run time: "max_steps" ([admission] max_steps), "max_variants"
    # ([admission] max_variants), "max_frames"
    # ([models.<id>] max_frames) or "resolutions" ([models.<id>] resolutions).
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
    Field("num_frames", "integer", "4n+1 (5, 9, 13, ...), at most the model's max_frames in this profile",
          minimum=1, maximum=MAX_FRAMES, step=4, profile_limit="max_frames"),
    Field("cache", "object", "step caching, trading quality for speed (the result's metadata records the method, "
          "its settings and the passes skipped); null: the preset's (none unless the profile names one)",
          nullable=True, fields=CACHE_FIELDS),
)

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
    Field("custom_options", "object", "overrides of the preset", nullable=True, fields=OPTIONS),
    Field("webhook_url", "string", "POSTed the job's final state (video.completed, video.failed, video.cancelled), "
          "signed as Standard Webhooks says; a host not in the server's [webhooks] allowed_hosts, or a private, "
          "loopback or link-local address it does not list, is refused (422 WEBHOOK_NOT_ALLOWED)",
          nullable=True, max_length=MAX_URL_CHARS, pattern=WEBHOOK_URL_PATTERN,
          pattern_hint="an http:// or https:// URL"),
)

REQUEST_FIELDS: dict[str, Field] = {f.name: f for f in REQUEST}
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
    if spec.kind == "object":
        if not isinstance(value, dict):
            raise _bad(where, f"{where} must be an object", got=type(value).__name__)
        return value
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


def round_frames(frames: float) -> int:
    """The nearest 4n+1 frame count."""
    return max(1, round((frames - 1) / 4) * 4 + 1)


def _self_check() -> None:
    """What the tables must hold for the readers to work; run at import, so a bad edit fails at once."""
    assert len(ALIASES) == len(CATALOG) and not set(ALIASES) & set(MODELS), "aliases must be unique"
    for model in CATALOG:
        assert {name for name, _ in model.inputs} <= set(INPUTS), f"{model.id} takes an input INPUTS lacks"
    for spec in (*REQUEST, *OPTIONS, *LIST_QUERY, *CACHE_FIELDS):
        if spec.kind in ("integer", "number"):
            lo, hi = bounds(spec)
            assert lo <= hi and (spec.default is None or lo <= spec.default <= hi), spec.name
        assert spec.kind == "string" or not (spec.enum or spec.pattern or spec.max_length), spec.name
        assert not (spec.nonblank and spec.pattern), f"{spec.name}: nonblank is a pattern of its own"
    assert set(PRESET_OPTIONS.values()) <= set(OPTION_FIELDS) and DEFAULT_PRESET in PRESETS


_self_check()
