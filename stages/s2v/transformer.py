"""The Wan2.2 S2V-14B DiT (`WanModel_S2V` of the release), under the release's parameter names.

The release's safetensors and `config.json` load into `WanS2VTransformer` without renaming
(`stages/official.py`). One forward denoises one clip's latents given:

- the noisy latents (B, 16, F, h, w), patch-embedded (1, 2, 2), plus the pose condition through
  `cond_encoder` (zeros when there is no pose video, as the release does);
- the reference image's latent frame (B, 16, 1, h, w), patch-embedded and appended, at rotary time 30;
- the previous clip's motion latents, packed by FramePack (`stages/s2v/motion.py`) and appended;
- a learned embedding per token kind (`trainable_cond_mask`: 0 noisy, 1 reference, 2 motion);
- the audio features (B, 25, audio_dim, frames) -> audio tokens per latent frame
  (`stages/s2v/audio_injection.py`), injected after the inject layers;
- with `zero_timestep`, the reference and motion tokens are modulated as at t = 0: every AdaLN
  modulation has two segments, the noisy tokens' (t) and the rest's (0).

The arithmetic follows the release's order of operations exactly (on the CPU in float32 the output
is bit-identical to `WanModel_S2V`, tests/test_s2v_model.py). Where the maths is the same to the
bit, diffusers' pieces are used (attention dispatch and backends, `AdaLayerNorm`, `ModelMixin`
loading/casting); the rotary embedding and the sinusoidal timestep embedding are written here in
float64 as the release computes them (diffusers' float32 versions differ in the last bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from stages.s2v.attention import S2VAttention
from stages.s2v.audio_injection import WAV2VEC_STATES, AudioInjector, CausalAudioEncoder
from stages.s2v.motion import FramePackMotioner
from stages.s2v.rope import Grid, grid_freqs, rope_table

REF_TIME = 30  # the reference frame's rotary time index
MOTION_FRAMES = 73  # pixel frames of the previous clip re-encoded as motion (the release's)
MOTION_LATENT_FRAMES = (MOTION_FRAMES + 3) // 4  # 19


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float64 [cos | sin] embedding, as the release computes it."""
    half = dim // 2
    pos = t.to(torch.float64)
    angles = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _modulate(x: torch.Tensor, split: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with scale/shift (B, 2, C): segment 0 for x[:, :split], 1 after."""
    parts = [x[:, :split] * (1 + scale[:, 0:1]) + shift[:, 0:1], x[:, split:] * (1 + scale[:, 1:2]) + shift[:, 1:2]]
    return torch.cat(parts, dim=1)


def _gate(y: torch.Tensor, split: int, gate: torch.Tensor) -> torch.Tensor:
    return torch.cat([y[:, :split] * gate[:, 0:1], y[:, split:] * gate[:, 1:2]], dim=1)


class S2VBlock(nn.Module):
    """Self-attention, text cross-attention and FFN, each with two-segment AdaLN modulation."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = S2VAttention(dim, heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = S2VAttention(dim, heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, split: int, rope: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """x (B, L, C); e (B, 6, 2, C) float32 time modulation; tokens before `split` take segment 0."""
        dtype = context.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            c.squeeze(1) for c in (self.modulation.float().unsqueeze(2) + e).chunk(6, dim=1)
        )
        h = _modulate(self.norm1(x.float()).type_as(x).float(), split, scale1, shift1)
        x = x + _gate(self.self_attn(h.to(dtype), rope=rope), split, gate1)
        x = x + self.cross_attn(self.norm3(x.float()).type_as(x).to(dtype), context=context)
        h = _modulate(self.norm2(x.float()).type_as(x).float(), split, scale2, shift2)
        return x + _gate(self.ffn(h.to(dtype)), split, gate2)


class S2VHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        h = self.norm(x.float()).type_as(x) * (1 + scale) + shift
        return self.head(h.to(dtype))


@dataclass
class ClipInputs:
    """What stays fixed over a clip's denoising steps (one pass: conditional or unconditional)."""

    context: torch.Tensor  # (B, text_len, dim) embedded text
    ref_tokens: torch.Tensor  # (B, R, dim)
    motion_tokens: torch.Tensor  # (B, M, dim)
    cond: torch.Tensor  # (B, dim, f, h, w) pose embedding added to the patch-embedded noisy latents
    rope: torch.Tensor  # (B, N + R + M, head_dim // 2) complex128
    kinds: torch.Tensor  # (B, N + R + M) token kinds 0/1/2
    audio: torch.Tensor  # (B, F, tokens, dim)
    audio_global: torch.Tensor | None  # (B, F, 1, dim)
    grid: tuple[int, int, int]  # the noisy latents' patch grid


class WanS2VTransformer(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Config keys are those of the release's `config.json` (`_class_name` WanModel_S2V)."""

    config_name = "config.json"
    _no_split_modules = ["S2VBlock"]
    # small modules whose precision matters (as diffusers' WanTransformer3DModel keeps its time
    # embedder and modulation tables in float32); the rest takes the compute dtype
    _keep_in_fp32_modules = ["time_embedding", "time_projection", "modulation", "weights", "norm3"]
    _skip_layerwise_casting_patterns = [
        "patch_embedding",
        "cond_encoder",
        "text_embedding",
        "time_",
        "norm",
        "casual_audio_encoder",
        "frame_packer",
        "trainable_cond_mask",
        "adain",
    ]

    @register_to_config
    def __init__(
        self,
        cond_dim: int = 16,
        audio_dim: int = 1024,
        num_audio_token: int = 4,
        enable_adain: bool = True,
        adain_mode: str = "attn_norm",
        audio_inject_layers: list[int] | tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39),
        zero_init: bool = True,
        zero_timestep: bool = True,
        enable_motioner: bool = False,
        add_last_motion: bool = True,
        enable_tsm: bool = False,
        trainable_token_pos_emb: bool = False,
        motion_token_num: int = 1024,
        enable_framepack: bool = True,
        framepack_drop_mode: str = "padd",
        model_type: str = "s2v",
        patch_size: tuple[int, int, int] | list[int] = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 16,
        dim: int = 5120,
        ffn_dim: int = 13824,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 40,
        num_layers: int = 40,
        window_size: Any = (-1, -1),
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        audio_states: int = WAV2VEC_STATES,
        **kwargs: Any,
    ):
        super().__init__()
        if model_type != "s2v":
            raise ValueError(f"not an S2V DiT: model_type {model_type!r}")
        if enable_motioner or not enable_framepack:
            raise ValueError("only the release's motion path is built: enable_framepack true, enable_motioner false")
        if tuple(window_size) != (-1, -1) or not qk_norm or not cross_attn_norm:
            raise ValueError("the S2V DiT has global attention, q/k norms and a cross-attention norm")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} / {num_heads} heads must give an even head dim")
        pf, ph, pw = (int(p) for p in patch_size)
        self.patch: tuple[int, int, int] = (pf, ph, pw)
        self.head_dim = dim // num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([S2VBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers)])
        self.head = S2VHead(dim, out_dim, self.patch, eps)
        if cond_dim > 0:
            self.cond_encoder = nn.Conv3d(cond_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.casual_audio_encoder = CausalAudioEncoder(audio_dim, dim, num_audio_token, enable_adain, audio_states)
        self.audio_injector = AudioInjector(
            dim, num_heads, num_layers, list(audio_inject_layers), enable_adain, adain_mode
        )
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(dim, num_heads, framepack_drop_mode)
        self.rope = rope_table(self.head_dim)

    # ---- per-clip conditioning (the same for every step of a clip) -------------------------------

    def _embed_text(self, context: torch.Tensor) -> torch.Tensor:
        length = self.config.text_len
        if context.shape[1] < length:
            context = torch.cat(
                [context, context.new_zeros(context.shape[0], length - context.shape[1], context.shape[2])], dim=1
            )
        return self.text_embedding(context[:, :length].to(self.dtype_for_compute))

    @property
    def dtype_for_compute(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def prepare_clip(
        self,
        latent_shape: tuple[int, ...],
        context: torch.Tensor,
        ref_latents: torch.Tensor,
        motion_latents: torch.Tensor,
        audio: torch.Tensor,
        cond_states: torch.Tensor | None = None,
        motion_frames: tuple[int, int] = (MOTION_FRAMES, MOTION_LATENT_FRAMES),
        drop_motion_frames: bool = False,
        add_last_motion: int = 2,
    ) -> ClipInputs:
        """Everything of a forward that does not depend on the noisy latents or the timestep.

        latent_shape (B, C, F, h, w) of the noisy latents; context (B, L, text_dim) text embeddings
        (zero-padded to `text_len` here); ref_latents (B, 16, 1, h, w); motion_latents (B, 16, T, h, w);
        audio (B, 25, audio_dim, frames) with `frames` = 4 F pixel frames of wav2vec2 features;
        cond_states (B, cond_dim, F, h, w) pose latents or None (zeros, as the release without pose);
        motion_frames (pixel, latent) frames of the motion window: the first audio frame is repeated
        that many pixel frames in front and that many latent frames of audio tokens dropped after.
        """
        dtype = self.dtype_for_compute
        b, _, f, h, w = latent_shape
        pf, ph, pw = self.patch
        grid = (f // pf, h // ph, w // pw)
        n_video = math.prod(grid)

        audio = torch.cat([audio[..., :1].repeat(1, 1, 1, motion_frames[0]), audio], dim=-1)
        local, glob = self.casual_audio_encoder(audio)
        audio_tokens = local[:, motion_frames[1] :]
        audio_global = None if glob is None else glob[:, motion_frames[1] :]
        if audio_tokens.shape[1] != grid[0]:
            raise ValueError(
                f"the audio gives {audio_tokens.shape[1]} latent frames of tokens, the clip has {grid[0]}"
                f" (audio frames must be 4 per latent frame of the clip)"
            )

        if hasattr(self, "cond_encoder"):
            if cond_states is None:
                cond_states = torch.zeros(b, self.config.cond_dim, f, h, w, dtype=dtype, device=ref_latents.device)
            cond = self.cond_encoder(cond_states.to(dtype))
        else:
            cond = torch.zeros(b, self.config.dim, *grid, dtype=dtype, device=ref_latents.device)

        ref = self.patch_embedding(ref_latents.to(dtype))
        ref_tokens = ref.flatten(2).transpose(1, 2)
        rh, rw = ref.shape[3], ref.shape[4]
        base = grid_freqs(self.rope, [Grid.plain(*grid), Grid((REF_TIME, 0, 0), (REF_TIME + 1, rh, rw), (1, rh, rw))])

        add_last = int(bool(self.config.add_last_motion)) * add_last_motion
        motion, motion_rope = [], []
        for sample in motion_latents.to(dtype):
            tokens, freqs = self.frame_packer(sample, add_last)
            if drop_motion_frames:
                tokens, freqs = tokens[:, :0], freqs[:0]
            motion.append(tokens)
            motion_rope.append(freqs)
        motion_tokens = torch.cat(motion)
        rope = torch.stack([torch.cat([base, r]) for r in motion_rope]).to(ref_latents.device)
        kinds = torch.cat(
            [
                torch.zeros(n_video, dtype=torch.long),
                torch.ones(ref_tokens.shape[1], dtype=torch.long),
                torch.full((motion_tokens.shape[1],), 2, dtype=torch.long),
            ]
        ).to(ref_latents.device)
        return ClipInputs(
            self._embed_text(context),
            ref_tokens,
            motion_tokens,
            cond,
            rope,
            kinds.unsqueeze(0).expand(b, -1),
            audio_tokens,
            audio_global,
            grid,
        )

    # ---- one step ----------------------------------------------------------------------------------

    def _time(self, timestep: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
        if self.config.zero_timestep:
            t = torch.cat([t, t.new_zeros(1)])
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).float())
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim))
        if self.config.zero_timestep:
            e, zero, e0 = e[:-1], e0[-1:], e0[:-1]
            e0 = torch.cat([e0.unsqueeze(2), zero.unsqueeze(2).repeat(e0.shape[0], 1, 1, 1)], dim=2)
        else:
            e0 = e0.unsqueeze(2).repeat(1, 1, 2, 1)
        return e, e0

    def forward_clip(self, latents: torch.Tensor, timestep: torch.Tensor, clip: ClipInputs) -> torch.Tensor:
        """Flow prediction (B, out_dim, F, h, w) float32 for the noisy `latents` at `timestep`."""
        dtype = self.dtype_for_compute
        b = latents.shape[0]
        x = self.patch_embedding(latents.to(dtype))
        x = x + clip.cond
        x = x.flatten(2).transpose(1, 2)
        n_video = x.shape[1]
        x = torch.cat([x, clip.ref_tokens, clip.motion_tokens], dim=1)
        x = x + self.trainable_cond_mask(clip.kinds).to(x.dtype)

        e, e0 = self._time(timestep.to(latents.device), b)
        split = n_video if self.config.zero_timestep else 0
        for i, block in enumerate(self.blocks):
            x = block(x, e0, split, clip.rope, clip.context)
            if i in self.audio_injector.index:
                x = self.audio_injector(i, x, n_video, clip.audio, clip.audio_global, dtype)

        x = self.head(x[:, :n_video], e, dtype)
        return self.unpatchify(x, clip.grid).float()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        ref_latents: torch.Tensor,
        motion_latents: torch.Tensor,
        audio_embeds: torch.Tensor,
        cond_states: torch.Tensor | None = None,
        motion_frames: tuple[int, int] = (MOTION_FRAMES, MOTION_LATENT_FRAMES),
        drop_motion_frames: bool = False,
        add_last_motion: int = 2,
    ) -> torch.Tensor:
        """One whole forward: `prepare_clip` + `forward_clip` (see there for the shapes)."""
        clip = self.prepare_clip(
            tuple(hidden_states.shape),
            encoder_hidden_states,
            ref_latents,
            motion_latents,
            audio_embeds,
            cond_states,
            motion_frames,
            drop_motion_frames,
            add_last_motion,
        )
        return self.forward_clip(hidden_states, timestep, clip)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b, c = x.shape[0], self.config.out_dim
        f, h, w = grid
        pf, ph, pw = self.patch
        x = x.reshape(b, f, h, w, pf, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pf, h * ph, w * pw)
