"""Model configs at real size (the released checkpoints' configs) and tiny ones for `--small`."""

from __future__ import annotations

from typing import Any

import torch

TI2V_5B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
A14B: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Wan2.2 VAE latents_mean / latents_std (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json).
WAN22_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]
VAE22: dict[str, Any] = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
    dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
    scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=WAN22_MEAN, latents_std=WAN22_STD,
)
VAE21: dict[str, Any] = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             temperal_downsample=[False, True, True])

REAL: dict[str, Any] = {
    "device": "cuda",
    "dtype": "bfloat16",
    "text_len": 512,
    "text_dim": 4096,
    "ti2v": dict(name="ti2v-5B", config=TI2V_5B, width=1280, height=704, frames=121, fps=24, shift=5.0,
                 guidance=5.0, spatial=16, expand_timesteps=True),
    "a14b": dict(name="t2v-A14B", config=A14B, width=832, height=480, frames=81, fps=16, shift=12.0,
                 guidance=4.0, spatial=8, boundary=0.875),
    "vae22": dict(name="ti2v-5B", config=VAE22, width=1280, height=704, frames=121, fps=24, spatial=16),
    "vae21": dict(name="t2v-A14B", config=VAE21, width=832, height=480, frames=81, fps=16, spatial=8),
    "vae_dtypes": ["float32", "bfloat16"],  # the second only if the budget allows
}


def tiny_dit(channels: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )


SMALL: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "text_len": 16,
    "text_dim": 32,
    "ti2v": dict(REAL["ti2v"], config=tiny_dit(48), width=64, height=32, frames=9),
    "a14b": dict(REAL["a14b"], config=tiny_dit(16), width=64, height=48, frames=9),
    "vae22": dict(REAL["vae22"], config=dict(VAE22, base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1],
                                             num_res_blocks=1), width=64, height=32, frames=9),
    "vae21": dict(REAL["vae21"], config=dict(VAE21, base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
                  width=64, height=48, frames=9),
    "vae_dtypes": ["float32", "bfloat16"],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def latent_shape(sp: dict[str, Any], channels: int) -> tuple[int, int, int, int, int]:
    """(1, C, F, H, W) latents of a job of this size: 4x temporal and `spatial`x spatial compression."""
    return (1, channels, (sp["frames"] - 1) // 4 + 1, sp["height"] // sp["spatial"], sp["width"] // sp["spatial"])
