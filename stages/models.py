"""Finding and loading model components for the stages.

A model in the profile is either a folder on disk (`path = "..."`, the diffusers layout) or, in the
tiny profile, `tiny = true`: the tiny pipeline of that shape is built on first start into the model
cache and then loaded exactly like a real checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import Config
from common.errors import ModelLoadError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unsupported dtype {name!r}", {"dtype": name, "allowed": sorted(TORCH_DTYPES)}) from None


def model_dir(config: Config, model: str) -> Path:
    spec = config.model(model)
    if spec.get("tiny"):
        from stages import tiny_models

        shape = spec.get("tiny_shape", model)
        return tiny_models.ensure(shape, int(spec.get("seed", 0)), config.model_cache_dir)
    if not spec.get("path"):
        raise ModelLoadError(f"model {model!r} has no path in the config", {"model": model})
    folder = config.path(spec["path"])
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder: model_index.json is missing",
            {"model": model, "path": str(folder), "expected": "model_index.json"},
        )
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing", {"path": str(path)}) from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}", {"path": str(path)}) from None


def load_component(loader: Any, folder: Path, subfolder: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(folder, subfolder=...)`, with failures turned into MODEL_LOAD_ERROR."""
    try:
        return loader.from_pretrained(folder, subfolder=subfolder, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {subfolder} from {folder}: {type(exc).__name__}: {exc}",
            {"path": str(folder / subfolder), "component": subfolder},
        ) from exc


@dataclass(frozen=True)
class PipelineInfo:
    """What a stage needs to know about a model's pipeline without loading its weights."""

    folder: Path
    boundary_ratio: float | None
    expand_timesteps: bool
    has_transformer_2: bool
    vae_scale_temporal: int
    vae_scale_spatial: int
    z_dim: int
    patch_size: tuple[int, int, int]

    @classmethod
    def read(cls, folder: Path) -> PipelineInfo:
        index = read_json(folder / "model_index.json")
        vae = read_json(folder / "vae" / "config.json")
        tname = "transformer" if index.get("transformer", [None])[0] else "transformer_2"
        transformer = read_json(folder / tname / "config.json")
        return cls(
            folder=folder,
            boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=bool(index.get("expand_timesteps", False)),
            has_transformer_2=bool(index.get("transformer_2", [None])[0]),
            vae_scale_temporal=int(vae.get("scale_factor_temporal", 4)),
            vae_scale_spatial=int(vae.get("scale_factor_spatial", 8)),
            z_dim=int(vae.get("z_dim", 16)),
            patch_size=tuple(transformer.get("patch_size", (1, 2, 2))),
        )
