"""S2V audio features: wav2vec2 hidden states, one [layers x dim] vector per video frame.

What the official Wan2.2 S2V code computes (wan/modules/s2v/audio_encoder.py, used by
wan/speech2video.py `encode_audio`), written here from its maths:

1. The 16 kHz mono samples (common/audio.py `load_16k_mono`, = `librosa.load(sr=16000)`) go through
   the folder's feature extractor (zero mean, unit variance) and wav2vec2 with every hidden state:
   25 states for the 24-layer model, [25, T, dim] at 50 Hz. The reference loads `Wav2Vec2ForCTC`;
   its CTC head is not used, so `Wav2Vec2Model` (the same weights, less `lm_head`) gives the same
   states. The reference runs it on the CPU in float32.
2. The states are resampled linearly (align_corners) from 50 Hz to 30 Hz: int(T / 50 * 30) frames.
3. Clips: int(frames30 / (frames_per_clip * 30 / fps)) + 1 of them (so audio that fills its clips
   exactly still gets one more clip, as the reference's does). Video frame k of the run (16 fps)
   takes the 30 Hz frame round(k / fps * 30) (numpy's rounding: halves to even); frames past the
   audio get zeros. The result holds clips x frames_per_clip vectors.
4. For clip r the DiT gets frames [r * F, (r + 1) * F) as [1, layers, dim, F] (`clip`), and the
   DiT's forward first puts the clip's first vector `motion_frames` times in front of it
   (`with_motion_prefix`; 73 frames, the motion frames' span), before the audio encoder head.

The reference then casts to the DiT's dtype (bfloat16); `clip(r, dtype=...)` does the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ModelLoadError

WAV2VEC_RATE = 50  # hidden states per second (the feature encoder's stride is 320 samples at 16 kHz)
FEATURE_RATE = 30  # the reference's intermediate rate (AudioEncoder.video_rate)
SAMPLE_RATE = 16000
FOLDER = "wav2vec2-large-xlsr-53-english"  # in the release folder
MOTION_FRAMES = 73  # the reference config's transformer.motion_frames


@dataclass(frozen=True)
class AudioFeatures:
    """Per-video-frame audio features of a whole job: [clips * frames_per_clip, layers, dim], float32."""

    frames: torch.Tensor
    num_clips: int
    frames_per_clip: int
    audio_frames: int  # 30 Hz frames that came from the audio (the rest are zeros)

    def clip(self, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The DiT's `audio_input` for clip `index`: [1, layers, dim, frames_per_clip]."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} of {self.num_clips}")
        part = self.frames[index * self.frames_per_clip:(index + 1) * self.frames_per_clip]
        out = part.permute(1, 2, 0).unsqueeze(0)
        return out if dtype is None else out.to(dtype)


def with_motion_prefix(audio_input: torch.Tensor, motion_frames: int = MOTION_FRAMES) -> torch.Tensor:
    """[B, layers, dim, F] -> [B, layers, dim, motion_frames + F]: the clip's first frame repeated in
    front, as the DiT's forward does before its audio encoder head (the motion frames' positions)."""
    first = audio_input[..., :1].expand(*audio_input.shape[:-1], motion_frames)
    return torch.cat([first, audio_input], dim=-1)


# ---- the maths after wav2vec2 ----


def to_feature_rate(states: torch.Tensor) -> torch.Tensor:
    """[layers, T, dim] at 50 Hz -> [layers, int(T / 50 * 30), dim] at 30 Hz (linear, align_corners)."""
    length = int(states.shape[1] / float(WAV2VEC_RATE) * FEATURE_RATE)
    if length < 1:
        raise ValueError(f"{states.shape[1]} wav2vec2 frames give no 30 Hz frame")
    moved = F.interpolate(states.transpose(1, 2), size=length, mode="linear", align_corners=True)
    return moved.transpose(1, 2)


def clip_count(audio_frames: int, frames_per_clip: int, fps: int) -> int:
    """Clips the audio gives: int(frames30 / (frames_per_clip * 30 / fps)) + 1, as the reference counts."""
    return int(audio_frames / (frames_per_clip * (FEATURE_RATE / fps))) + 1


def frame_indices(num_clips: int, frames_per_clip: int, fps: int) -> np.ndarray:
    """The 30 Hz frame each video frame takes (may be past the audio: those frames get zeros)."""
    total = num_clips * frames_per_clip
    span = math.ceil(total / fps * FEATURE_RATE)  # 30 Hz frames the clips cover
    times = np.linspace(0.0, total / fps, total, endpoint=False)
    return np.clip(np.round(times * FEATURE_RATE).astype(int), 0, span - 1)


def per_frame(states30: torch.Tensor, frames_per_clip: int, fps: int) -> AudioFeatures:
    """[layers, frames30, dim] -> AudioFeatures (on the CPU, float32)."""
    layers, audio_frames, dim = states30.shape
    clips = clip_count(audio_frames, frames_per_clip, fps)
    index = torch.from_numpy(frame_indices(clips, frames_per_clip, fps))
    out = torch.zeros(clips * frames_per_clip, layers, dim, dtype=torch.float32)
    inside = index < audio_frames
    out[inside] = states30.detach().to("cpu", torch.float32)[:, index[inside]].permute(1, 0, 2)
    return AudioFeatures(frames=out, num_clips=clips, frames_per_clip=frames_per_clip, audio_frames=audio_frames)


# ---- wav2vec2 ----


def load_wav2vec2(folder: Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(feature extractor, Wav2Vec2Model in float32, eval) from a transformers folder; a folder that
    is missing, or whose weights lack any tensor of the model, is a MODEL_LOAD_ERROR naming it."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    folder = Path(folder)
    for name in ("config.json", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{folder / name} is missing (a wav2vec2 transformers folder)",
                                 {"path": str(folder / name)})
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
        model, info = Wav2Vec2Model.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{folder}: the wav2vec2 model does not load: {type(exc).__name__}: {exc}",
                             {"path": str(folder)}) from None
    missing = sorted(info.get("missing_keys") or [])
    wrong = info.get("mismatched_keys") or []
    if missing or wrong:
        raise ModelLoadError(
            f"{folder}: the wav2vec2 weights lack {len(missing)} tensors (e.g. {', '.join(missing[:3])})"
            + (f" and {len(wrong)} have other shapes" if wrong else ""),
            {"path": str(folder), "missing": missing[:8], "wrong_shape": [str(w[0]) for w in wrong[:8]]},
        )
    if extractor.sampling_rate != SAMPLE_RATE:
        raise ModelLoadError(f"{folder}: the feature extractor takes {extractor.sampling_rate} Hz, not 16000",
                             {"path": str(folder), "sampling_rate": extractor.sampling_rate})
    return extractor, model.to(device).eval()


class Wav2Vec2Features:
    """The audio-feature half of the text encoder stage for s2v: 16 kHz samples -> AudioFeatures."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu"):
        self._use(*load_wav2vec2(folder, device))

    @classmethod
    def from_parts(cls, extractor: Any, model: Any) -> Wav2Vec2Features:
        """Around a feature extractor and a Wav2Vec2Model built elsewhere (the benchmark's random one)."""
        self = cls.__new__(cls)
        self._use(extractor, model.eval())
        return self

    def _use(self, extractor: Any, model: Any) -> None:
        self.extractor, self.model = extractor, model
        self.num_states = int(model.config.num_hidden_layers) + 1
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def hidden_states(self, samples: np.ndarray) -> torch.Tensor:
        """[states, T, dim] at 50 Hz, on the model's device."""
        values = self.extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        out = self.model(values.to(self.device), output_hidden_states=True)
        return torch.cat(out.hidden_states)

    def features(self, samples: np.ndarray, frames_per_clip: int = 80, fps: int = 16) -> AudioFeatures:
        states30 = to_feature_rate(self.hidden_states(samples)).to(torch.float32)
        return per_frame(states30, frames_per_clip, fps)


# ---- a tiny folder for tests ----

TINY_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "e", "i", "o", "u", "n", "s", "t"]


def tiny_config(hidden: int = 32, layers: int = 24) -> Any:
    """A small Wav2Vec2Config shaped like wav2vec2-large-xlsr-53's (stable layer norm, layer-normed
    feature encoder, the same strides: 50 states a second), `layers` layers + 1 = the states."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        vocab_size=len(TINY_VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_proj_dropout=0.0, hidden_dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def write_tiny_wav2vec2(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 24) -> Path:
    """A random-initialised wav2vec2 folder laid out as the release's (a `Wav2Vec2ForCTC` checkpoint,
    its feature extractor, a CTC tokenizer's vocab): the same seed gives the same tensors."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(tiny_config(hidden, layers)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(TINY_VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    extractor.save_pretrained(folder)  # preprocessor_config.json, as in the release
    tokenizer.save_pretrained(folder)  # what the reference's Wav2Vec2Processor also loads
    return folder
