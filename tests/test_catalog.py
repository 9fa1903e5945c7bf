"""The API contract holds together: the OpenAPI document (generated from common/catalog.py), admission
and the driver agree on which fields a request has and on every bound.

The schema side is checked with a real JSON Schema validator (jsonschema_rs, the one schemathesis
uses), the admission side by calling `admission.resolve` on a profile: so a field or a bound that
one of them changes without the other fails here, without starting the system.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from broker import admission
from broker.driver import default_params, validate_params
from common import catalog
from common import messages as m
from common.config import PROFILES_DIR, Config, profile_path
from common.errors import ConfigError, ServerError, ValidationError
from gateway.openapi import openapi_document

DOC = openapi_document(auth=False)
BODY = DOC["paths"]["/api/v1/generate"]["post"]["requestBody"]["content"]
JSON_SCHEMA = BODY["application/json"]["schema"]
# What reaches admission: the JSON body less its input files (the gateway takes those out), which is
# also the multipart `request` part.
REQUEST_SCHEMA = BODY["multipart/form-data"]["schema"]["properties"]["request"]
OPTIONS_SCHEMA = REQUEST_SCHEMA["properties"]["custom_options"]
IMAGE = "ab" * 32  # an image's SHA-256, for the models that need one
BASE = {"prompt": "a cat", "model": "t2v"}


def tiny() -> Config:
    return Config.load(profile_path("tiny"), environ={})


@pytest.fixture(scope="module")
def ceiling(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The tiny profile with its limits raised to the catalog's: every schema bound is then admissible."""
    text = (PROFILES_DIR / "tiny.toml").read_text()
    raised = re.sub(r"^max_frames = 33$", f"max_frames = {catalog.MAX_FRAMES}", text, flags=re.MULTILINE)
    raised = re.sub(r"^max_steps = \d+$", f"max_steps = {catalog.MAX_STEPS}", raised, flags=re.MULTILINE)
    raised = re.sub(r"^max_variants = \d+", f"max_variants = {catalog.MAX_VARIANTS}", raised, flags=re.MULTILINE)
    assert raised.count(f"max_frames = {catalog.MAX_FRAMES}") == 3
    path = tmp_path_factory.mktemp("profile") / "ceiling.toml"
    path.write_text(raised)
    config = Config.load(path, environ={})
    admission.check_presets(config)
    return config


def schema_valid(schema: dict[str, Any], instance: Any) -> bool:
    return bool(jsonschema_rs.validator_for(schema).is_valid(instance))


def refused(config: Config, request: dict[str, Any], field: str, image: str | None = None,
            video: dict[str, Any] | None = None) -> ValidationError:
    """Admission refuses `request` with a structured VALIDATION_ERROR naming `field`."""
    with pytest.raises(ValidationError) as info:
        admission.resolve(config, request, image_sha256=image, video=video)
    err = info.value
    body = err.to_dict()
    assert body["success"] is False and set(body["error"]) == {"code", "message", "details"}
    assert err.code == "VALIDATION_ERROR" and err.http_status == 422, body
    assert err.details.get("field") == field, body
    return err


def with_option(name: str, value: Any) -> dict[str, Any]:
    # duration is seconds at the request's fps, interpolate_fps must be above it: at 1 fps their whole
    # range is admissible.
    options = {"fps": 1, name: value} if name in ("duration", "interpolate_fps") else {name: value}
    return {**BASE, "custom_options": options}


# A video-to-video input as the broker describes it (JobParams.video).
VIDEO = {"file": "video.mp4", "sha256": "0" * 64, "format": "mp4", "width": 64, "height": 32, "frames": 241,
         "fps": 16}


def with_field(name: str, value: Any) -> dict[str, Any]:
    return {**BASE, name: value}


def numeric(properties: dict[str, Any]) -> list[str]:
    def kinds(p: dict[str, Any]) -> set[str]:
        t = p["type"]
        return {t} if isinstance(t, str) else set(t)

    return [name for name, p in properties.items() if kinds(p) & {"integer", "number"}]


def past(schema: dict[str, Any], side: str) -> int | float:
    """One past the bound on `side` ("minimum" or "maximum"): the next integer, or the next double."""
    bound = schema[side]
    if "integer" in schema["type"]:
        return bound - 1 if side == "minimum" else bound + 1
    return math.nextafter(bound, -math.inf if side == "minimum" else math.inf)


# ---- the fields -----------------------------------------------------------------------------------

