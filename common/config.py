"""Configuration: one TOML file (a deployment profile) plus environment overrides.

The file is chosen by `--config PATH`, else `$WAN_SERVER_CONFIG`, else the `tiny` profile shipped in
`common/profiles/`. Any key can be overridden from the environment as
`WAN_SERVER__<SECTION>__<KEY>[__<KEY>...]=value` (the value is parsed as a TOML value when it
parses, else taken as a string), e.g. `WAN_SERVER__RUNTIME__STATE_DIR=/tmp/wan`.

Relative paths in the file are taken from the project root, so every process agrees on them
whatever its working directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common import catalog
from common.errors import ConfigError
from common.wire import Limits  # msgpack only: the wire module imports torch where tensors are coded

if TYPE_CHECKING:
    from common.curve import CurveKeys

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ENV_PREFIX = "WAN_SERVER__"
ENV_CONFIG = "WAN_SERVER_CONFIG"

STAGE_KINDS = ("text_encoder", "dit", "vae", "muxer")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Weights stored in these and cast layer by layer to the compute dtype (diffusers' layerwise casting).
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# Quantized compute of a DiT's transformer-block matmuls (torchao, dynamic activations and weights):
# fp8 on Hopper/Ada (CUDA capability 8.9+), int8 on Ampere (8.0+) or the CPU.
QUANTIZED_COMPUTE = ("fp8", "int8")
# torch.compile backends a DiT stage may use: inductor generates kernels; aot_eager and eager trace only.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
MAX_IPC_PATH = 100  # sockaddr_un allows 107 bytes; keep a margin


def profile_path(name: str) -> Path:
    return PROFILES_DIR / f"{name}.toml"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            # Section names may contain '-' (model names); env vars spell them with '_'.
            match = next((k for k in node if k.lower().replace("-", "_") == part), part)
            node = node.setdefault(match, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key} overrides a value that is not a section", {"env": key})
        leaf = next((k for k in node if k.lower().replace("-", "_") == path[-1]), path[-1])
        node[leaf] = _parse_env_value(raw)


# ---- typed sections ----
# Each section of the file is one frozen dataclass; its field defaults are the only defaults. A key
# that no field names, or a value of the wrong type, stops startup with CONFIG_ERROR naming the
# file, the section and the key.


@dataclass(frozen=True)
class RuntimeSection:
    state_dir: str = "var"
    socket_dir: str | None = None  # default <state_dir>/sock
    results_dir: str | None = None  # default <state_dir>/results
    spool_dir: str | None = None  # default <state_dir>/spool
    model_cache_dir: str | None = None  # default <state_dir>/models
    record_dir: str | None = None  # record every stage's wire traffic for replay
    fault_dir: str | None = None  # tests only: fault injection files
    checkpoint_kinds: tuple[str, ...] = ("dit", "vae")
    torch_threads: int = 0
    heartbeat_interval_s: float = 1.0
    forward_timeout_s: float = 60.0
    hwm: int = 16
    report_hwm: int = 1000
    # Same-host (ipc://) hand-offs of at least shm_min_bytes of tensors go through shared memory
    # (common/shm.py): segments in <shm_dir>/<receiving stage>/, at most shm_pool_bytes of them per
    # sender and destination, kept and reused. shm_dir: default /dev/shm/wan-<uid>-<hash of socket_dir>.
    shared_memory: bool = True
    shm_dir: str | None = None
    shm_min_bytes: int = 1 << 20
    shm_pool_bytes: int = 4 << 30
    shutdown_linger_s: float = 1.0  # how long queued reports and forwarded jobs get to leave at a stop
    log_level: str = "INFO"


@dataclass(frozen=True)
class WatchdogSection:
    heartbeat_timeout_s: float = 5.0  # no heartbeat for this long: the stage is dead or stopped
    progress_timeout_s: float = 120.0  # a stage holding a job with no report for this long is wedged
    progress_factor: float = 3.0  # ... or for this many times its measured time per report, if longer
    kill: bool = True  # SIGKILL a wedged stage (supervisord restarts it)


@dataclass(frozen=True)
class DefaultsSection:
    """What the driver uses for options it is not given."""

    steps: int = 4
    height: int = 64
    width: int = 64
    num_frames: int = 9
    fps: int = 16
    guidance_scale: float = 4.0
    max_sequence_length: int = 512


@dataclass(frozen=True)
class AdmissionSection:
    max_queued: int = 100
    max_inflight_per_route: int = 4
    max_steps: int = 100
    max_variants: int = 8  # the most `n` of one generate request (n jobs, seeds seed..seed+n-1)
    max_attempts: int = 3
    memory_check: bool = True
    # GiB a job may use per device (one for all, or by device).
    memory_budget_gib: float | dict[str, float] | None = None


@dataclass(frozen=True)
class GatewaySection:
    host: str = "127.0.0.1"
    port: int = 8001
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 2 << 20
    max_image_pixels: int = 4096 * 4096
    max_audio_bytes: int = 32 << 20  # an input audio file (s2v): WAV, FLAC, MP3, OGG/Opus or M4A/AAC
    max_audio_seconds: float = 60.0  # its duration, counted while it is decoded
    max_video_bytes: int = 32 << 20  # an input video: s2v's pose video (MP4, WebM), video-to-video's (also MKV)
    max_video_frames: int = 2000  # its frames, counted while it is decoded (each within max_image_pixels)
    max_concurrent_decodes: int = 2
    auth: str = "auto"
    allowed_origins: tuple[str, ...] = ()
    rate_limit_per_minute: int = 600
    max_active_jobs_per_key: int = 20
    ws_queue_size: int = 10_000  # events queued for one WebSocket client; a client that lets it fill is dropped
    ws_close_timeout_s: float = 10.0  # how long a dropped client gets to take its close frame
    snapshot_page_size: int = 100  # jobs per broker `list` call when a subscriber's snapshot is built
    listener_restart_s: float = 0.5  # first backoff before a dead broker listener is restarted (doubles, max 10 s)


@dataclass(frozen=True)
class WebhooksSection:
    """Job-final webhooks (broker/webhooks.py). With no secret or no allowed host, every `webhook_url` is refused."""

    secret: str | None = None  # Standard Webhooks: "whsec_" + base64 of 24-64 random bytes; signs every delivery
    allowed_hosts: tuple[str, ...] = ()  # "hooks.example.com", "*.example.com", "*" (any public host), "10.0.0.0/8"
    timeout_s: float = 15.0  # one attempt, from connect to the status line
    retry_window_s: float = 86400.0  # failed attempts are retried for this long after the job's final state
    backoff_initial_s: float = 5.0  # the wait after the first failed attempt; doubles after each
    backoff_max_s: float = 3600.0  # the longest wait between two attempts


@dataclass(frozen=True)
class PreviewsSection:
    """Live previews: the DiT stage projects its x0 prediction to RGB and writes a small image."""

    enabled: bool = True
    interval_s: float = 1.0  # at most one preview per this many seconds (0: every step); always at the
    # expert hand-off and the last step
    format: str = "jpeg"  # jpeg | webp
    frames: int = 4  # latent frames shown side by side (evenly spaced, first to last); 1: the middle one
    quality: int = 80  # encoder quality, 1..100


PREVIEW_FORMATS = ("jpeg", "webp")


@dataclass(frozen=True)
class LorasSection:
    """LoRA files a request may name (`custom_options.loras`; broker/loras.py lists them, stages/lora.py loads them)."""

    dir: str | None = None  # default <state_dir>/loras; *.safetensors only (a pickle is listed as refused)
    max_resident: int = 4  # adapters a DiT process keeps loaded per expert; the least recently used is unloaded
    min_scale: float = -2.0  # bounds of a request's LoRA scale, within the catalog's
    max_scale: float = 2.0
    max_per_job: int = 4  # LoRAs one request may name (at most max_resident)


@dataclass(frozen=True)
class NetworkSection:
    curve_keys_dir: str | None = None


@dataclass(frozen=True)
class ServingSection:
    models: tuple[str, ...] | None = None  # None: every [models.*] entry


@dataclass(frozen=True)
class HardwareSection:
    device_memory_gib: dict[str, float] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One `[models.<id>]` entry: where its weights are and what this profile allows of it."""

    name: str
    path: str | None = None
    layout: str | None = None  # "diffusers" | "official"; None: detected from the folder
    tiny: bool = False  # build a tiny random-initialised model (tests, the tiny profile)
    tiny_shape: str | None = None  # which tiny model to build (default: the model id)
    seed: int = 0
    resolutions: tuple[str, ...] = ()
    max_frames: int = 121
    boundary_ratio: float | None = None  # None: the checkpoint's own
    flow_shift: float | None = None  # None: the checkpoint's scheduler config
    split_fraction: float = 0.5  # one expert: where the two DiT processes split its steps
    # A step-distillation LoRA (a name in the LoRA folder) the draft preset runs with (broker/distill.py).
    distill_lora: str | None = None
    # "dmd": the checkpoint is a few-step DMD distillation (FastWan-style TI2V-5B): every preset of
    # the model samples at `dmd_timesteps` (broker/distill.py, stages/schedule.py DmdSampler).
    sampler: str | None = None
    dmd_timesteps: tuple[int, ...] = (1000, 757, 522)
    # S2V: pixel frames of the motion window re-encoded for the next clip (the release's 73; a tiny
    # model may use fewer, so its VAE passes stay small).
    motion_frames: int = 73
    # A TAEHV tiny decoder's weights (taew2_1 for the Wan2.1 VAE, taew2_2 for Wan2.2; .pth or
    # .safetensors) the DiT stages decode live previews with, instead of the latent-to-RGB projection
    # (stages/taehv.py). Checked against the model's VAE at stage startup (MODEL_LOAD_ERROR).
    preview_decoder: str | None = None


