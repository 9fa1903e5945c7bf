"""Every message that crosses a socket, in one module.

A message is a dataclass deriving from `Message`; its class name is its wire type. The header
carries `v` (wire version), `type`, and the dataclass fields; tensors anywhere in the fields travel
as out-of-band frames (see `common.wire`). `decode` checks the type name, the presence and type of
every field, and refuses fields it does not know, raising a typed `WireError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from common import wire
from common.errors import FieldError, MalformedHeader, UnknownMessageType

if TYPE_CHECKING:
    from torch import Tensor

    from common.shm import SharedReceiver
else:

    class Tensor:
        """What a tensor field is annotated with, so the decoder can tell it without importing torch
        (the gateway and the broker never load it); `_check` accepts a real torch.Tensor there."""


@dataclass
class Message:
    registry: ClassVar[dict[str, type[Message]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Message.registry[cls.__name__] = cls

    @property
    def type_name(self) -> str:
        return type(self).__name__


# --- job parameters (resolved before the job enters the pipeline) -------------------------------


@dataclass
class JobParams:
    """Everything that decides the frames of a job; carried by every job message."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    height: int
    width: int
    num_frames: int
    fps: int
    guidance_scale: float
    guidance_scale_2: float | None = None
    max_sequence_length: int = 512
    # The scheduler's flow shift; None keeps the model's own (its scheduler config).
    shift: float | None = None
    # Post-processing the preset or custom_options ask for (`interpolate_fps`, `upscale` or
    # `upscale_to`), applied by the muxer (stages/postprocess.py).
    postprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    # How the muxer encodes (`codec`, `crf`, `bit_depth`, `lossless_master`; catalog.ENCODING_OPTIONS);
    # absent keys: H.264, the muxer's configured crf, 8-bit, no master.
    encoding: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The conditioning image (image-to-video): SHA-256 of the PNG the broker stored in the job's
    # spool folder (`<spool>/<job_id>/image.png`); None for text-only jobs.
    image_sha256: str | None = None
    # LoRAs, in the order applied: {name, scale, parts: {expert: {file, sha256}}}, where expert is
    # `transformer` (the high-noise one for A14B) or `transformer_2`, and file is relative to the
    # [loras] folder (broker/loras.py resolves a request's names; stages/lora.py loads them).
    loras: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Step caching in the DiT stages (stages/caching.py): {method, and its keys} as admission
    # normalised it (common/catalog.py CACHE_FIELDS); None computes every pass.
    cache: dict[str, Any] | None = None
    # The noise levels of a distilled sampler (broker/distill.py), before `shift`: one Euler
    # flow-matching step each (stages/schedule.py), or with `sampler` "dmd" one DMD step each;
    # None: UniPC over `steps`.
    sigmas: list[float] | None = None
    sampler: str | None = None
    # Speech to video (s2v-14B). `audio`: the job's audio as the gateway received it, stored by the
    # broker in the job's spool folder under `file` (`audio.<ext>`): {file, sha256, format,
    # sample_rate, channels, samples, duration_s, start_s}, where `start_s` is the time of the audio
    # that the video's frame 0 shows (catalog.S2V_DROPPED_FRAMES / fps): the muxer's AAC track starts
    # there. `pose_video`: {file (`pose.<ext>`), sha256, format, width, height, frames, fps}, or None.
    # `num_frames` is the video's frames_per_clip x num_clips - 3 (catalog.s2v_frames).
    audio: dict[str, Any] | None = None
    pose_video: dict[str, Any] | None = None
    frames_per_clip: int = 0
    num_clips: int = 0
    # Video-to-video (an uploaded video, or a promote of a finished job): `video` is the file the
    # broker stored in the job's spool folder, {file (`video.<ext>`), sha256, format, width, height,
    # frames, fps}, and for a promote `parent_job_id` and `source` (lossless_master | mp4); the
    # text_encoder takes the job's fps from it every catalog.video_interval-th frame, the first
    # `num_frames`, fits them to the job's size and VAE-encodes them. `strength`: the share of the
    # steps re-run from those latents noised to the start step (catalog.strength_start); None
    # without a video.
    video: dict[str, Any] | None = None
    strength: float | None = None


# --- job messages: each carries the job through one hop of its route -----------------------------


