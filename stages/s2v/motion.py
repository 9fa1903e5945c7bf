"""FramePack: the previous clip's motion latents as a few extra tokens of the S2V DiT (`frame_packer`).

The last 19 latent frames before the clip (zero-padded in front when there are fewer) are split,
nearest first, into buckets of 1, 2 and 16 frames, each patch-embedded by its own Conv3d at a
coarser scale: (1, 2, 2) like the video tokens, (2, 4, 4) and (4, 8, 8). So the most recent frame
keeps full detail and the far past costs few tokens (for a 1024x704 clip: 2816 + 176 + 44 tokens).
Their rotary positions lie before the clip, at negative times (-1; -3; -19..-4, spread over the
bucket's frames), with the coarse buckets' tokens spread over the full-resolution position range.

`add_last_motion` < 2 zeroes (drop mode "padd", the release's) or leaves out (drop mode "drop") the
nearest buckets. The latent channels are fixed at 16 (the Wan2.1 VAE), as in the release.
"""

from __future__ import annotations

import torch
from torch import nn

from stages.s2v.rope import Grid, grid_freqs, rope_table

BUCKETS = (1, 2, 16)  # latent frames per bucket, nearest first
LATENT_CHANNELS = 16


class FramePackMotioner(nn.Module):
    def __init__(self, dim: int, heads: int, drop_mode: str = "padd"):
        super().__init__()
        if drop_mode not in ("drop", "padd"):
            raise ValueError(f"framepack drop mode must be 'drop' or 'padd', got {drop_mode!r}")
        self.proj = nn.Conv3d(LATENT_CHANNELS, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(LATENT_CHANNELS, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(LATENT_CHANNELS, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))
        self.drop_mode = drop_mode
        self.table = rope_table(dim // heads)

    def grids(self, lat_h: int, lat_w: int, add_last_motion: int) -> list[Grid]:
        near, mid, far = BUCKETS
        span = (lat_h // 2, lat_w // 2)
        keep_near = add_last_motion >= 2 or self.drop_mode != "drop"
        keep_mid = add_last_motion >= 1 or self.drop_mode != "drop"
        grids = []
        if keep_near:
            grids.append(Grid((-near, 0, 0), (-near + near, lat_h // 2, lat_w // 2), (near, *span)))
        if keep_mid:
            s = -(near + mid)
            grids.append(Grid((s, 0, 0), (s + mid // 2, lat_h // 4, lat_w // 4), (mid, *span)))
        s = -(near + mid + far)
        grids.append(Grid((s, 0, 0), (s + far // 4, lat_h // 8, lat_w // 8), (far, *span)))
        return grids

    def forward(self, motion: torch.Tensor, add_last_motion: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """motion (C, T, h, w) latents of one sample -> tokens (1, N, dim) and their rotary factors
        (N, head_dim // 2) complex128."""
        total = sum(BUCKETS)
        _, t, lat_h, lat_w = motion.shape
        packed = motion.new_zeros(LATENT_CHANNELS, total, lat_h, lat_w)
        overlap = min(total, t)
        if overlap > 0:
            packed[:, -overlap:] = motion[:, -overlap:]
        if add_last_motion < 2 and self.drop_mode != "drop":
            zeroed = sum(BUCKETS[: len(BUCKETS) - add_last_motion - 1])
            packed[:, -zeroed:] = 0
        far, mid, near = packed.unsqueeze(0).split(list(BUCKETS)[::-1], dim=2)
        tokens = [
            p(x).flatten(2).transpose(1, 2) for p, x in ((self.proj, near), (self.proj_2x, mid), (self.proj_4x, far))
        ]
        if add_last_motion < 2 and self.drop_mode == "drop":
            tokens[0] = tokens[0][:, :0]
            if add_last_motion < 1:
                tokens[1] = tokens[1][:, :0]
        return torch.cat(tokens, dim=1), grid_freqs(self.table, self.grids(lat_h, lat_w, add_last_motion))