def unknown_to_admission(config: Config, request: dict[str, Any], name: str) -> bool:
    try:
        admission.resolve(config, request)
    except ValidationError as exc:
        return name in exc.details.get("fields", [])
    return False


# Names a request might plausibly carry: the schema's, the job's own parameter names, the preset keys.
CANDIDATES = {*REQUEST_SCHEMA["properties"], *OPTIONS_SCHEMA["properties"], *catalog.PRESET_FIELDS,
              *(f.name for f in dataclasses.fields(m.JobParams)), "image", "quality_presets", "Steps"}


def test_admission_accepts_exactly_the_fields_of_the_schema():
    """Every field admission accepts is in the schema and every schema field is accepted (the review
    found `custom_options.shift` accepted by admission and missing from the document)."""
    config = tiny()
    top = {n for n in CANDIDATES if not unknown_to_admission(config, with_field(n, 1), n)}
    options = {n for n in CANDIDATES if not unknown_to_admission(config, with_option(n, 1), n)}
    assert top == set(REQUEST_SCHEMA["properties"])
    assert options == set(OPTIONS_SCHEMA["properties"])
    assert REQUEST_SCHEMA["additionalProperties"] is False and OPTIONS_SCHEMA["additionalProperties"] is False
    assert set(REQUEST_SCHEMA["required"]) == {"prompt", "model"}
    for name in REQUEST_SCHEMA["required"]:
        request = dict(BASE)
        del request[name]
        refused(config, request, name)
        assert not schema_valid(JSON_SCHEMA, request)


def test_a_request_with_every_field_is_admitted_and_schema_valid():
    config = tiny()
    request = {
        "prompt": "a cat", "negative_prompt": "blur", "model": "ti2v", "quality_preset": "pro", "quality": "draft",
        "seed": 7, "priority": 3, "webhook_url": "https://hooks.example.com/wan?token=1", "n": 2,
        "strength": 0.5,  # video-to-video's: admitted with the video below
        "custom_options": {"steps": 3, "cfg_scale": 4.5, "cfg_scale_2": 2.0, "shift": 3.0, "resolution": "64x32",
                           "fps": 12, "duration": 1.0, "num_frames": 13, "codec": "h265", "crf": 20, "bit_depth": 10,
                           "lossless_master": True, "interpolate_fps": 24, "upscale": 2.0, "upscale_to": "1080p",
                           "interpolate_method": "minterpolate", "upscale_method": "lanczos", "loras": [],
                           "cache": {"method": "first_block", "threshold": 0.1},
                           # s2v-14B's (checked, unused by ti2v): tests/test_s2v_upload.py resolves them
                           "max_area": 4096, "frames_per_clip": 8, "num_clips": 1},
    }
    assert set(request) == set(REQUEST_SCHEMA["properties"])
    assert set(request["custom_options"]) == set(OPTIONS_SCHEMA["properties"])
    assert schema_valid(JSON_SCHEMA, request) and schema_valid(JSON_SCHEMA, {**request, "image": "aGk="})
    video = {"file": "video.mp4", "sha256": "0" * 64, "format": "mp4", "width": 64, "height": 32, "frames": 30,
             "fps": 12}
    preset, p, priority = admission.resolve(config, request, video=video)
    assert (preset, priority, p.model, p.seed, p.negative_prompt) == ("pro", 3, "ti2v-5B", 7, "blur")
    assert (p.strength, p.video) == (0.5, video)
    assert (p.steps, p.guidance_scale, p.guidance_scale_2, p.shift, p.width, p.height, p.fps, p.num_frames) == \
        (3, 4.5, 2.0, 3.0, 64, 32, 12, 13)  # num_frames wins over duration
    assert p.encoding == {"codec": "h265", "crf": 20, "bit_depth": 10, "lossless_master": True}
    assert p.postprocess == {"interpolate_fps": 24, "upscale_to": "1080p",  # upscale_to wins over upscale
                             "interpolate_method": "minterpolate", "upscale_method": "lanczos"}


@pytest.mark.parametrize("name", ["negative_prompt", "seed", "custom_options"])
def test_null_is_absent_for_admission_and_schema(name):
    config = tiny()
    assert schema_valid(JSON_SCHEMA, with_field(name, None))
    _, p, _ = admission.resolve(config, with_field(name, None))
    _, q, _ = admission.resolve(config, BASE)
    assert dataclasses.replace(p, seed=0) == dataclasses.replace(q, seed=0)