@dataclass
class JobMessage(Message):
    """Base of the messages that move a job along its route. `stage_kind` is the kind of stage
    that takes it: a job goes to the next stage of that kind on its route (so a DiT that ran every
    step sends the latents straight to the VAE).

    What a stage returns depends only on what it received (no clocks, no counters), so a recorded
    message replays to the same bytes; timings travel in StageReports instead.
    """

    # Declared here, set by each subclass: not a field, and unset on the base (never sent itself).
    stage_kind: ClassVar[str]
    # True for the message that starts a job's next clip (S2V): when no stage of its kind follows
    # the sender on the route, it goes to the first one on the route (the route's DiT..VAE cycle).
    starts_cycle: ClassVar[bool] = False

    job_id: str
    attempt: int
    route: list[str]
    params: JobParams


@dataclass
class EncodeJob(JobMessage):
    """Driver/broker -> text_encoder: encode the prompts, and VAE-encode the conditioning image.

    `image_path` is the job's input image (a PNG the broker wrote into the job's spool folder),
    for image-to-video models; None for text-only jobs.
    """

    stage_kind: ClassVar[str] = "text_encoder"

    image_path: str | None = None
    # S2V: the job's audio and pose video (files the broker wrote into the job's spool folder).
    audio_path: str | None = None
    pose_path: str | None = None
    # Video-to-video: the job's input video (in the job's spool folder).
    video_path: str | None = None


@dataclass
class DenoiseJob(JobMessage):
    """text_encoder -> dit, and dit -> dit at the expert hand-off.

    `latents` and `scheduler_state` are absent on the first DiT hop; `step` is the index of the next
    denoising step to run.

    Image-conditioned jobs carry what diffusers' `WanImageToVideoPipeline.prepare_latents` returns
    besides the noise (float32): for I2V-A14B `condition` is the 4-channel frame mask concatenated
    with the 16 normalised condition latents, `(1, 20, f, h, w)`, joined to the noise on the channel
    axis at every step; for TI2V-5B `condition` is the normalised latent of the first frame
    `(1, z, 1, h, w)` and `first_frame_mask` `(1, 1, f, h, w)` is 0 on the first latent frame, 1
    elsewhere (it masks the latents and the per-token timesteps).
    """

    stage_kind: ClassVar[str] = "dit"

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    latents: Tensor | None = None
    scheduler_state: dict[str, Any] | None = None
    step: int = 0
    condition: Tensor | None = None
    first_frame_mask: Tensor | None = None
    # Video-to-video, first DiT hop only: the input video's normalised VAE latents `(1, z, f, h, w)`
    # (float32), which the first DiT noises to the strength's start step with the seed's noise
    # (as WanVideoToVideoPipeline.prepare_latents); later hops carry `latents` instead.
    video_latents: Tensor | None = None


@dataclass
class ClipConditions:
    """What conditions every clip of an S2V job, computed once by the text_encoder stage and
    carried by each clip message (float32 unless said): the prompt embeddings (the negative one
    with guidance), the reference image's normalised VAE latent `(1, 16, 1, h, w)`, the wav2vec2
    features per video frame of this clip and every later one `(1, 25, 1024, frames)` (the first
    `frames_per_clip` frames are this clip's; the finished clips' are dropped as the job goes on),
    and, with a pose video, its normalised latents of this clip and the later ones
    `(1, 16, latent frames per clip x clips left, h, w)`."""

    prompt_embeds: Tensor
    ref_latents: Tensor
    audio_features: Tensor
    negative_prompt_embeds: Tensor | None = None
    pose_latents: Tensor | None = None


@dataclass
class ClipDenoiseJob(JobMessage):
    """S2V: denoise clip `clip` (0-based, of `params.num_clips`).

    text_encoder -> dit (clip 0); dit -> dit at the hand-off within a clip (with `latents`, the
    whole UniPC state and `step`, as DenoiseJob); vae -> dit for the next clip (the route's cycle:
    `starts_cycle`), carrying the motion latents the VAE encoded from the last frames of the clip
    before. `motion_latents` is the normalised latent of the motion frames `(1, 16, m, h, w)`
    (clip 0: of the zero frames the reference starts from). `motion_window` is those last pixel
    frames, float in [-1, 1] `(1, 3, 73, H, W)`, carried only when this clip gives fewer frames
    than the window holds (frames_per_clip under 73; else the VAE takes the window from this clip
    alone and the field is None)."""

    stage_kind: ClassVar[str] = "dit"
    starts_cycle: ClassVar[bool] = True

    clip: int
    conditions: ClipConditions
    motion_latents: Tensor
    motion_window: Tensor | None = None
    latents: Tensor | None = None
    scheduler_state: dict[str, Any] | None = None
    step: int = 0


