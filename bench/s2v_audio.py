"""What the S2V audio path costs on this machine's CPU for a minute of audio: checking the upload
(common/audio.py `probe`), decoding it to 16 kHz mono (`load_16k_mono`), and the wav2vec2 features
(stages/s2v/audio_features.py) with the tiny wav2vec2 and with a randomly initialised model of the
release's size (wav2vec2-large-xlsr-53: 24 layers, 1024 wide, 315M parameters; no weights needed,
the cost is the same). The reference runs wav2vec2 on the CPU in float32 too.

    .venv/bin/python bench/s2v_audio.py [--seconds 60] [--runs 3] [--no-large] [--out bench/results]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.audio import AudioLimits, load_16k_mono, probe  # noqa: E402
from stages.s2v.audio_features import Wav2Vec2Features, write_tiny_wav2vec2  # noqa: E402
from tests.helpers import encode_audio  # noqa: E402

LARGE = dict(  # wav2vec2-large-xlsr-53-english's config.json (the fields that set the cost)
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, conv_dim=(512,) * 7,
    conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True, feat_extract_norm="layer",
    do_stable_layer_norm=True, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33,
)


def audio_file(kind: str, seconds: float, rate: int = 44100) -> bytes:
    """`seconds` of two tones plus noise, 44.1 kHz stereo, as WAV (s16) or MP3."""
    muxer, codec = {"wav": ("wav", "pcm_s16le"), "mp3": ("mp3", "libmp3lame")}[kind]
    n = int(rate * seconds)
    t = np.arange(n) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in (220, 330)])
    x += 0.05 * np.random.default_rng(0).standard_normal(x.shape)
    return encode_audio(x, rate, muxer, codec)


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-large", action="store_true", help="skip the release-sized wav2vec2")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    limits = AudioLimits(max_seconds=args.seconds + 1, max_bytes=1 << 30)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} cores={torch.get_num_threads()} torch={torch.__version__}",
        "date": time.strftime("%Y-%m-%d"), "seconds": args.seconds, "runs": args.runs, "decode": {}, "features": {},
    }
    samples = None
    for kind in ("wav", "mp3"):
        data = audio_file(kind, args.seconds)
        probe_s, info = timed(functools.partial(probe, data, None, limits), args.runs)
        load_s, samples = timed(functools.partial(load_16k_mono, data), args.runs)
        results["decode"][kind] = {"bytes": len(data), "duration_s": info.duration_s, "probe_s": probe_s,
                                   "load_16k_mono_s": load_s, "samples_16k": int(samples.shape[0])}
        print(kind, results["decode"][kind], flush=True)
    assert samples is not None
    with tempfile.TemporaryDirectory() as tmp:
        tiny = Wav2Vec2Features(write_tiny_wav2vec2(Path(tmp) / "w2v", seed=0))
        feats_s, feats = timed(lambda: tiny.features(samples), args.runs)
        results["features"]["tiny"] = {"hidden": tiny.dim, "states": tiny.num_states, "features_s": feats_s,
                                       "clips": feats.num_clips, "frames": list(feats.frames.shape)}
        print("tiny", results["features"]["tiny"], flush=True)
    if not args.no_large:
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        start = time.perf_counter()
        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config(**LARGE))
        build_s = time.perf_counter() - start
        large = Wav2Vec2Features.from_parts(tiny.extractor, model)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        feats_s, feats = timed(lambda: large.features(samples), 1)
        results["features"]["large"] = {
            "hidden": large.dim, "states": large.num_states, "parameters": sum(p.numel() for p in model.parameters()),
            "build_random_s": build_s, "features_s": feats_s, "clips": feats.num_clips,
            "frames": list(feats.frames.shape), "features_mib_float32": feats.frames.numel() * 4 / 2**20,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max_rss_before_mib": rss0 / 1024,
        }
        print("large", results["features"]["large"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "s2v_audio.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "s2v_audio.md").write_text(markdown(results))


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# S2V audio path, {r['seconds']:g} s of audio ({r['machine']}, {r['date']}, median of {r['runs']})", "",
             "| step | input | seconds |", "| --- | --- | ---: |"]
    for kind, d in r["decode"].items():
        size = f"{kind.upper()} 44.1 kHz stereo, {d['bytes'] / 2**20:.1f} MiB"
        lines.append(f"| probe (decode all, check bounds) | {size} | {d['probe_s']:.3f} |")
        lines.append(f"| load_16k_mono (decode, mean, soxr HQ) | {size} | {d['load_16k_mono_s']:.3f} |")
    for name, d in r["features"].items():
        what = f"wav2vec2 {name} ({d['states'] - 1} layers x {d['hidden']}), {d['clips']} clips of 80 frames"
        lines.append(f"| features (wav2vec2, 30 Hz, per frame) | {what} | {d['features_s']:.2f} |")
    large = r["features"].get("large")
    if large:
        lines += ["", f"Release-sized wav2vec2: {large['parameters'] / 1e6:.0f}M parameters (random, float32); "
                  f"features {large['frames']} = {large['features_mib_float32']:.0f} MiB in float32; "
                  f"process peak RSS {large['max_rss_mib']:.0f} MiB "
                  f"(before the forward {large['max_rss_before_mib']:.0f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
