"""The S2V clip loop (the sampling loop of the release's `WanS2V.generate`), as functions a stage calls.

A job is `num_clips` clips of `frames_per_clip` video frames (80 in the release: 20 latent frames).
Each clip is denoised on its own, conditioned on the reference image's latent frame, its slice of
the audio features, the text, and the motion latents of the frames before it:

1. `prepare_clip` (DiT process, once per clip): the per-clip conditioning of the conditional and
   the unconditional pass (the negative prompt AND zeroed audio, as the release), the clip's noise
   (a CPU generator seeded `seed + clip`, so any device draws the same) and a fresh scheduler;
2. `denoise_step` (DiT process, once per step): one CFG step; the scheduler's state between steps
   is what `stages/schedule.export_state` carries when two processes share a clip's steps;
3. `finish_clip` (VAE process): decode - clip 0 decodes [reference, latents] and keeps the last
   `frames_per_clip` frames minus the first 3 (77 of 80), later clips decode [motion, latents] and
   keep the last `frames_per_clip` - then slide the motion window (the last `motion_frames` = 73
   pixel frames, float, never through uint8) and VAE-encode it: the next clip's motion latents.

Clip 0's motion latents are the VAE encoding of `motion_frames` black frames, and the release drops
them from the DiT input (`drop_first_motion`); its motion window starts as those black frames.

The scheduler is diffusers' `UniPCMultistepScheduler` (flow prediction, bh2, order 2): given the
release's sigmas, linspace(sigma_max, 0) of its `FlowUniPCMultistepScheduler` shifted by `shift`,
its timesteps, sigmas and updates are bit-identical to the release's (tests/test_s2v_model.py).
diffusers' own default flow sigmas start at 1 rather than the release's 0.999, hence `sigmas=`.

`run_job` chains the three in-process for a whole job (tests; a single-process run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

from stages import schedule
from stages.s2v.transformer import MOTION_FRAMES, ClipInputs, WanS2VTransformer

NUM_TRAIN_TIMESTEPS = 1000
FIRST_CLIP_DROPPED = 3  # frames of clip 0 the release drops after decoding (the reference frame's)
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)


@dataclass(frozen=True)
class S2VSettings:
    """The sampling settings of a job; defaults are the release's (wan/configs/wan_s2v_14B.py)."""

    seed: int = 0
    steps: int = 40
    shift: float = 3.0
    guidance: float = 4.5
    frames_per_clip: int = 80
    motion_frames: int = MOTION_FRAMES
    drop_first_motion: bool = True

    def __post_init__(self) -> None:
        if self.frames_per_clip <= 0 or self.frames_per_clip % 4:
            raise ValueError(f"frames per clip must be a positive multiple of 4, got {self.frames_per_clip}")
        if self.motion_frames < 1:
            raise ValueError(f"the motion window needs at least one frame, got {self.motion_frames}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    @property
    def motion_latent_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    @property
    def latent_frames(self) -> int:
        """Latent frames denoised per clip (frames_per_clip / 4)."""
        return (self.frames_per_clip + 3 + self.motion_frames) // 4 - self.motion_latent_frames

    def drops_motion(self, clip: int) -> bool:
        return self.drop_first_motion and clip == 0

    def frames_of_clip(self, clip: int) -> int:
        """Video frames clip `clip` contributes to the output."""
        return self.frames_per_clip - (FIRST_CLIP_DROPPED if self.drops_motion(clip) else 0)


def release_sigmas(steps: int) -> np.ndarray:
    """The unshifted sigmas of the release's FlowUniPCMultistepScheduler.set_timesteps: from its
    sigma_max (the float32 of 1 - 1/1000) down to its sigma_min (0), `steps` of them."""
    sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1].copy()