@pytest.mark.parametrize("name", ["shift", "cfg_scale_2"])
def test_null_option_means_the_models_own(name):
    assert schema_valid(JSON_SCHEMA, with_option(name, None))
    _, p, _ = admission.resolve(tiny(), with_option(name, None))
    assert getattr(p, {"shift": "shift", "cfg_scale_2": "guidance_scale_2"}[name]) is None


@pytest.mark.parametrize("value", [[], False, 0, "", "steps=4"])
def test_custom_options_must_be_an_object(value):
    assert not schema_valid(JSON_SCHEMA, with_field("custom_options", value))
    refused(tiny(), with_field("custom_options", value), "custom_options")


# ---- the bounds -----------------------------------------------------------------------------------

NUMERIC = [("field", n) for n in numeric(REQUEST_SCHEMA["properties"])] + \
          [("option", n) for n in numeric(OPTIONS_SCHEMA["properties"])]


def test_every_number_has_both_bounds_in_the_schema():
    """So the fuzzer tries one past each (the review found steps and num_frames without a maximum)."""
    assert {n for _, n in NUMERIC} == {"seed", "n", "priority", "strength", "steps", "cfg_scale", "cfg_scale_2",
                                      "shift", "fps", "duration", "num_frames", "crf", "bit_depth", "interpolate_fps",
                                      "upscale", "max_area", "frames_per_clip", "num_clips"}
    for where, name in NUMERIC:
        schema = prop(where, name)
        assert isinstance(schema.get("minimum"), (int, float)) and isinstance(schema.get("maximum"), (int, float)), name
        assert schema["minimum"] < schema["maximum"], name


@pytest.mark.parametrize("where,name", NUMERIC, ids=[n for _, n in NUMERIC])
@pytest.mark.parametrize("side", ["minimum", "maximum"])
def test_each_bound_is_admitted_and_one_past_is_refused(ceiling, where, name, side):
    schema = prop(where, name)
    build, path = (with_field, name) if where == "field" else (with_option, f"custom_options.{name}")
    at, beyond = build(name, schema[side]), build(name, past(schema, side))
    assert schema_valid(JSON_SCHEMA, at) and not schema_valid(JSON_SCHEMA, beyond)
    video = VIDEO if name == "strength" else None  # strength is video-to-video's
    admission.resolve(ceiling, at, video=video)
    err = refused(ceiling, beyond, path, video=video)
    assert (err.details["min"], err.details["max"]) == (schema["minimum"], schema["maximum"])


@pytest.mark.parametrize("where,name", NUMERIC, ids=[n for _, n in NUMERIC])
@pytest.mark.parametrize("value", ["1", True, None, [1]])
def test_a_number_of_the_wrong_type_is_refused(ceiling, where, name, value):
    schema = prop(where, name)
    if value is None and "null" in schema["type"]:
        return  # null is absent: covered above
    build, path = (with_field, name) if where == "field" else (with_option, f"custom_options.{name}")
    assert not schema_valid(JSON_SCHEMA, build(name, value))
    refused(ceiling, build(name, value), path)


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_text_at_its_length_limit_is_admitted_one_more_character_is_refused(name):
    config, limit = tiny(), REQUEST_SCHEMA["properties"][name]["maxLength"]
    assert limit == 2000
    at, beyond = with_field(name, "é" * limit), with_field(name, "é" * (limit + 1))  # characters, not bytes
    assert schema_valid(JSON_SCHEMA, at) and not schema_valid(JSON_SCHEMA, beyond)
    admission.resolve(config, at)
    assert refused(config, beyond, name).details["max"] == limit


@pytest.mark.parametrize("prompt", ["", " ", "\t\n "])
def test_a_blank_prompt_is_refused_by_both(prompt):
    assert not schema_valid(JSON_SCHEMA, with_field("prompt", prompt))
    refused(tiny(), with_field("prompt", prompt), "prompt")


