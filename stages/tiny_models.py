"""Tiny random-initialised Wan2.2 pipelines, built deterministically from a seed.

They have the real architectures (diffusers' WanTransformer3DModel and AutoencoderKLWan,
transformers' UMT5EncoderModel, a T5 Unigram tokenizer) at toy sizes, and are saved with
`save_pretrained` in the diffusers layout, so the stages load them through the same
`from_pretrained` code that loads real checkpoints. Same seed, same files.

`write_official` writes the same weights again in the official Wan2.2 release layout (the names,
shapes and files of the published checkpoints), which `stages/official.py` loads.

    python -m stages.tiny_models --out DIR [--model t2v-A14B|i2v-A14B|ti2v-5B] [--seed 0] [--layout diffusers|official]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from stages import official, official_keys

log = logging.getLogger(__name__)

TINY_SHAPES = ("t2v-A14B", "i2v-A14B", "ti2v-5B")

TEXT_DIM = 32
_WORDS = (
    "a the cat dog bird fish horse robot woman man child astronaut dancer car train boat plane city forest beach "
    "mountain river ocean desert snow rain night sunset sunrise street market garden kitchen stage sky cloud "
    "walks runs flies swims dances jumps drives floats glows spins falls rises sings plays sleeps waves turns "
    "red blue green golden silver dark bright slow fast tiny giant old young quiet loud soft neon misty calm "
    "in on under over through across near behind beside with and of at by from into toward camera pans zooms "
    "cinematic close-up wide shot aerial view lighting shadows reflections smoke fire water light colour motion"
).split()


def _corpus(seed: int, n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx))
    return lines


def build_tokenizer(seed: int):
    """A small Unigram vocabulary trained offline, wrapped as the T5 tokenizer Wan uses."""
    # The Unigram trainer's EM runs in parallel and its float sums then differ in the last bits
    # from run to run; train sequentially, and round, so the same seed gives the same file.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    vocab = [(piece, round(float(score), 6)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_text_encoder(seed: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=128,  # as umt5-xxl, and fixed in the official T5 code
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def build_transformer(seed: int, channels: int, out_channels: int | None = None):
    """`channels` in; `out_channels` (default the same) out. The I2V-A14B experts take the noise
    latents concatenated with a 4-channel frame mask and the 16 condition latents (36 in, 16 out)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=out_channels or channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,  # as the official WanModel's rope table
    ).eval()


def build_vae(seed: int, wan22: bool):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if not wan22:  # Wan2.1 VAE: z16, 8x spatial, 4x temporal
        return AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    # Wan2.2 VAE: z48, patchified 2x2 on the way in, 16x spatial, 4x temporal, residual blocks;
    # the latent statistics are the release's (the official checkpoint has no place for others)
    from stages.official_keys import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()


def build_pipeline(model: str, seed: int):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    if model not in TINY_SHAPES:
        raise ValueError(f"no tiny shape for {model!r}; known: {TINY_SHAPES}")
    tokenizer = build_tokenizer(seed)
    text_encoder = build_text_encoder(seed + 10, len(tokenizer))
    if model == "i2v-A14B":
        # As Wan2.2-I2V-A14B-Diffusers: WanImageToVideoPipeline, two experts taking 16 noise + 4 mask
        # + 16 condition latent channels, Wan2.1 VAE, no CLIP image encoder (Wan2.2 has none),
        # boundary 0.900, UniPC with shift 5.
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000
        )
        return WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=build_vae(seed + 30, False),
            scheduler=scheduler,
            image_processor=None,
            image_encoder=None,
            transformer=build_transformer(seed + 20, 36, 16),
            transformer_2=build_transformer(seed + 21, 36, 16),
            boundary_ratio=0.9,
        )
    if model == "t2v-A14B":
        shift, boundary, channels, wan22 = 12.0, 0.875, 16, False
        transformer = build_transformer(seed + 20, channels)
        transformer_2 = build_transformer(seed + 21, channels)
    else:
        shift, boundary, channels, wan22 = 5.0, None, 48, True
        transformer = build_transformer(seed + 20, channels)
        transformer_2 = None
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=build_vae(seed + 30, wan22),
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary,
        expand_timesteps=wan22,
    )