@dataclass(frozen=True)
class StageSpec:
    """One `[stages.<name>]` entry. Which keys a stage may set depends on its kind (`STAGE_KEYS`)."""

    name: str
    kind: str
    device: str = "cpu"
    dtype: str = "float32"
    storage_dtype: str | None = None  # weights stored in fp8, cast layer by layer to `dtype`
    compute_dtype: str | None = None  # dit: "fp8" | "int8" quantized block matmuls (torchao); None: in `dtype`
    # dit: torch.compile of the repeated transformer block, warmed up at startup (stages/compilation.py)
    compile: bool = False
    compile_backend: str = "inductor"  # "aot_eager" / "eager": no code generation (tests)
    compile_dynamic: bool = True  # symbolic token counts (every size); false: a static graph per preset size
    compile_cache_dir: str | None = None  # inductor's caches; default <model_cache_dir>/torch-compile
    attention: str = "auto"
    models: tuple[str, ...] | None = None  # None: every served model
    address_space_headroom_mib: int | None = None  # cap RLIMIT_AS at the size after setup plus this
    part: str = "all"  # dit: "high" | "low" | "all"
    # dit: compatible jobs (same model, size, schedule and step position) denoised as one batch of up
    # to this many (stages/batching.py); 1: one job at a time
    max_batch: int = 1
    batch_wait_ms: int = 20  # dit with max_batch > 1: the longest a job waits for company after it arrives
    vae_tiling: bool = False  # vae
    vae_dtype: str = "float32"  # text_encoder: the VAE that encodes input images
    vae_device: str | None = None  # text_encoder: None: the stage's device
    crf: int = 18  # muxer: H.264's crf, unless the job gives one
    preset: str = "medium"  # muxer (x264 and x265 preset)
    crf_h265: int = 22  # muxer: HEVC's crf, unless the job gives one
    crf_av1: int = 32  # muxer: AV1's crf (0..63), unless the job gives one
    av1_preset: int = 8  # muxer: SVT-AV1 speed preset, 0 (slowest) .. 13
    audio_bitrate: int = 192_000  # muxer: the AAC bit rate of a speech-to-video job's audio track
    # muxer: a RIFE v4.25/v4.26 flownet.pkl / .pth / .safetensors (stages/rife.py), run on `device`;
    # None: interpolation is minterpolate only (a request for RIFE is refused at submit)
    rife_weights: str | None = None
    # muxer: an upscale model, SRVGGNetCompact or RRDBNet (Real-ESRGAN's .pth / .safetensors;
    # stages/upscale.py), run on `device` in tiles of `upscale_tile` input pixels with
    # `upscale_tile_overlap` pixels of context; None: upscaling is Lanczos only
    upscale_weights: str | None = None
    upscale_tile: int = 512
    upscale_tile_overlap: int = 32