def test_every_enum_value_is_admitted_and_others_are_refused():
    config = tiny()
    props = REQUEST_SCHEMA["properties"]
    for name in ("quality_preset", "quality"):
        for value in props[name]["enum"]:
            assert schema_valid(JSON_SCHEMA, with_field(name, value))
            assert admission.resolve(config, with_field(name, value))[0] == value
        assert not schema_valid(JSON_SCHEMA, with_field(name, "epic"))
        refused(config, with_field(name, "epic"), "quality_preset")
    served = set(config.model_names())
    for value in props["model"]["enum"]:
        full = catalog.canonical(value)
        assert full is not None and schema_valid(JSON_SCHEMA, with_field("model", value))
        if full not in served:
            with pytest.raises(ServerError) as info:
                admission.resolve(config, with_field("model", value))
            assert info.value.code == "MODEL_NOT_SERVED"
            continue
        image = IMAGE if catalog.BY_ID[full].takes("image") == "required" else None
        # s2v-14B (served by the tiny profile) needs its audio: one second of it.
        audio = {"samples": 16000, "sample_rate": 16000} if catalog.BY_ID[full].takes("audio") == "required" else None
        assert admission.resolve(config, with_field("model", value), image_sha256=image, audio=audio)[1].model == full
    assert not schema_valid(JSON_SCHEMA, with_field("model", "sora"))
    refused(config, with_field("model", "sora"), "model")


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
def test_every_profile_stays_within_the_schema(name):
    """A profile narrows the schema, never widens it: its resolutions match the schema's pattern, its
    steps and frames are within the schema's maxima, and what it allows is admitted."""
    config = Config.load(profile_path(name), environ={})
    pattern = OPTIONS_SCHEMA["properties"]["resolution"]["pattern"]
    assert admission.max_steps(config) <= OPTIONS_SCHEMA["properties"]["steps"]["maximum"]
    for model in config.defined_model_names():
        assert admission.max_frames(config, model) <= OPTIONS_SCHEMA["properties"]["num_frames"]["maximum"]
        for res in admission.supported_resolutions(config, model):
            assert re.search(pattern, res), (model, res)


def test_the_profile_narrows_steps_frames_and_resolutions():
    config = tiny()
    steps, frames = admission.max_steps(config), admission.max_frames(config, "t2v-A14B")
    assert (steps, frames) == (100, 33) and frames < OPTIONS_SCHEMA["properties"]["num_frames"]["maximum"]
    admission.resolve(config, with_option("num_frames", frames))
    err = refused(config, with_option("num_frames", frames + 4), "custom_options.num_frames")
    assert err.details["max"] == frames
    assert schema_valid(JSON_SCHEMA, with_option("num_frames", frames + 4))  # the schema allows it; this profile not
    refused(config, with_option("num_frames", 10), "custom_options.num_frames")  # 4n+1
    for res in admission.supported_resolutions(config, "t2v-A14B"):
        assert admission.resolve(config, with_option("resolution", res))[1].width == int(res.split("x")[0])
    for res in ("640x480", "0x32", "32x32\n", "32X32"):
        refused(config, with_option("resolution", res), "custom_options.resolution")
    assert not schema_valid(JSON_SCHEMA, with_option("resolution", "0x32"))


@pytest.mark.parametrize("edit,key", [
    (("max_frames = 33", f"max_frames = {catalog.MAX_FRAMES + 4}"), "max_frames"),
    (("max_frames = 33", "max_frames = 31"), "max_frames"),
    (("max_steps = 100", f"max_steps = {catalog.MAX_STEPS + 1}"), "max_steps"),
    (('resolutions = ["32x32", "64x32"', 'resolutions = ["32x32", "64 x 32"'), "resolutions"),
    (("num_frames = 9, fps = 24, guidance_scale = 5.0 }", "num_frames = 9, fps = 61, guidance_scale = 5.0 }"),
     "preset"),
    (("num_frames = 9, fps = 24, guidance_scale = 5.0 }", "num_frames = 9, fps = 24, guidance_scale = 25.0 }"),
     "preset"),
])
def test_a_profile_beyond_the_schema_does_not_start(tmp_path: Path, edit, key):
    text = (PROFILES_DIR / "tiny.toml").read_text()
    assert edit[0] in text
    path = tmp_path / "p.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as info:
        admission.check_presets(Config.load(path, environ={}))
    assert info.value.code == "CONFIG_ERROR"
    assert key in info.value.details or key in info.value.details.values(), info.value.details


# ---- the driver -----------------------------------------------------------------------------------

# JobParams field -> the request-schema field whose bounds it keeps.
DRIVER_BOUNDS = {
    "seed": ("field", "seed"), "steps": ("option", "steps"), "num_frames": ("option", "num_frames"),
    "fps": ("option", "fps"), "guidance_scale": ("option", "cfg_scale"), "guidance_scale_2": ("option", "cfg_scale_2"),
    "shift": ("option", "shift"),
}