def make_scheduler(steps: int, shift: float, device: torch.device | str = "cpu") -> UniPCMultistepScheduler:
    """A fresh UniPC flow-matching scheduler with the release's timesteps and sigmas for `shift`."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(sigmas=release_sigmas(steps), device=device)
    return scheduler


def clip_noise(settings: S2VSettings, clip: int, height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """(1, 16, latent_frames, H/8, W/8) float32 noise of clip `clip`, drawn on the CPU from `seed + clip`."""
    g = torch.Generator("cpu").manual_seed(settings.seed + clip)
    shape = (LATENT_CHANNELS, settings.latent_frames, height // VAE_STRIDE[1], width // VAE_STRIDE[2])
    return torch.randn(shape, generator=g, dtype=torch.float32).unsqueeze(0).to(device)


def audio_of_clip(audio: torch.Tensor, settings: S2VSettings, clip: int) -> torch.Tensor:
    """The clip's slice (B, 25, audio_dim, frames_per_clip) of the job's features (B, 25, audio_dim, T);
    frames past the end of the features are zeros (as past the audio)."""
    n = settings.frames_per_clip
    part = audio[..., clip * n : (clip + 1) * n]
    if part.shape[-1] < n:
        part = torch.cat([part, part.new_zeros(*part.shape[:-1], n - part.shape[-1])], dim=-1)
    return part


@dataclass
class ClipState:
    """One clip in denoising: what `denoise_step` needs and changes."""

    clip: int
    latents: torch.Tensor  # (1, 16, F, h, w) float32
    scheduler: UniPCMultistepScheduler
    cond: ClipInputs
    uncond: ClipInputs | None  # None without guidance (guidance <= 1)
    guidance: float
    step: int = 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def done(self) -> bool:
        return self.step >= len(self.scheduler.timesteps)


@torch.no_grad()
def prepare_clip(
    model: WanS2VTransformer,
    settings: S2VSettings,
    clip: int,
    context: torch.Tensor,
    context_null: torch.Tensor,
    ref_latents: torch.Tensor,
    motion_latents: torch.Tensor,
    audio: torch.Tensor,
    pose_latents: torch.Tensor | None = None,
    resume: dict[str, Any] | None = None,
) -> ClipState:
    """The state of clip `clip` before its first step, or, with `resume` (what `export_clip` gave
    another process), where that process left the clip.

    context / context_null (1, L, text_dim): the prompt's and the negative prompt's text embeddings;
    ref_latents (1, 16, 1, h, w); motion_latents (1, 16, motion_latent_frames, h, w) (for clip 0 the
    encoding of black frames, `initial_motion_window`); audio (1, 25, audio_dim, frames_per_clip)
    (`audio_of_clip`); pose_latents (1, 16, latent_frames, h, w) or None (no pose video).
    """
    device = ref_latents.device
    h, w = ref_latents.shape[-2] * VAE_STRIDE[1], ref_latents.shape[-1] * VAE_STRIDE[2]
    latents = clip_noise(settings, clip, h, w, device)
    motion_frames = (settings.motion_frames, settings.motion_latent_frames)

    def inputs(text: torch.Tensor, sound: torch.Tensor) -> ClipInputs:
        return model.prepare_clip(
            tuple(latents.shape),
            text,
            ref_latents,
            motion_latents,
            sound,
            pose_latents,
            motion_frames,
            settings.drops_motion(clip),
        )

    cond = inputs(context, audio)
    uncond = inputs(context_null, 0.0 * audio) if settings.guidance > 1 else None
    scheduler = make_scheduler(settings.steps, settings.shift, device)
    state = ClipState(clip, latents, scheduler, cond, uncond, settings.guidance)
    if resume is not None:
        if int(resume["clip"]) != clip:
            raise ValueError(f"the resumed state is of clip {resume['clip']}, not {clip}")
        schedule.restore_state(scheduler, resume["scheduler"], torch.device(device))
        state.latents = resume["latents"].to(device)
        state.step = int(resume["step"])
    return state


def export_clip(state: ClipState) -> dict[str, Any]:
    """A clip in denoising as plain data (CPU tensors), for the next process to `prepare_clip(resume=...)`:
    exact, as it carries UniPC's whole multistep state (stages/schedule.py)."""
    return {
        "clip": state.clip,
        "step": state.step,
        "latents": state.latents.cpu(),
        "scheduler": schedule.export_state(state.scheduler),
    }


@torch.no_grad()
def denoise_step(model: WanS2VTransformer, state: ClipState) -> torch.Tensor:
    """Run step `state.step` of the clip (conditional pass, unconditional pass, guidance, UniPC
    update); returns the new latents, which are also left in `state`."""
    t = state.scheduler.timesteps[state.step]
    timestep = t.reshape(1).to(state.latents.device)
    pred = model.forward_clip(state.latents, timestep, state.cond)
    if state.uncond is not None:
        pred_uncond = model.forward_clip(state.latents, timestep, state.uncond)
        pred = pred_uncond + state.guidance * (pred - pred_uncond)
    state.latents = state.scheduler.step(pred, t, state.latents, return_dict=False)[0]
    state.step += 1
    return state.latents


# ---- the VAE side --------------------------------------------------------------------------------


def _stats(vae: AutoencoderKLWan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, torch.float32)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, torch.float32)
    return mean, inv_std


