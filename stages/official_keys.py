"""Names and shapes of the official Wan2.2 release checkpoints, next to the diffusers/transformers ones.

Pure functions, no file access: for each component a map from the diffusers (or transformers) state
dict key to the key the official release uses (`wan/modules/model.py`, `t5.py`, `vae2_1.py`,
`vae2_2.py` of Wan-Video/Wan2.2), and the reverse direction, the diffusers config read back from an
official config file and the tensor shapes. The loader (`stages/official.py`) uses them to check and
convert a checkpoint; the tiny builder uses them to write one, so both directions are one table.
"""

from __future__ import annotations

import re
from typing import Any

# ---- the DiT (WanModel <-> WanTransformer3DModel) ----------------------------------------------

# diffusers -> official, applied to a whole key in order. diffusers' own loader
# (`convert_wan_transformer_to_diffusers`) does the opposite direction on load.
_TRANSFORMER_RULES = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    # diffusers' norm2 is the (affine) norm before cross-attention, the official norm3
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
]


def transformer_key_to_official(key: str) -> str:
    for pattern, repl in _TRANSFORMER_RULES:
        key = re.sub(pattern, repl, key)
    return key


# The official config.json of a DiT (`WanModel`'s registered config: patch_size, text_dim, qk_norm,
# cross_attn_norm and window_size are left out of it, so text_dim and patch_size come from shapes).
OFFICIAL_TRANSFORMER_FIELDS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads",
                               "num_layers", "out_dim", "text_len")
OFFICIAL_ROPE_LEN = 1024  # WanModel builds its rope table for 1024 positions