def prop(where: str, name: str) -> dict[str, Any]:
    return (REQUEST_SCHEMA if where == "field" else OPTIONS_SCHEMA)["properties"][name]


@pytest.mark.parametrize("name", sorted(DRIVER_BOUNDS))
@pytest.mark.parametrize("side", ["minimum", "maximum"])
def test_the_driver_keeps_the_schemas_bounds(name, side):
    """The driver bypasses admission (it feeds stages directly) but holds a job to the same bounds
    (it had its own: seeds to 2^63-1, 1000 steps, 120 fps)."""
    config, schema = tiny(), prop(*DRIVER_BOUNDS[name])
    p = default_params(config, "t2v-A14B", prompt="x", **{name: schema[side]})
    assert getattr(p, name) == schema[side]
    with pytest.raises(ValidationError) as info:
        validate_params(config, dataclasses.replace(p, **{name: past(schema, side)}))
    assert info.value.details["field"] == name and info.value.code == "VALIDATION_ERROR"


def test_the_driver_keeps_the_schemas_text_rules():
    config, limit = tiny(), REQUEST_SCHEMA["properties"]["prompt"]["maxLength"]
    p = default_params(config, "t2v-A14B", prompt="x" * limit, negative_prompt="y" * limit)
    for field, value in (("prompt", " "), ("prompt", "x" * (limit + 1)), ("negative_prompt", "y" * (limit + 1))):
        with pytest.raises(ValidationError) as info:
            validate_params(config, dataclasses.replace(p, **{field: value}))
        assert info.value.details["field"] == field
    with pytest.raises(ValidationError):
        validate_params(config, dataclasses.replace(p, num_frames=10))  # 4n+1


# ---- the document as a whole ----------------------------------------------------------------------

def test_document_structure_is_kept():
    """Routes, error bodies and security as before the schema was generated."""
    doc = openapi_document(auth=True)
    assert doc["security"] == [{"bearer": []}] and "security" not in DOC
    generate = doc["paths"]["/api/v1/generate"]["post"]
    assert {"202", "400", "401", "403", "413", "415", "422", "429", "503"} <= set(generate["responses"])
    error = generate["responses"]["422"]["content"]["application/json"]["schema"]
    assert error["required"] == ["success", "error"] and error["properties"]["error"]["required"] == \
        ["code", "message", "details"]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert set(BODY["multipart/form-data"]["schema"]["required"]) == {"request"}  # and a file part: image, audio, ...
    assert set(BODY["multipart/form-data"]["schema"]["properties"]) == {"request", "image", "audio", "pose_video",
                                                                       "video"}
    assert JSON_SCHEMA["properties"]["image"]["type"] == ["string", "null"]  # "image": null is no image
    jobs = {p["name"]: p["schema"] for p in doc["paths"]["/api/v1/jobs"]["get"]["parameters"]}
    assert (jobs["limit"]["minimum"], jobs["limit"]["maximum"], jobs["offset"]["minimum"]) == (1, 100, 0)
    assert set(jobs["status"]["enum"]) == {"queued", "processing", "completed", "failed", "cancelled"}
    # generating it twice gives the same document, and generating never edits the catalog's tables
    assert copy.deepcopy(DOC) == openapi_document(auth=False)


def test_catalog_describes_which_models_take_an_image():
    assert {x.id: x.takes("image") for x in catalog.CATALOG} == \
        {"t2v-A14B": "none", "i2v-A14B": "required", "ti2v-5B": "optional", "s2v-14B": "required"}
    assert {x.id: (x.takes("audio"), x.takes("pose_video")) for x in catalog.CATALOG} == \
        {"t2v-A14B": ("none", "none"), "i2v-A14B": ("none", "none"), "ti2v-5B": ("none", "none"),
         "s2v-14B": ("required", "optional")}
    assert {x.id: x.takes("video") for x in catalog.CATALOG} == \
        {"t2v-A14B": "optional", "i2v-A14B": "none", "ti2v-5B": "optional", "s2v-14B": "none"}
    config = tiny()
    refused(config, {**BASE, "model": "i2v"}, "image")
    refused(config, BASE, "image", image=IMAGE)
    assert admission.resolve(config, {**BASE, "model": "ti2v"}, image_sha256=IMAGE)[1].image_sha256 == IMAGE
    description = JSON_SCHEMA["properties"]["image"]["description"]
    assert "required by i2v-A14B" in description and "optional for ti2v-5B" in description