@dataclass
class ClipDecodeJob(JobMessage):
    """S2V: dit -> vae, the denoised latents of clip `clip` (float32). The VAE decodes them (after
    the motion latents, or the reference latent for clip 0), writes the clip's frames into the
    job's spool folder, encodes the last motion frames, and sends the next clip to the DiT
    (ClipDenoiseJob), or, after the last clip, every clip's frames to the muxer (MuxJob)."""

    stage_kind: ClassVar[str] = "vae"

    clip: int
    conditions: ClipConditions
    motion_latents: Tensor
    latents: Tensor
    motion_window: Tensor | None = None


@dataclass
class DecodeJob(JobMessage):
    """dit -> vae: the denoised latents (float32)."""

    stage_kind: ClassVar[str] = "vae"

    latents: Tensor


@dataclass
class MuxJob(JobMessage):
    """vae -> muxer: uint8 frames, shape (frames, height, width, 3)."""

    stage_kind: ClassVar[str] = "muxer"

    frames: Tensor


@dataclass
class ResumeJob(Message):
    """broker -> the stage a job's last checkpoint was sent to: run it again from that checkpoint
    (read from the job's spool folder) as attempt `attempt`."""

    job_id: str
    attempt: int
    stage: str


# --- reports: every stage -> whoever tracks jobs (the driver, later the broker) -----------------


@dataclass
class StageReport(Message):
    """A job's progress through a stage. `event` is accepted | step | checkpoint | forwarded |
    cancelled | preview | cache | batch; `to` names the stage a forwarded job was sent to, or whose checkpoint
    was written (the job's spool folder holds the message sent to it: see `common.spool`); `preview`
    names the preview image of `step` (event preview) in the job's spool previews folder; `clip` the
    S2V clip it concerns: of the message taken (accepted, step: steps count within the clip) or
    sent (forwarded, checkpoint: a VAE that sends the next clip names that one); a DiT's
    `cache` report (stages/caching.py) has the passes skipped in `step`, the passes run in
    `total_steps`, the method in `to`; its `batch` report (stages/batching.py) the batch size in
    `step` and the stage's max_batch in `total_steps`."""

    job_id: str
    attempt: int
    stage: str
    event: str
    step: int = 0
    total_steps: int = 0
    at: float = 0.0
    to: str = ""
    pid: int = 0
    preview: str = ""
    # The clip (0-based) of an S2V job the report is about; 0 for other jobs.
    clip: int = 0


@dataclass
class JobDone(Message):
    """muxer -> tracker: the MP4 is in place (and the job's other outputs). `width`, `height`, `fps`
    and `num_frames` are the MP4's, after post-processing. `outputs` describes each file written
    (`file`: its name in the results folder, `codec`, `container`, `width`, `height`, `fps`,
    `bytes`); `postprocess` what post-processing ran (empty: none); `audio` the MP4's audio track
    (empty: none): {sha256 and duration_s of the job's audio, start_s, codec, sample_rate, channels,
    track_duration_s, padded_s (silence added at the end)}."""

    job_id: str
    attempt: int
    path: str
    num_frames: int
    width: int
    height: int
    fps: int
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    postprocess: dict[str, Any] = dataclasses.field(default_factory=dict)
    audio: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class JobFailed(Message):
    """Any stage -> tracker: the job failed in that stage; `error` is the structured error body."""

    job_id: str
    attempt: int
    stage: str
    error: dict[str, Any]