def build(model: str, seed: int, out: Path) -> Path:
    """Write the tiny pipeline for `model` to `out` (diffusers layout). Returns `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build_pipeline(model, seed).save_pretrained(tmp, safe_serialization=True)
        (tmp / "tiny_model.json").write_text(json.dumps({"model": model, "seed": seed}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _shards(state: dict[str, torch.Tensor], out: Path, n: int) -> None:
    """Sharded safetensors with an index json, named as the release names them."""
    from safetensors.torch import save_file

    names = sorted(state)
    n = max(1, min(n, len(names)))
    per = -(-len(names) // n)
    weight_map = {}
    for i in range(n):
        part = names[i * per : (i + 1) * per]
        if not part:
            continue
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / official.INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_official(src: Path, out: Path, model_type: str, shards: int = 2) -> Path:
    """Write the diffusers-layout pipeline in `src` to `out` in the official Wan2.2 release layout.

    The same tensors under the release's names and shapes: `high_noise_model/` + `low_noise_model/`
    (two experts) or the one DiT at the top, `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth` or
    `Wan2.2_VAE.pth`, and `google/umt5-xxl/`. What the official files cannot express (they hold
    weights, and the code fixes the rest) is refused rather than silently changed.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    src, out = Path(src), Path(out)
    facts = official.MODEL_TYPES[model_type]
    index = json.loads((src / "model_index.json").read_text())
    two = bool(index.get("transformer_2", [None])[0])
    scheduler = UniPCMultistepScheduler.load_config(src, subfolder="scheduler")
    boundary_differs = two and index.get("boundary_ratio") != facts["boundary_ratio"]
    if float(scheduler["flow_shift"]) != facts["flow_shift"] or boundary_differs:
        raise ValueError(f"{src}: flow_shift/boundary_ratio differ from the official {model_type} model's {facts}")
    if bool(index.get("expand_timesteps", False)) != facts["expand_timesteps"]:
        raise ValueError(f"{src}: expand_timesteps differs from the official {model_type} model's")
    out.mkdir(parents=True, exist_ok=True)

    experts = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"} if two else {"transformer": "."}
    for name, where in experts.items():
        model = WanTransformer3DModel.from_pretrained(src, subfolder=name)
        folder = out / where
        folder.mkdir(parents=True, exist_ok=True)
        state = {official_keys.transformer_key_to_official(k): v for k, v in model.state_dict().items()}
        _shards(state, folder, shards)
        config = official_keys.transformer_config_to_official(dict(model.config), model_type)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae")
    wan22 = bool(vae.config.is_residual)
    mean, std = official_keys.latents_stats(wan22)
    if list(vae.config.latents_mean) != mean or list(vae.config.latents_std) != std:
        raise ValueError(f"{src}: the VAE's latents_mean/std are not the release's (the .pth cannot hold others)")
    nrb = vae.config.num_res_blocks
    state = {official_keys.vae_key_to_official(k, nrb, wan22): v.contiguous() for k, v in vae.state_dict().items()}
    torch.save(state, out / ("Wan2.2_VAE.pth" if wan22 else "Wan2.1_VAE.pth"))

    encoder = UMT5EncoderModel.from_pretrained(src, subfolder="text_encoder")
    official_keys.check_t5_config_expressible(encoder.config)
    state = {official_keys.t5_key_to_official(k): v.contiguous() for k, v in encoder.state_dict().items()}
    torch.save(state, out / official.T5_FILE)
    shutil.copytree(src / "tokenizer", out / official.TOKENIZER_DIR)
    return out


# The tiny S2V DiT: the release's switches (AdaIN audio injection, zero_timestep, FramePack "padd"),
# 16 latent channels, the audio encoder taking a tiny wav2vec2's 32-wide hidden states (25 of them),
# three blocks with audio injected after the first and the last.
TINY_S2V_CONFIG: dict[str, Any] = {
    "cond_dim": 16, "audio_dim": 32, "num_audio_token": 4, "enable_adain": True, "adain_mode": "attn_norm",
    "audio_inject_layers": [0, 2], "zero_init": True, "zero_timestep": True, "enable_motioner": False,
    "add_last_motion": True, "enable_framepack": True, "framepack_drop_mode": "padd", "in_dim": 16, "out_dim": 16,
    "dim": 24, "ffn_dim": 32, "freq_dim": 32, "text_dim": TEXT_DIM, "num_heads": 2, "num_layers": 3,
}