def transformer_config_from_official(official: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers `WanTransformer3DModel` config for an official config.json and its tensors' shapes."""
    dim, heads = int(official["dim"]), int(official["num_heads"])
    patch = shapes["patch_embedding.weight"][2:]
    image = shapes.get("img_emb.proj.0.weight")
    return {
        "patch_size": list(patch),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(official["in_dim"]),
        "out_channels": int(official["out_dim"]),
        "text_dim": int(shapes["text_embedding.0.weight"][1]),
        "freq_dim": int(official["freq_dim"]),
        "ffn_dim": int(official["ffn_dim"]),
        "num_layers": int(official["num_layers"]),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": float(official["eps"]),
        "image_dim": None if image is None else int(image[0]),
        "added_kv_proj_dim": None if image is None else dim,
        "rope_max_seq_len": OFFICIAL_ROPE_LEN,
    }


def transformer_config_to_official(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The official config.json for a diffusers transformer config (the inverse of the above)."""
    if config.get("qk_norm") != "rms_norm_across_heads" or not config.get("cross_attn_norm"):
        raise ValueError("the official WanModel always has qk_norm across heads and a cross-attention norm")
    if int(config.get("rope_max_seq_len", OFFICIAL_ROPE_LEN)) != OFFICIAL_ROPE_LEN:
        raise ValueError(f"the official WanModel's rope table has {OFFICIAL_ROPE_LEN} positions")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": heads * head_dim,
        "eps": config["eps"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "in_dim": config["in_channels"],
        "model_type": model_type,
        "num_heads": heads,
        "num_layers": config["num_layers"],
        "out_dim": config["out_channels"],
        "text_len": 512,
    }


# ---- the text encoder (Wan's T5Encoder <-> transformers' UMT5EncoderModel) ---------------------

_T5_RULES = [
    (r"^(shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]
T5_MAX_DISTANCE = 128  # Wan's T5RelativeEmbedding default; umt5-xxl's too
T5_EPS = 1e-6


def t5_key_to_official(key: str) -> str:
    for pattern, repl in _T5_RULES:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    raise KeyError(f"no official name for text encoder tensor {key!r}")


def t5_config_from_official(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """UMT5Config kwargs for an official umt5 encoder state dict (Wan's `umt5_xxl` fixes the rest)."""
    vocab, d_model = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": shapes["blocks.0.attn.q.weight"][0] // heads,
        "d_ff": shapes["blocks.0.ffn.fc1.weight"][0],
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": T5_MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": T5_EPS,
        "dropout_rate": 0.0,
    }


def check_t5_config_expressible(config: Any) -> None:
    """The official file holds only weights: the rest of the encoder must be what Wan's code fixes."""
    wanted = {"relative_attention_max_distance": T5_MAX_DISTANCE, "feed_forward_proj": "gated-gelu",
              "layer_norm_epsilon": T5_EPS}
    for key, value in wanted.items():
        if getattr(config, key) != value:
            raise ValueError(f"the official T5 encoder has {key}={value!r}, this one {getattr(config, key)!r}")


# ---- the VAEs (Wan2.1: WanVAE_ of vae2_1.py; Wan2.2: WanVAE_ of vae2_2.py) -----------------------

_RESNET = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_RESAMPLE = ("resample.", "time_conv.")


def _resnet(prefix: str, suffix: str) -> str:
    return f"{prefix}.{_RESNET[suffix]}"


def vae_key_to_official(key: str, num_res_blocks: int, residual: bool) -> str:
    """Official name of an `AutoencoderKLWan` tensor. `residual` is the Wan2.2 VAE (is_residual), whose
    levels are nested blocks; the Wan2.1 VAE keeps every block of every level in one flat list."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise KeyError(key)
    if rest.startswith("conv_in."):
        return f"{head}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("conv_out."):
        return f"{head}.head.2.{rest[len('conv_out.'):]}"
    if rest == "norm_out.gamma":
        return f"{head}.head.0.gamma"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)
    if m:
        kind, i, suffix = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"{head}.middle.1.{suffix}"
        return _resnet(f"{head}.middle.{2 * i}", suffix)
    if head == "encoder":
        if residual:
            m = re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
            if m:
                return _resnet(f"encoder.downsamples.{m[1]}.downsamples.{m[2]}", m[3])
            m = re.match(r"down_blocks\.(\d+)\.downsampler\.(.+)$", rest)
            if m:
                return f"encoder.downsamples.{m[1]}.downsamples.{num_res_blocks}.{m[2]}"
        else:
            m = re.match(r"down_blocks\.(\d+)\.(.+)$", rest)
            if m:
                if m[2].startswith(_RESAMPLE):
                    return f"encoder.downsamples.{m[1]}.{m[2]}"
                return _resnet(f"encoder.downsamples.{m[1]}", m[2])
    else:
        m = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", rest)
        if m:
            i, j = int(m[1]), int(m[2])
            if residual:
                prefix = f"decoder.upsamples.{i}.upsamples.{j}"
            else:
                prefix = f"decoder.upsamples.{i * (num_res_blocks + 2) + j}"
            return _resnet(prefix, m[3])
        m = re.match(r"up_blocks\.(\d+)\.(upsampler|upsamplers\.0)\.(.+)$", rest)
        if m:
            i = int(m[1])
            prefix = (f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}" if residual
                      else f"decoder.upsamples.{i * (num_res_blocks + 2) + num_res_blocks + 1}")
            return f"{prefix}.{m[3]}"
    raise KeyError(f"no official name for VAE tensor {key!r}")


# Per-channel latent statistics: not in the .pth files, fixed in the official VAE classes
# (Wan2_1_VAE / Wan2_2_VAE). diffusers' AutoencoderKLWan defaults hold the Wan2.1 ones.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]


def latents_stats(wan22: bool) -> tuple[list[float], list[float]]:
    if wan22:
        return list(WAN22_LATENTS_MEAN), list(WAN22_LATENTS_STD)
    import inspect

    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return list(params["latents_mean"].default), list(params["latents_std"].default)


def vae_config_from_official(shapes: dict[str, tuple[int, ...]], wan22: bool) -> dict[str, Any]:
    """`AutoencoderKLWan` config read off an official VAE state dict's keys and shapes.

    Raises KeyError naming a tensor the reading needs when the file lacks it.
    """
    base = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv2.weight"][0]
    if wan22:
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
        nrb = len({k.split(".")[4] for k in shapes if k.startswith("encoder.downsamples.0.downsamples.")
                   and ".residual." in k})
        first = [f"encoder.downsamples.{i}.downsamples.0.residual.2.weight" for i in levels]
        down = [f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv.weight" in shapes for i in levels[:-1]]
    else:
        entries = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
        resamples = [i for i in entries if f"encoder.downsamples.{i}.resample.1.weight" in shapes]
        nrb = resamples[0] if resamples else len(entries)
        levels = list(range(len(resamples) + 1))
        first = [f"encoder.downsamples.{i * (nrb + 1)}.residual.2.weight" for i in levels]
        down = [f"encoder.downsamples.{i}.time_conv.weight" in shapes for i in resamples]
    dim_mult = [shapes[k][0] // base for k in first]
    in_channels = shapes["encoder.conv1.weight"][1]
    patch = int(round((in_channels // 3) ** 0.5))
    mean, std = latents_stats(wan22)
    if len(mean) != z_dim:
        raise KeyError(f"conv2.weight of a z{len(mean)} VAE (found z{z_dim})")
    config: dict[str, Any] = {
        "base_dim": base,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": nrb,
        "attn_scales": [],
        "temperal_downsample": down,
        "dropout": 0.0,
        "latents_mean": mean,
        "latents_std": std,
    }
    if wan22:
        config.update(
            decoder_base_dim=shapes["decoder.conv1.weight"][0] // dim_mult[-1],
            is_residual=True,
            in_channels=in_channels,
            out_channels=shapes["decoder.head.2.weight"][0],
            patch_size=patch,
            scale_factor_spatial=2 ** (len(levels) - 1) * patch,
            scale_factor_temporal=2 ** sum(down),
        )
    else:
        config.update(scale_factor_spatial=2 ** (len(levels) - 1), scale_factor_temporal=2 ** sum(down))
    return config


# ---- the S2V DiT (WanModel_S2V of wan/modules/s2v/model_s2v.py) ---------------------------------
# Our `stages/s2v/transformer.WanS2VTransformer` keeps the release's parameter names, so its state
# dict needs no map; only the config is read. The release's class fills a key its config.json lacks
# with its own default (below; from WanModel_S2V.__init__), so the same defaults apply here. Its
# `text_dim` and `patch_size` are not in the config (ignore_for_config): read from the shapes.

S2V_CLASS_NAME = "WanModel_S2V"
S2V_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "cond_dim": 0, "audio_dim": 5120, "num_audio_token": 4, "enable_adain": False, "adain_mode": "attn_norm",
    "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27], "zero_init": False, "zero_timestep": False,
    "enable_motioner": True, "add_last_motion": True, "enable_tsm": False, "trainable_token_pos_emb": False,
    "motion_token_num": 1024, "enable_framepack": False, "framepack_drop_mode": "drop", "model_type": "s2v",
    "text_len": 512, "in_dim": 16, "dim": 2048, "ffn_dim": 8192, "freq_dim": 256, "out_dim": 16, "num_heads": 16,
    "num_layers": 32, "eps": 1e-6,
}


def is_s2v_config(official: dict[str, Any]) -> bool:
    return official.get("model_type") == "s2v" or official.get("_class_name") == S2V_CLASS_NAME


def s2v_config_from_official(official: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """`WanS2VTransformer` kwargs for a release config.json and its tensors' shapes.

    Raises KeyError naming a tensor the reading needs when the checkpoint lacks it.
    """
    config = {k: official.get(k, v) for k, v in S2V_OFFICIAL_DEFAULTS.items()}
    config["audio_inject_layers"] = [int(i) for i in config["audio_inject_layers"]]
    config["patch_size"] = [int(p) for p in shapes["patch_embedding.weight"][2:]]
    config["text_dim"] = int(shapes["text_embedding.0.weight"][1])
    config["audio_states"] = int(shapes["casual_audio_encoder.weights"][1])
    return config


def s2v_config_to_official(config: dict[str, Any]) -> dict[str, Any]:
    """The release-style config.json of a `WanS2VTransformer` config (the inverse of the above)."""
    from stages.s2v.audio_injection import WAV2VEC_STATES

    if int(config.get("audio_states", WAV2VEC_STATES)) != WAV2VEC_STATES:
        raise ValueError(f"the release's audio encoder averages {WAV2VEC_STATES} wav2vec2 hidden states")
    out: dict[str, Any] = {"_class_name": S2V_CLASS_NAME, "_diffusers_version": "0.35.1"}
    out |= {k: config[k] for k in S2V_OFFICIAL_DEFAULTS}
    out["audio_inject_layers"] = list(out["audio_inject_layers"])
    return out