_COMMON_STAGE_KEYS = {"kind", "device", "dtype", "storage_dtype", "attention", "models", "address_space_headroom_mib"}
STAGE_KEYS: dict[str, set[str]] = {
    "text_encoder": _COMMON_STAGE_KEYS | {"vae_dtype", "vae_device"},
    "dit": _COMMON_STAGE_KEYS | {"part", "compute_dtype", "compile", "compile_backend", "compile_dynamic",
                                 "compile_cache_dir", "max_batch", "batch_wait_ms"},
    "vae": _COMMON_STAGE_KEYS | {"vae_tiling"},
    "muxer": _COMMON_STAGE_KEYS | {"crf", "preset", "crf_h265", "crf_av1", "av1_preset", "audio_bitrate",
                                   "rife_weights", "upscale_weights", "upscale_tile", "upscale_tile_overlap"},
}
DIT_PARTS = ("high", "low", "all")
MODEL_LAYOUTS = ("diffusers", "official")
SAMPLERS = ("dmd",)  # [models.<id>] sampler: a distilled checkpoint's own sampler (broker/distill.py)
AUTH_MODES = ("auto", "required", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_T = TypeVar("_T")


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(value fits `hint`, value converted: lists to tuples, ints to floats)."""
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return type(None) in args, None
        for arg in args:
            if arg is not type(None):
                ok, converted = _type_ok(value, arg)
                if ok:
                    return True, converted
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, converted = _type_ok(item, args[0])
            if not ok:
                return False, value
            out.append(converted)
        return True, tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        out_d = {}
        for k, v in value.items():
            ok, converted = _type_ok(v, args[1])
            if not isinstance(k, str) or not ok:
                return False, value
            out_d[k] = converted
        return True, out_d
    raise TypeError(f"unsupported config field type {hint!r}")


def _type_name(hint: Any) -> str:
    """`hint` in words, for error messages: "an integer", "a list of strings or none"."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return f"a table of {_type_name(args[1]).split(' ', 1)[1]}s"
    return str(hint)


def build_section(cls: type[_T], table: Any, source: Path | None, section: str, allowed: set[str] | None = None,
                  **fixed: Any) -> _T:
    """`cls` from one TOML table, every key and type checked; `fixed` are fields not read from the file."""
    where = {"file": str(source) if source else "<memory>", "section": section}
    if not isinstance(table, dict):
        raise ConfigError(f"{where['file']}: [{section}] must be a table", where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(fixed)  # type: ignore[arg-type]
    known = names if allowed is None else names & allowed
    values: dict[str, Any] = dict(fixed)
    for key, value in table.items():
        if key not in known:
            hint = f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{where['file']}: [{section}] has unknown key {key!r}{hint}", {**where, "key": key})
        ok, converted = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(
                f"{where['file']}: [{section}] {key} = {value!r} is not {_type_name(hints[key])}",
                {**where, "key": key, "value": repr(value)[:80]},
            )
        values[key] = converted
    return cls(**values)


def _choice(value: Any, allowed: tuple[str, ...], source: Path | None, section: str, key: str) -> None:
    if value not in allowed:
        where = {"file": str(source) if source else "<memory>", "section": section, "key": key}
        raise ConfigError(f"{where['file']}: [{section}] {key} = {value!r} is not one of {list(allowed)}",
                          {**where, "value": repr(value)[:80], "allowed": list(allowed)})


def _check_previews(section: PreviewsSection, source: Path | None) -> None:
    bounds = {"interval_s": (section.interval_s, 0.0, 3600.0), "frames": (section.frames, 1, 16),
              "quality": (section.quality, 1, 100)}
    for key, (value, low, high) in bounds.items():
        if not low <= value <= high:
            where = {"file": str(source) if source else "<memory>", "section": "previews", "key": key}
            raise ConfigError(f"{where['file']}: [previews] {key} = {value!r} must be within {low}..{high}", where)


TOP_LEVEL = ("runtime", "watchdog", "limits", "defaults", "admission", "gateway", "network", "serving",
             "hardware", "webhooks", "previews", "loras", "endpoints", "models", "presets", "routes", "stages")


class Config:
    """A loaded profile. Read-only after load; every process builds its own from the same file."""

    def __init__(self, data: dict[str, Any], source: Path | None = None):
        self.data = data
        self.source = source
        for key in data:
            if key not in TOP_LEVEL:
                raise ConfigError(f"{self._file}: unknown section [{key}]; known: {', '.join(TOP_LEVEL)}",
                                  {"file": self._file, "section": key})
        self.runtime = build_section(RuntimeSection, data.get("runtime", {}), source, "runtime")
        self.watchdog = build_section(WatchdogSection, data.get("watchdog", {}), source, "watchdog")
        # [limits] is the wire decoder's own Limits: one dataclass, one set of defaults.
        self.limits = build_section(Limits, data.get("limits", {}), source, "limits")
        self.defaults = build_section(DefaultsSection, data.get("defaults", {}), source, "defaults")
        self.admission = build_section(AdmissionSection, data.get("admission", {}), source, "admission")
        self.gateway = build_section(GatewaySection, data.get("gateway", {}), source, "gateway")
        self.network = build_section(NetworkSection, data.get("network", {}), source, "network")
        self.serving = build_section(ServingSection, data.get("serving", {}), source, "serving")
        self.hardware = build_section(HardwareSection, data.get("hardware", {}), source, "hardware")
        self.webhooks = build_section(WebhooksSection, data.get("webhooks", {}), source, "webhooks")
        self.previews = build_section(PreviewsSection, data.get("previews", {}), source, "previews")
        _choice(self.previews.format, PREVIEW_FORMATS, source, "previews", "format")
        _check_previews(self.previews, source)
        self.loras = build_section(LorasSection, data.get("loras", {}), source, "loras")
        _choice(self.gateway.auth, AUTH_MODES, source, "gateway", "auth")
        _choice(self.runtime.log_level.upper(), LOG_LEVELS, source, "runtime", "log_level")
        self.endpoints: dict[str, str] = self._string_table("endpoints")
        self.models: dict[str, ModelSpec] = {}
        for name, table in self._tables("models").items():
            spec = build_section(ModelSpec, table, source, f"models.{name}", name=name)
            if spec.layout is not None:
                _choice(spec.layout, MODEL_LAYOUTS, source, f"models.{name}", "layout")
            if spec.sampler is not None:
                _choice(spec.sampler, SAMPLERS, source, f"models.{name}", "sampler")
                ts = spec.dmd_timesteps
                if not ts or any(not 0 < t <= 1000 for t in ts) or list(ts) != sorted(set(ts), reverse=True):
                    raise ConfigError(f"{self._file}: [models.{name}] dmd_timesteps must be decreasing, in 1..1000",
                                      {"file": self._file, "section": f"models.{name}", "key": "dmd_timesteps"})
                if spec.distill_lora is not None:
                    raise ConfigError(f"{self._file}: [models.{name}] sets both sampler and distill_lora",
                                      {"file": self._file, "section": f"models.{name}"})
            self.models[name] = spec
        self.stages: dict[str, StageSpec] = {}
        for name, table in self._tables("stages").items():
            kind = table.get("kind", name)
            _choice(kind, STAGE_KINDS, source, f"stages.{name}", "kind")
            self.stages[name] = self._stage(name, kind, {k: v for k, v in table.items() if k != "kind"})
        # Preset names and keys are checked here; their values against the catalog's bounds by admission.
        self.presets: dict[str, dict[str, dict[str, Any]]] = {}
        for model, table in self._tables("presets").items():
            self.presets[model] = {}
            for preset, values in self._tables(f"presets.{model}", table).items():
                where = {"file": self._file, "section": f"presets.{model}"}
                if preset not in catalog.PRESETS:
                    raise ConfigError(f"{self._file}: [presets.{model}] has unknown preset {preset!r}; known: "
                                      f"{', '.join(catalog.PRESETS)}", {**where, "key": preset})
                for key in values:
                    if key not in catalog.PRESET_FIELDS:
                        raise ConfigError(f"{self._file}: [presets.{model}] {preset} has unknown key {key!r}; known "
                                          f"keys: {', '.join(sorted(catalog.PRESET_FIELDS))}",
                                          {**where, "key": f"{preset}.{key}"})
                self.presets[model][preset] = dict(values)
        self.routes: dict[str, list[str]] = {}
        for model, route in self._tables("routes", allow_lists=True).items():
            ok, converted = _type_ok(route, tuple[str, ...])
            if not ok or not converted:
                raise ConfigError(f"{self._file}: [routes] {model} must be a non-empty list of stage names",
                                  {"file": self._file, "section": "routes", "key": model})
            self.routes[model] = list(converted)
        self._validate()

    @property
    def _file(self) -> str:
        return str(self.source) if self.source else "<memory>"

    def _tables(self, section: str, table: Any = None, allow_lists: bool = False) -> dict[str, Any]:
        value = self.data.get(section, {}) if table is None else table
        if not isinstance(value, dict) or not all(
            isinstance(v, dict) or (allow_lists and isinstance(v, list)) for v in value.values()
        ):
            raise ConfigError(f"{self._file}: [{section}] must hold tables", {"file": self._file, "section": section})
        return value

    def _string_table(self, section: str) -> dict[str, str]:
        ok, converted = _type_ok(self.data.get(section, {}), dict[str, str])
        if not ok:
            raise ConfigError(f"{self._file}: [{section}] values must be strings",
                              {"file": self._file, "section": section})
        return dict(converted)

    def _stage(self, name: str, kind: str, table: dict[str, Any]) -> StageSpec:
        section = f"stages.{name}"
        spec = build_section(StageSpec, table, self.source, section, allowed=STAGE_KEYS[kind], name=name, kind=kind)
        for key in ("device", "vae_device"):
            value = getattr(spec, key)
            if value is not None and not DEVICE_PATTERN.match(value):
                _choice(value, ("cpu", "cuda", "cuda:N"), self.source, section, key)
        _choice(spec.dtype, COMPUTE_DTYPES, self.source, section, "dtype")
        _choice(spec.vae_dtype, COMPUTE_DTYPES, self.source, section, "vae_dtype")
        if spec.storage_dtype is not None:
            _choice(spec.storage_dtype, STORAGE_DTYPES, self.source, section, "storage_dtype")
        if spec.compute_dtype is not None:
            _choice(spec.compute_dtype, QUANTIZED_COMPUTE, self.source, section, "compute_dtype")
            if spec.storage_dtype is not None:
                where = {"file": str(self.source) if self.source else "<memory>", "section": section}
                raise ConfigError(f"{where['file']}: [{section}] sets both storage_dtype and compute_dtype: quantized "
                                  "compute stores its own weights (int8 or fp8); choose one", where)
        _choice(spec.compile_backend, COMPILE_BACKENDS, self.source, section, "compile_backend")
        if spec.compile and spec.storage_dtype is not None:
            where = {"file": str(self.source) if self.source else "<memory>", "section": section}
            raise ConfigError(f"{where['file']}: [{section}] sets both compile and storage_dtype: layerwise casting "
                              "hooks every Linear layer, which the compiled blocks do not take; choose one "
                              "(compute_dtype quantizes and compiles)", where)
        _choice(spec.attention, ATTENTION_BACKENDS, self.source, section, "attention")
        _choice(spec.part, DIT_PARTS, self.source, section, "part")
        for key, low in (("max_batch", 1), ("batch_wait_ms", 0)):
            if getattr(spec, key) < low:
                where = {"file": self._file, "section": section, "key": key}
                raise ConfigError(f"{self._file}: [{section}] {key} = {getattr(spec, key)} must be at least {low}",
                                  where)
        return spec

    # ---- loading ----
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
        environ = dict(os.environ if environ is None else environ)
        chosen = Path(path) if path else Path(environ[ENV_CONFIG]) if environ.get(ENV_CONFIG) else profile_path("tiny")
        if not chosen.is_absolute():
            chosen = (Path.cwd() / chosen).resolve()
        try:
            data = tomllib.loads(chosen.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist", {"path": str(chosen)}) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {chosen} is not valid TOML: {exc}", {"path": str(chosen)}) from None
        _apply_env(data, environ)
        return cls(data, chosen)

    def _validate(self) -> None:
        served = self.serving.models
        if served is not None:
            unknown = [name for name in served if name not in self.models]
            if unknown:
                raise ConfigError(f"{self._file}: [serving] models names undefined model(s) {unknown}",
                                  {"file": self._file, "section": "serving", "key": "models", "models": unknown})
        for model, route in self.routes.items():
            for stage in route:
                if stage not in self.stages:
                    raise ConfigError(f"{self._file}: route of {model!r} names unknown stage {stage!r}",
                                      {"file": self._file, "section": "routes", "key": model})
        for name, spec in self.stages.items():
            for model in spec.models or ():
                if model not in self.models:
                    raise ConfigError(f"{self._file}: [stages.{name}] models names undefined model {model!r}",
                                      {"file": self._file, "section": f"stages.{name}", "key": "models"})
        lo, hi = catalog.bounds(catalog.LORA_FIELDS["scale"])
        loras = self.loras
        for key, ok in (("min_scale", lo <= loras.min_scale <= loras.max_scale),
                        ("max_scale", loras.min_scale <= loras.max_scale <= hi),
                        ("max_resident", loras.max_resident >= 1),
                        ("max_per_job", 1 <= loras.max_per_job <= min(loras.max_resident, catalog.MAX_LORAS))):
            if not ok:
                raise ConfigError(f"{self._file}: [loras] {key} = {getattr(loras, key)!r} is out of bounds (scales "
                                  f"within {lo}..{hi}, min <= max; 1 <= max_per_job <= max_resident, "
                                  f"{catalog.MAX_LORAS})", {"file": self._file, "section": "loras", "key": key})

    # ---- derived values ----
    def path(self, value: str | os.PathLike[str]) -> Path:
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else PROJECT_ROOT / p

    def _dir(self, value: str | None, default: str) -> Path:
        return self.path(value) if value else self.state_dir / default

    @property
    def state_dir(self) -> Path:
        return self.path(self.runtime.state_dir)

    @property
    def results_dir(self) -> Path:
        return self._dir(self.runtime.results_dir, "results")

    @property
    def spool_dir(self) -> Path:
        """Per-job working files (`<spool_dir>/<job_id>/`): uploaded inputs, DiT hand-off checkpoints.
        The broker removes a job's folder once the job is final."""
        return self._dir(self.runtime.spool_dir, "spool")

    def job_spool(self, job_id: str) -> Path:
        return self.spool_dir / job_id

    @property
    def lora_dir(self) -> Path:
        return self._dir(self.loras.dir, "loras")

    @property
    def socket_dir(self) -> Path:
        return self._dir(self.runtime.socket_dir, "sock")

    @property
    def shm_dir(self) -> Path:
        """Shared-memory segments of same-host hand-offs (`common/shm.py`), one folder per receiving
        stage. The default is in /dev/shm (RAM; the temp folder where there is none), named for
        this deployment's socket folder."""
        if self.runtime.shm_dir:
            return self.path(self.runtime.shm_dir)
        digest = hashlib.sha256(str(self.socket_dir.resolve()).encode()).hexdigest()[:12]
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        return base / f"wan-{os.getuid()}-{digest}"

    @property
    def model_cache_dir(self) -> Path:
        return self._dir(self.runtime.model_cache_dir, "models")

    @property
    def torch_threads(self) -> int:
        return self.runtime.torch_threads

    @property
    def log_level(self) -> str:
        return self.runtime.log_level.upper()

    @property
    def heartbeat_interval(self) -> float:
        return self.runtime.heartbeat_interval_s

    def stage(self, name: str) -> StageSpec:
        spec = self.stages.get(name)
        if spec is None:
            raise ConfigError(f"no stage named {name!r} in the config", {"stage": name, "stages": sorted(self.stages)})
        return spec

    def stage_names(self) -> list[str]:
        return list(self.stages)

    def model(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise ConfigError(f"model {name!r} is not served by this profile",
                              {"model": name, "models": sorted(self.models)})
        return spec

    def model_names(self) -> list[str]:
        """The models this server serves: `[serving] models` when set, else every `[models.*]` entry.

        A profile can describe more models than it loads (their paths, resolutions, presets), and
        pick what fits its cards in `[serving]`; the stages load only the served ones."""
        served = self.serving.models
        return list(self.models) if served is None else [name for name in served if name in self.models]

    def defined_model_names(self) -> list[str]:
        return list(self.models)

    def stage_models(self, spec: StageSpec) -> list[str]:
        """The models a stage loads: its `models`, else every served model."""
        return list(spec.models) if spec.models is not None else self.model_names()

    def route(self, model: str) -> list[str]:
        route = self.routes.get(model, self.routes.get("default"))
        if not route:
            raise ConfigError(f"no route for model {model!r}", {"model": model})
        return list(route)

    def curve_keys(self) -> CurveKeys | None:
        """The deployment's CURVE keys (`[network] curve_keys_dir`), or None when not configured."""
        keys_dir = self.network.curve_keys_dir
        if not keys_dir:
            return None
        from common.curve import CurveKeys

        return CurveKeys.load(self.path(keys_dir))

    def endpoint(self, name: str) -> str:
        """The address the named peer binds: a stage name, or `reports`."""
        configured = self.endpoints.get(name)
        if configured:
            return configured
        path = self.socket_dir / f"{name}.sock"
        if len(str(path)) > MAX_IPC_PATH:
            raise ConfigError(
                f"ipc socket path {path} is longer than {MAX_IPC_PATH} bytes; "
                "set runtime.socket_dir to a shorter folder",
                {"path": str(path)},
            )
        return f"ipc://{path}"


def load_or_exit(path: str | os.PathLike[str] | None = None) -> Config:
    """`Config.load` for a process's main(): a bad profile stops startup with one CONFIG_ERROR line
    (naming the file, section and key) on stderr and exit status 2, not a traceback."""
    import sys

    try:
        return Config.load(path)
    except ConfigError as exc:
        print(f"CONFIG_ERROR: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
