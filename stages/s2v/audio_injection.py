"""The audio inside the S2V DiT: wav2vec2 features -> audio tokens per latent frame -> injected into
the video tokens after some blocks.

- `CausalAudioEncoder` (`casual_audio_encoder`, the release's spelling): a learned weighted average
  over the wav2vec2 hidden states (25 for the large model: the embeddings and 24 layers; weights
  through SiLU, normalised by their sum), then a causal 1-D conv stack (kernel 3, strides 1, 2, 2: one
  step per latent frame from 4 video frames) giving `num_token` local tokens per latent frame plus a
  learned padding token, and, with AdaIN, one global token per latent frame from a parallel branch.
- `AudioInjector` (`audio_injector`): after each of the inject layers, every latent frame's video
  tokens attend to that frame's audio tokens; the queries go through diffusers' `AdaLayerNorm`
  driven by the frame's global audio token (`adain_mode = "attn_norm"`) or a plain LayerNorm, and
  the result is added to the video tokens. The reference and motion tokens get no audio.

Parameter names are the official ones (wan/modules/s2v/audio_utils.py, auxi_blocks.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNorm
from torch import nn

from stages.s2v.attention import S2VAttention

WAV2VEC_STATES = 25  # hidden states of wav2vec2-large (embeddings + 24 layers), fixed in the release


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: padded on the left by replicating the first step."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class AudioMotionEncoder(nn.Module):
    """(B, T, audio_dim) frame features -> (B, T', num_token + 1, dim) local tokens per latent frame
    (T' = ceil(ceil(T / 2) / 2)) and, with `need_global`, (B, T', 1, dim) global tokens."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int, need_global: bool):
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"the audio encoder's width {hidden_dim} is not a multiple of 4")
        self.num_token, self.need_global = num_token, need_global
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_token, 3, stride=1)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        if need_global:
            self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim // 4, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_dim // 2, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.act = nn.SiLU()
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C/4) after the first conv -> (N, T', C): norm, SiLU, two strided convs."""
        x = self.act(self.norm1(x)).transpose(1, 2)
        x = self.act(self.norm2(self.conv2(x).transpose(1, 2))).transpose(1, 2)
        return self.act(self.norm3(self.conv3(x).transpose(1, 2)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, _ = x.shape
        x = x.transpose(1, 2)  # (B, C, T)
        local = self.conv1_local(x)  # (B, num_token * C/4, T)
        local = local.view(b, self.num_token, -1, t).transpose(2, 3).reshape(b * self.num_token, t, -1)
        local = self._downsample(local)  # (B * n, T', C)
        local = local.view(b, self.num_token, *local.shape[1:]).transpose(1, 2)  # (B, T', n, C)
        local = torch.cat([local, self.padding_tokens.repeat(b, local.shape[1], 1, 1)], dim=2)
        if not self.need_global:
            return local, None
        glob = self.final_linear(self._downsample(self.conv1_global(x).transpose(1, 2)))
        return local, glob.unsqueeze(2)  # (B, T', 1, C)


class CausalAudioEncoder(nn.Module):
    def __init__(self, audio_dim: int, dim: int, num_token: int, need_global: bool, num_states: int = WAV2VEC_STATES):
        super().__init__()
        self.encoder = AudioMotionEncoder(audio_dim, dim, num_token, need_global)
        self.weights = nn.Parameter(torch.full((1, num_states, 1, 1), 0.01))
        self.act = nn.SiLU()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, states, audio_dim, frames) -> (local tokens, global tokens or None)."""
        w = self.act(self.weights.float())
        mixed = ((features.float() * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # (B, audio_dim, frames)
        return self.encoder(mixed.transpose(1, 2).to(self.encoder.conv3.conv.weight.dtype))


def inject_map(num_layers: int, inject_layers: list[int]) -> tuple[dict[int, int], int]:
    """({block: injector index}, number of injectors) as the release's code assigns them.

    It matches `transformer_blocks.<layer>` as a substring of each block's module name, in block
    order, so a layer list such as [1, 10] also "matches" block 10 for layer 1 and creates extra,
    unused injectors; the checkpoints hold exactly those, so the same rule is kept here. For the
    release's list every layer gets the next injector in block order.
    """
    index: dict[int, int] = {}
    count = 0
    for block in range(num_layers):
        name = f"root.transformer_blocks.{block}"
        for layer in inject_layers:
            if f"transformer_blocks.{layer}" in name:
                index[int(layer)] = count
                count += 1
    return index, count


class AudioInjector(nn.Module):
    """One cross-attention (+ its query norm) per injector (see `inject_map`)."""

    def __init__(
        self, dim: int, heads: int, num_layers: int, inject_layers: list[int], enable_adain: bool, adain_mode: str
    ):
        super().__init__()
        self.index, n = inject_map(num_layers, inject_layers)
        self.injector = nn.ModuleList([S2VAttention(dim, heads) for _ in range(n)])
        self.injector_pre_norm_feat = nn.ModuleList(
            [nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(n)]
        )
        self.use_adain = enable_adain and adain_mode == "attn_norm"
        if enable_adain:
            self.injector_adain_layers = nn.ModuleList(
                [AdaLayerNorm(embedding_dim=dim, output_dim=dim * 2, chunk_dim=1) for _ in range(n)]
            )
            if adain_mode != "attn_norm":  # in the release's code these exist and are never applied
                self.injector_adain_output_layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n)])

    def forward(
        self,
        block: int,
        x: torch.Tensor,
        video_tokens: int,
        audio: torch.Tensor,
        audio_global: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """x (B, L, C) after `block`; the first `video_tokens` are the noisy latent's, F frames of
        equal size; audio (B, F, tokens, C), audio_global (B, F, 1, C); `dtype` the compute dtype."""
        i = self.index[block]
        b, frames = audio.shape[0], audio.shape[1]
        video = x[:, :video_tokens].reshape(b * frames, video_tokens // frames, x.shape[2])
        if self.use_adain:
            assert audio_global is not None
            queries = self.injector_adain_layers[i](video, temb=audio_global.flatten(0, 1)[:, 0])
        else:
            queries = self.injector_pre_norm_feat[i](video)
        out = self.injector[i](queries.to(dtype), context=audio.flatten(0, 1).to(dtype))
        out = out.reshape(b, video_tokens, x.shape[2])
        return torch.cat([x[:, :video_tokens] + out, x[:, video_tokens:]], dim=1)
