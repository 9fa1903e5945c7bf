"""Memory admission: estimate a job's peak memory per device, refuse at submit what cannot fit.

For each device the job's route uses, the estimate adds, over the stages on that device (each its
own process, each keeping what its caching allocator reserved at its peak):

    weights(stage)                              what the stage reports in its heartbeat
  + activations(stage, job)                     the formulas below, scaled by the compute dtype
  + CUDA context (0.5 GiB per process, CUDA devices only)

and compares the sum with the device's budget: `[admission] memory_budget_gib` (one number for
every device, or a table `{ "cuda:0" = 22.0, cpu = 8.0 }`) when set, else the total the stages on
that device report. Devices with no budget and no CUDA report (the CPU, unless budgeted) are not
checked; nor is a stage that has not reported yet (the job is then admitted, and logged).
`[admission] memory_check = false` turns the check off.

Activations, calibrated on an H200 with bf16 weights (bench/results/gpu_stage_check_h200.*,
peak minus weights, our stage code):

- DiT, one guided step, per latent token (tokens = latent frames x (H/s) x (W/s), s = VAE spatial
  factor x patch 2 = 16 for A14B, 32 for TI2V-5B; latent frames = (frames-1)/4+1):
  A14B: (30.31 - 26.78) GiB / 32760 tokens (832x480x81) = 113 KiB/token;
  TI2V-5B: (14.58 - 9.33) GiB / 27280 tokens (1280x704x121) = 202 KiB/token (its timestep
  embedding is per token); we use 120 and 210 KiB.
- VAE decode (uint8 conversion on the device included), per output pixel x frame:
  Wan2.1 VAE: (4.63 - 0.24) GiB / (832x480x81) = 146 B; Wan2.2 VAE: (11.88 - 1.31) GiB /
  (1280x704x121) = 104 B; we use 150 and 110 B. float32 measured 2.0x these (the dtype scaling).
  With `vae_tiling` the decoder works on 256x256 tiles: VAE act x (tile area / frame area) plus the
  stitched output (3 x frames x H x W x (2 x dtype bytes + 4)) - an estimate, not measured.
- A DiT stage with `max_batch` > 1 may denoise that many jobs of the same size as one batch
  (stages/batching.py): its activations count `max_batch` jobs of this size (the weights once).
- Text encoder: 512 tokens through UMT5-XXL is ~0.1 GiB, whatever the video size.
- S2V-14B (not measured yet: the A14B coefficients, the same width and depth): one DiT pass sees
  the clip's noisy tokens (frames_per_clip / 4 latent frames x H/16 x W/16), the reference image's
  (one latent frame) and the motion frames' (FramePack: 19 latent frames in buckets of 1, 2 and
  16 frames patched at 1x2x2, 2x4x4 and 4x8x8, i.e. 1.5 x H/16 x W/16): 63,360 tokens at 1024x704,
  80 frames per clip. The VAE decodes one clip at a time after its motion latents (19 + 20 latent
  frames, 153 frames at 80 per clip) and encodes the last 73 frames for the next; the text encoder
  also runs wav2vec2 (0.3B) and VAE-encodes the reference image (and the pose video clip by
  clip). None of it grows with the number of clips: a long audio needs no more memory, only time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common import messages as m
from common.config import Config
from common.errors import InsufficientMemory

GIB = 1 << 30
KIB = 1 << 10
CUDA_CONTEXT_BYTES = GIB // 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
TILE_PIXELS = 256 * 256


@dataclass(frozen=True)
class Family:
    """Memory coefficients of a model family (calibrated at 2-byte compute)."""

    dit_bytes_per_token: float
    pixels_per_token: int  # (VAE spatial factor x patch size) squared
    vae_bytes_per_pixel_frame: float
    text_encoder_bytes: float
    # Nominal parameter counts, for estimates before any stage has reported (the profile tests).
    expert_params: float
    vae_params: float
    text_encoder_params: float = 5.68e9  # UMT5-XXL encoder


A14B = Family(120 * KIB, 16 * 16, 150, 0.1 * GIB, 14.288e9, 126.9e6)
# S2V-14B: one DiT of ~16.3B parameters (the release's 4 shards, 32.6 GB in bf16), the Wan2.1 VAE,
# UMT5-XXL and wav2vec2-large-xlsr-53 (0.32B) in the text encoder stage.
S2V = Family(120 * KIB, 16 * 16, 150, 0.1 * GIB, 16.3e9, 126.9e6, 5.68e9 + 0.317e9)
FAMILIES = {
    "t2v-A14B": A14B,
    "i2v-A14B": A14B,
    "ti2v-5B": Family(210 * KIB, 32 * 32, 110, 0.1 * GIB, 5.0e9, 704.7e6),
    "s2v-14B": S2V,
}
S2V_MOTION_LATENT_FRAMES = 19  # the 73 motion frames of the official config, VAE-encoded
S2V_MOTION_FRAMES = 73
S2V_MOTION_TOKENS = 1.5  # FramePack's motion tokens, in latent frames' worth of noisy tokens (above)


def dit_tokens(model: str, width: int, height: int, frames: int) -> int:
    """Tokens of one DiT pass: of `frames` video frames (4n+1); for s2v-14B `frames` is the frames
    per clip (4n), and the reference and motion tokens are added."""
    family = FAMILIES[model]
    side = int(family.pixels_per_token**0.5)
    per_frame = (height // side) * (width // side)
    if model == "s2v-14B":
        return int(frames // 4 * per_frame + per_frame + S2V_MOTION_TOKENS * per_frame)
    return ((frames - 1) // 4 + 1) * per_frame


def _frames(kind: str, p: m.JobParams) -> int:
    """The frames one pass of a stage of `kind` works on: an S2V job's DiT sees one clip; its VAE
    decodes one clip after its motion latents (and encodes the motion frames of the next)."""
    if p.num_clips <= 0:
        return p.num_frames
    if kind == "vae":
        return (S2V_MOTION_LATENT_FRAMES + p.frames_per_clip // 4 - 1) * 4 + 1
    if kind == "text_encoder":  # the reference image, and a pose video encoded clip by clip
        return p.frames_per_clip + 1 if p.pose_video else 1
    return p.frames_per_clip


def activation_bytes(kind: str, dtype: str, p: m.JobParams, vae_tiling: bool = False) -> int:
    """Peak activation bytes of one stage of `kind` running job `p`."""
    family = FAMILIES.get(p.model)
    if family is None:
        return 0
    scale = DTYPE_BYTES.get(dtype, 4) / 2
    frames = _frames(kind, p)
    if kind == "dit":
        return int(family.dit_bytes_per_token * dit_tokens(p.model, p.width, p.height, frames) * scale)
    if kind == "vae":
        pixels = p.width * p.height
        if vae_tiling and pixels > TILE_PIXELS:
            decode = family.vae_bytes_per_pixel_frame * frames * TILE_PIXELS * scale
            stitched = 3 * frames * pixels * (2 * DTYPE_BYTES.get(dtype, 4) + 4)
            return int(decode + stitched)
        return int(family.vae_bytes_per_pixel_frame * frames * p.width * p.height * scale)
    if kind == "text_encoder":
        # and its VAE encodes the reference image (and the pose video, clip by clip), or a
        # video-to-video job's num_frames input frames
        if p.num_clips > 0 or p.video:
            vae = family.vae_bytes_per_pixel_frame * frames * p.width * p.height * scale
            return int(family.text_encoder_bytes * scale + vae)
        return int(family.text_encoder_bytes * scale)
    return 0


def nominal_weight_bytes(config: Config, stage: str) -> int:
    """Weights a stage would hold, from nominal parameter counts (no stage running)."""
    spec = config.stage(stage)
    per_param = DTYPE_BYTES[spec.storage_dtype or spec.dtype]
    total = 0.0
    for model in config.stage_models(spec):
        family = FAMILIES.get(model)
        if family is None:
            continue
        if spec.kind == "dit":
            two = model.endswith("A14B")
            experts = 2 if two and spec.part == "all" else 1
            total += experts * family.expert_params
        elif spec.kind == "vae":
            total += family.vae_params
        elif spec.kind == "text_encoder":
            total += family.text_encoder_params + (family.vae_params if model == "s2v-14B" else 0)
    return int(total * per_param)


@dataclass
class DeviceNeed:
    device: str
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> {weights, activations}
    context: int = 0

    @property
    def total(self) -> int:
        return self.context + sum(v["weights"] + v["activations"] for v in self.stages.values())


def estimate(config: Config, p: m.JobParams, weights: dict[str, int], route: list[str]) -> dict[str, DeviceNeed]:
    """Peak bytes per device for job `p` on `route`; `weights` maps stage -> its weight bytes."""
    needs: dict[str, DeviceNeed] = {}
    for stage in route:
        spec = config.stage(stage)
        if spec.kind == "muxer":
            continue
        device = "cuda:0" if spec.device == "cuda" else spec.device
        need = needs.setdefault(device, DeviceNeed(device))
        # A DiT with max_batch > 1 may denoise that many jobs of this size at once (stages/batching.py).
        batch = spec.max_batch if spec.kind == "dit" else 1
        need.stages[stage] = {
            "weights": int(weights.get(stage, 0)),
            "activations": batch * activation_bytes(spec.kind, spec.dtype, p, spec.vae_tiling),
        }
        if device.startswith("cuda"):
            need.context += CUDA_CONTEXT_BYTES
    return needs


def budgets(config: Config, reported_totals: dict[str, int]) -> dict[str, int]:
    """Bytes each device may use: the configured budget, else what its stages reported (CUDA only)."""
    configured = config.admission.memory_budget_gib
    out = {d: t for d, t in reported_totals.items() if d.startswith("cuda")}
    if isinstance(configured, dict):
        out.update({str(d): int(float(g) * GIB) for d, g in configured.items()})
    elif configured is not None:
        for device in set(reported_totals) | set(out):
            out[device] = int(float(configured) * GIB)
    return out


def check(config: Config, p: m.JobParams, route: list[str], heartbeats: dict[str, m.Heartbeat]) -> dict[str, Any]:
    """Raise INSUFFICIENT_GPU_MEMORY when the job cannot fit; returns the estimate otherwise."""
    if not config.admission.memory_check:
        return {}
    weights = {s: hb.weight_bytes for s, hb in heartbeats.items() if hb.device}
    totals: dict[str, int] = {}
    for hb in heartbeats.values():
        if hb.device and hb.device_total_bytes:
            totals["cuda:0" if hb.device == "cuda" else hb.device] = hb.device_total_bytes
    for stage in route:
        if config.stage(stage).kind != "muxer":
            totals.setdefault("cuda:0" if config.stage(stage).device == "cuda" else config.stage(stage).device, 0)
    allowed = budgets(config, totals)
    needs = estimate(config, p, weights, route)
    unknown = [s for s in route if config.stage(s).kind != "muxer" and s not in weights]
    report = {d: {"needed_bytes": n.total, "available_bytes": allowed.get(d)} for d, n in needs.items()}
    for device, need in needs.items():
        budget = allowed.get(device)
        if budget is None or any(s in unknown for s in need.stages):
            continue  # no budget, or a stage on it has not reported its weights yet
        if need.total > budget:
            s2v = p.num_clips > 0
            frames = f"{p.frames_per_clip} frames per clip" if s2v else f"{p.num_frames} frames"
            suggestion = ("lower max_area or frames_per_clip (custom_options), or use the draft preset" if s2v else
                          "lower the resolution or num_frames (custom_options), or use the draft preset")
            extra: dict[str, Any] = {"frames_per_clip": p.frames_per_clip, "tokens": dit_tokens(
                p.model, p.width, p.height, p.frames_per_clip)} if s2v else {}
            batched = {s: config.stage(s).max_batch for s in need.stages
                       if config.stage(s).kind == "dit" and config.stage(s).max_batch > 1}
            if batched:  # the DiTs' activations count a whole batch of jobs of this size
                extra["max_batch"] = batched
            raise InsufficientMemory(
                f"{p.model} at {p.width}x{p.height}, {frames} needs about {need.total / GIB:.2f} GiB on "
                f"{device}, which has {budget / GIB:.2f} GiB; choose a lower resolution, fewer frames or the "
                "draft preset",
                {
                    "device": device,
                    "needed_gib": round(need.total / GIB, 3),
                    "available_gib": round(budget / GIB, 3),
                    "stages": {s: {k: round(v / GIB, 3) for k, v in b.items()} for s, b in need.stages.items()},
                    "cuda_context_gib": round(need.context / GIB, 3),
                    "model": p.model,
                    "resolution": f"{p.width}x{p.height}",
                    "num_frames": p.num_frames,
                    **extra,
                    "suggestion": suggestion,
                },
            )
    return report
