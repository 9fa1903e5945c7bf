"""Tiny random-initialised Wan2.2 pipelines, built deterministically from a seed.

They have the real architectures (diffusers' WanTransformer3DModel and AutoencoderKLWan,
transformers' UMT5EncoderModel, a T5 Unigram tokenizer) at toy sizes, and are saved with
`save_pretrained` in the diffusers layout, so the stages load them through the same
`from_pretrained` code that loads real checkpoints. Same seed, same files.

    python -m stages.tiny_models --out DIR [--model t2v-A14B|ti2v-5B] [--seed 0]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import logging
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_SHAPES = ("t2v-A14B", "ti2v-5B")

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
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return UMT5EncoderModel(config).eval()


def build_transformer(seed: int, channels: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
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
    # Wan2.2 VAE: z48, patchified 2x2 on the way in, 16x spatial, 4x temporal, residual blocks
    g = torch.Generator().manual_seed(seed + 1)
    return AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[round(float(x), 4) for x in torch.randn(48, generator=g) * 0.1],
        latents_std=[round(float(x), 4) for x in torch.rand(48, generator=g) + 0.5],
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()


def build_pipeline(model: str, seed: int):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    if model not in TINY_SHAPES:
        raise ValueError(f"no tiny shape for {model!r}; known: {TINY_SHAPES}")
    tokenizer = build_tokenizer(seed)
    text_encoder = build_text_encoder(seed + 10, len(tokenizer))
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


def ensure(model: str, seed: int, cache_dir: Path) -> Path:
    """The tiny model folder for (model, seed) under `cache_dir`, built on first use.

    Several processes start together under supervisord; a file lock makes one of them build while
    the others wait, and a finished build is only ever seen whole (built aside, then renamed).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"tiny-{model}-seed{seed}"
    if (out / "tiny_model.json").exists():
        return out
    with open(cache_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tiny_model.json").exists():
            log.info("building tiny %s (seed %d) into %s", model, seed, out)
            build(model, seed, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="t2v-A14B", choices=TINY_SHAPES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.model, args.seed, args.out))


if __name__ == "__main__":
    main()