def build_s2v_transformer(seed: int):
    """The tiny S2V DiT (`stages/s2v/transformer.WanS2VTransformer`), random from `seed`.

    The release initialises some weights to zero for training (the audio injectors' outputs, the
    pose encoder, the token-kind embedding) and the layer weights of the audio average to equal
    values; here every one is random, so audio, pose and token kinds all change the output.
    """
    from stages.s2v.transformer import WanS2VTransformer

    torch.manual_seed(seed)
    model = WanS2VTransformer(**TINY_S2V_CONFIG)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weights", "padding_tokens", "trainable_cond_mask.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def write_s2v_transformer(out: Path, seed: int, shards: int = 4) -> Path:
    """Write the tiny S2V DiT into `out` as the release lays its DiT out at the top of the folder:
    `diffusion_pytorch_model-0000N-of-0000M.safetensors`, the index json and `config.json`
    (`_class_name` WanModel_S2V, model_type s2v). The rest of an S2V folder (VAE, T5, tokenizer,
    wav2vec2) is written by the others' builders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_s2v_transformer(seed)
    _shards(dict(model.state_dict()), out, shards)
    config = official_keys.s2v_config_to_official(dict(model.config))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


S2V_SHAPE = "s2v-14B"  # official layout only: the release's is the only S2V layout there is


def build_s2v(seed: int, out: Path) -> Path:
    """A whole tiny S2V-14B folder in the release layout, written aside and renamed into `out`: the
    UMT5 encoder, tokenizer and Wan2.1 VAE of the tiny T2V build of the same seed (the release's
    files), the tiny S2V DiT at the top (`write_s2v_transformer`) and the tiny wav2vec2 folder
    (`stages/s2v/audio_features.write_tiny_wav2vec2`, 24 layers: the DiT's 25-state average)."""
    from stages.s2v.audio_features import FOLDER, write_tiny_wav2vec2

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        base = build("t2v-A14B", seed, tmp / "base")
        folder = write_official(base, tmp / "s2v", "t2v")
        for expert in official.EXPERT_DIRS.values():  # the T2V experts: S2V has its one DiT at the top
            shutil.rmtree(folder / expert)
        write_s2v_transformer(folder, seed)
        write_tiny_wav2vec2(folder / FOLDER, seed)
        (folder / "tiny_model.json").write_text(json.dumps({"model": S2V_SHAPE, "seed": seed, "layout": "official"},
                                                           indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(model: str, seed: int, cache_dir: Path, layout: str = "diffusers") -> Path:
    """The tiny model folder for (model, seed, layout) under `cache_dir`, built on first use.

    Several processes start together under supervisord; a file lock makes one of them build while
    the others wait, and a finished build is only ever seen whole (built aside, then renamed). The
    official layout is written from the diffusers-layout build: the same weights.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if model == S2V_SHAPE:
        if layout != "official":
            raise ValueError(f"the tiny {model} is built in the official layout only (set layout = \"official\")")
        s2v = cache_dir / f"tiny-{model}-seed{seed}-official"
        if not (s2v / "tiny_model.json").exists():
            with open(cache_dir / ".build.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (s2v / "tiny_model.json").exists():
                    log.info("building tiny %s (seed %d) into %s", model, seed, s2v)
                    build_s2v(seed, s2v)
        return s2v
    out = cache_dir / f"tiny-{model}-seed{seed}"
    wanted = out if layout == "diffusers" else cache_dir / f"tiny-{model}-seed{seed}-{layout}"
    if (wanted / "tiny_model.json").exists():
        return wanted
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tiny_model.json").exists():
            log.info("building tiny %s (seed %d) into %s", model, seed, out)
            build(model, seed, out)
        if layout == "official" and not (wanted / "tiny_model.json").exists():
            log.info("writing tiny %s (seed %d) in the official layout into %s", model, seed, wanted)
            build_official(out, wanted)
    return wanted


def build_official(src: Path, out: Path) -> Path:
    """The official layout of the tiny model built in `src`, written aside and renamed into place."""
    marker = json.loads((src / "tiny_model.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_official(src, tmp, marker["model"].split("-")[0])
        (tmp / "tiny_model.json").write_text(json.dumps({**marker, "layout": "official"}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="t2v-A14B", choices=(*TINY_SHAPES, S2V_SHAPE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="diffusers", choices=("diffusers", "official"))
    args = parser.parse_args(argv)
    if args.model == S2V_SHAPE:  # the release layout only
        print(build_s2v(args.seed, args.out))
        return
    if args.layout == "diffusers":
        print(build(args.model, args.seed, args.out))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:  # the same weights, then rewritten
        print(build_official(build(args.model, args.seed, Path(tmp) / "diffusers"), args.out))


if __name__ == "__main__":
    main()