@torch.no_grad()
def vae_encode(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1] -> normalised latents (1, 16, 1 + (T - 1) // 4, H/8, W/8) float32:
    the latent distribution's mode, (mu - mean) / std, as the release's Wan2_1_VAE.encode."""
    device = next(vae.parameters()).device
    mean, inv_std = _stats(vae, device)
    mu = vae.encode(video.to(device, vae.dtype)).latent_dist.mode()
    return (mu.float() - mean) * inv_std


@torch.no_grad()
def vae_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> (1, 3, T, H, W) float32 in [-1, 1], as the release's Wan2_1_VAE.decode."""
    device = next(vae.parameters()).device
    mean, inv_std = _stats(vae, device)
    video = vae.decode((latents.to(device, torch.float32) / inv_std + mean).to(vae.dtype), return_dict=False)[0]
    return video.float().clamp(-1, 1)


Encode = Callable[[torch.Tensor], torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]


def initial_motion_window(
    settings: S2VSettings, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Clip 0's motion window: `motion_frames` black frames (zeros in [-1, 1] space, as the release)."""
    return torch.zeros(1, 3, settings.motion_frames, height, width, device=device)


def pose_latents_of_clip(encode: Encode, pose_pixels: torch.Tensor) -> torch.Tensor:
    """A clip's pose frames (1, 3, frames_per_clip, H, W) in [-1, 1] -> (1, 16, latent_frames, h, w):
    the first frame repeated in front, encoded, the first latent frame dropped (as the release)."""
    return encode(torch.cat([pose_pixels[:, :, :1], pose_pixels], dim=2))[:, :, 1:]


@dataclass
class ClipResult:
    frames: torch.Tensor  # (1, 3, frames_of_clip, H, W) float32 in [-1, 1]
    motion_window: torch.Tensor  # (1, 3, motion_frames, H, W): the last pixel frames so far
    motion_latents: torch.Tensor  # the window encoded: the next clip's motion latents


def finish_clip(
    settings: S2VSettings,
    clip: int,
    latents: torch.Tensor,
    ref_latents: torch.Tensor,
    motion_latents: torch.Tensor,
    motion_window: torch.Tensor,
    decode: Decode,
    encode: Encode,
) -> ClipResult:
    """Decode a denoised clip and prepare the next one's motion latents (`decode`/`encode`: e.g.
    `vae_decode`/`vae_encode` bound to the VAE)."""
    before = ref_latents if settings.drops_motion(clip) else motion_latents
    video = decode(torch.cat([before.to(latents.device), latents], dim=2))
    frames = video[:, :, -settings.frames_per_clip :]
    if settings.drops_motion(clip):
        frames = frames[:, :, FIRST_CLIP_DROPPED:]
    overlap = min(settings.motion_frames, frames.shape[2])
    window = torch.cat([motion_window[:, :, overlap:].to(frames.device), frames[:, :, -overlap:]], dim=2)
    return ClipResult(frames, window, encode(window))


# ---- a whole job in one process ------------------------------------------------------------------


@dataclass
class JobResult:
    video: torch.Tensor  # (1, 3, frames, H, W) float32 in [-1, 1], the clips joined
    clips: list[ClipResult] = field(default_factory=list)
    final_latents: list[torch.Tensor] = field(default_factory=list)  # per clip, before decoding


def run_job(
    model: WanS2VTransformer,
    vae: AutoencoderKLWan,
    settings: S2VSettings,
    context: torch.Tensor,
    context_null: torch.Tensor,
    ref_pixels: torch.Tensor,
    audio: torch.Tensor,
    num_clips: int,
    pose_pixels: torch.Tensor | None = None,
    on_step: Callable[[ClipState], None] | None = None,
) -> JobResult:
    """Every clip of a job in-process: ref_pixels (1, 3, 1, H, W) in [-1, 1] (the reference image,
    fitted to the job's size), audio (1, 25, audio_dim, T) features of the whole job, pose_pixels
    (1, 3, >= num_clips * frames_per_clip, H, W) or None."""

    def encode(v: torch.Tensor) -> torch.Tensor:
        return vae_encode(vae, v)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae_decode(vae, z)

    height, width = ref_pixels.shape[-2:]
    if height % 64 or width % 64:
        raise ValueError(f"the S2V size must be a multiple of 64 on each side, got {width}x{height}")
    device = next(model.parameters()).device
    ref_latents = encode(ref_pixels).to(device)
    window = initial_motion_window(settings, height, width)
    motion_latents = encode(window).to(device)
    result = JobResult(video=torch.empty(0))
    n = settings.frames_per_clip
    for clip in range(num_clips):
        pose = None
        if pose_pixels is not None:
            pose = pose_latents_of_clip(encode, pose_pixels[:, :, clip * n : (clip + 1) * n]).to(device)
        state = prepare_clip(
            model,
            settings,
            clip,
            context,
            context_null,
            ref_latents,
            motion_latents,
            audio_of_clip(audio, settings, clip).to(device),
            pose,
        )
        while not state.done:
            denoise_step(model, state)
            if on_step is not None:
                on_step(state)
        result.final_latents.append(state.latents)
        done = finish_clip(settings, clip, state.latents, ref_latents, motion_latents, window, decode, encode)
        result.clips.append(done)
        window, motion_latents = done.motion_window, done.motion_latents.to(device)
    result.video = torch.cat([c.frames for c in result.clips], dim=2)
    return result