@dataclass
class Heartbeat(Message):
    """`start_ticks` is the process's start time (field 22 of /proc/<pid>/stat, 0 where unknown):
    with `pid` it names the process, so a watchdog never kills a later process that reuses the pid."""

    stage: str
    pid: int
    ready: bool
    busy_job: str | None = None
    handled: int = 0
    at: float = 0.0
    start_ticks: int = 0
    # Memory, for admission: the stage's device, that device's total and free bytes (the card; the
    # host's RAM for cpu), and the bytes of the weights this stage holds there. 0 / "" until set up.
    device: str = ""
    device_total_bytes: int = 0
    device_free_bytes: int = 0
    weight_bytes: int = 0
    # A DiT with `compile = true`: its warm-up (backend, compile_s, max_abs_diff, sizes) and `graphs`,
    # the graphs the process compiled so far (stages/compilation.py StageCompile.report). Empty: eager.
    compile: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- control plane: gateway <-> broker, broker -> everyone -----------------------------------------


@dataclass
class ApiRequest(Message):
    """gateway -> broker (DEALER/ROUTER): one API operation; `op` names a broker handler."""

    request_id: str
    op: str
    args: dict[str, Any]


@dataclass
class ApiReply(Message):
    """broker -> gateway: the result of one ApiRequest, or its structured error and HTTP status."""

    request_id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    http_status: int = 200


@dataclass
class JobEvent(Message):
    """broker -> gateway (PUB, topic `job`): status | progress | complete | error for one job."""

    job_id: str
    event: str
    data: dict[str, Any]
    owner: str = ""


@dataclass
class CancelJob(Message):
    """broker -> stages (PUB, topic `cancel`): stop this job at the next step and drop it."""

    job_id: str


# --- encode / decode ---------------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def encode(msg: Message) -> list[Any]:
    body = _to_wire(msg)
    return wire.pack({"v": wire.WIRE_VERSION, "type": msg.type_name, **body})


def decode(parts: list[Any], limits: wire.Limits, shared: SharedReceiver | None = None) -> Message:
    """`shared`: the receiving socket's shared-memory folder (same-host peers, `common.shm`)."""
    fields = wire.unpack(parts, limits, shared)
    version = fields.pop("v", None)
    if version != wire.WIRE_VERSION:
        raise MalformedHeader(f"wire version {version!r}, expected {wire.WIRE_VERSION}", {"version": repr(version)})
    type_name = fields.pop("type", None)
    if not isinstance(type_name, str):
        raise MalformedHeader("header has no message type")
    cls = Message.registry.get(type_name)
    if cls is None or cls in (JobMessage,):
        raise UnknownMessageType(f"unknown message type {type_name[:64]!r}", {"type": type_name[:64]})
    msg: Message = _build(cls, fields, type_name)
    return msg


def _build(cls: type, fields: Any, where: str) -> Any:
    if not isinstance(fields, dict):
        raise FieldError(f"{where} must be a map", {"field": where})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise FieldError(f"{where}: unknown field(s) {unknown[:8]}", {"fields": unknown[:8]})
    kwargs = {}
    for name, f in known.items():
        if name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(f"{where}: missing field {name!r}", {"field": f"{where}.{name}"})
            continue
        kwargs[name] = _check(hints[name], fields[name], f"{where}.{name}")
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, where)
            except FieldError as exc:
                errors.append(exc)
        raise errors[0] if errors else FieldError(f"{where}: bad value", {"field": where})
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(where, "list", value)
        (arg,) = typing.get_args(hint) or (Any,)
        return [_check(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(where, "map", value)
        _, arg = typing.get_args(hint) or (str, Any)
        return {k: _check(arg, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a hint is a class, never an instance
        return _build(hint, value, where)
    if hint is Tensor:
        if not wire.is_tensor(value):
            raise _type_error(where, "tensor", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(where, "float", value)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, "int", value)
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise _type_error(where, hint.__name__, value)
        return value
    raise FieldError(f"{where}: unsupported field type {hint!r}", {"field": where})


def _type_error(where: str, expected: str, value: Any) -> FieldError:
    return FieldError(
        f"{where}: expected {expected}, got {type(value).__name__}",
        {"field": where, "expected": expected, "got": type(value).__name__},
    )


def _check_registry() -> None:
    """Import-time check: every message type is a dataclass whose fields the decoder can check."""
    for name, cls in Message.registry.items():
        assert dataclasses.is_dataclass(cls), name
        typing.get_type_hints(cls)
        # Header keys the wire format itself uses.
        assert not {"v", "type", "shm"} & {f.name for f in dataclasses.fields(cls)}, name


_check_registry()
