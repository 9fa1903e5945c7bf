"""Finding and loading model components for the stages.

A model in the profile is either a folder on disk (`path = "..."`) or, in the tiny profile,
`tiny = true`: the tiny pipeline of that shape is built on first start into the model cache and then
loaded exactly like a real checkpoint. A folder is in one of two layouts (`layout = "diffusers"` or
`"official"`; found from the folder's files when not set): the diffusers layout
(`model_index.json` and one subfolder per component) or the official Wan2.2 release layout
(`stages/official.py`), converted on load into the same diffusers/transformers components.
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
from stages import official

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unsupported dtype {name!r}", {"dtype": name, "allowed": sorted(TORCH_DTYPES)}) from None




def layout_of(folder: Path) -> str | None:
    """The layout a folder's files show, None when they show neither (or both)."""
    diffusers, wan = (folder / "model_index.json").is_file(), official.is_official(folder)
    return None if diffusers == wan else "diffusers" if diffusers else "official"


def model_dir(config: Config, model: str) -> Path:
    spec = config.model(model)
    layout = spec.layout  # one of MODEL_LAYOUTS or None: the config checked it when the profile was read
    if spec.tiny:
        from stages import tiny_models

        shape = spec.tiny_shape or model
        return tiny_models.ensure(shape, spec.seed, config.model_cache_dir, layout or "diffusers")
    if not spec.path:
        raise ModelLoadError(f"model {model!r} has no path in the config", {"model": model})
    folder = config.path(spec.path)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} (model {model!r}) is not a folder", {"model": model, "path": str(folder)})
    found = layout_of(folder)
    if found is None:
        both = (folder / "model_index.json").is_file()
        raise ModelLoadError(
            f"{folder} is " + ("both a diffusers and an official Wan2.2 folder" if both else
                               "neither a diffusers folder (model_index.json) nor an official Wan2.2 folder")
            + f" (model {model!r})",
            {"model": model, "path": str(folder), "expected": {"diffusers": ["model_index.json"],
                                                                "official": official.expected_files(folder)}},
        )
    if layout is not None and layout != found:
        raise ModelLoadError(
            f"model {model!r} is configured with layout {layout!r} but {folder} is in the {found} layout",
            {"model": model, "path": str(folder), "layout": layout, "found": found},
        )
    if found == "official":
        official.check_folder(folder, model)
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing", {"path": str(path)}) from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}", {"path": str(path)}) from None


def load_component(loader: Any, folder: Path, subfolder: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(folder, subfolder=...)`, with failures turned into MODEL_LOAD_ERROR.

    An official-layout folder is converted instead (`stages/official.py`), with the same dtype rules."""
    if layout_of(Path(folder)) == "official":
        return official.load_component(Path(folder), subfolder, kwargs.get("torch_dtype", kwargs.get("dtype")))
    try:
        return loader.from_pretrained(folder, subfolder=subfolder, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {subfolder} from {folder}: {type(exc).__name__}: {exc}",
            {"path": str(folder / subfolder), "component": subfolder},
        ) from exc


def scheduler_config(folder: Path, flow_shift: float | None = None) -> dict[str, Any]:
    """The scheduler config of the pipeline (the official layout has none: it follows the model type),
    without diffusers' bookkeeping entries (`_class_name`, `_use_default_values`, ...); `flow_shift`
    (the profile's `[models.X] flow_shift`) replaces the folder's."""
    if layout_of(Path(folder)) == "official":
        config = official.scheduler_config(Path(folder))
    else:
        from diffusers import UniPCMultistepScheduler

        try:
            config = UniPCMultistepScheduler.load_config(folder, subfolder="scheduler")
        except Exception as exc:
            raise ModelLoadError(
                f"could not read the scheduler config of {folder}: {exc}", {"path": str(Path(folder) / "scheduler")}
            ) from exc
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if flow_shift is not None:
        config["flow_shift"] = float(flow_shift)
    return config


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
    in_channels: int = 0

    @property
    def image_conditioning(self) -> str | None:
        """How the model takes an input image, as diffusers' WanImageToVideoPipeline does:
        `"concat"` (I2V-A14B: mask + condition latents joined to the noise on the channel axis; an
        image is required), `"first_frame"` (TI2V-5B: the first latent frame replaced by the image's
        latent, timesteps masked per token; the image is optional), or None (text only)."""
        if self.in_channels > self.z_dim:
            return "concat"
        if self.expand_timesteps:
            return "first_frame"
        return None

    @classmethod
    def read(cls, folder: Path) -> PipelineInfo:
        if layout_of(Path(folder)) == "official":
            return cls.read_official(Path(folder))
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
            in_channels=int(transformer.get("in_channels", 0)),
        )

    @classmethod
    def read_official(cls, folder: Path) -> PipelineInfo:
        kind = official.MODEL_TYPES[official.model_type(folder)]
        _, transformer, _ = official.transformer_config(folder)
        vae, _, _, _ = official.vae_config(folder)
        two = (folder / official.EXPERT_DIRS["transformer"]).is_dir()
        return cls(
            folder=folder,
            boundary_ratio=kind["boundary_ratio"] if two else None,
            expand_timesteps=bool(kind["expand_timesteps"]),
            has_transformer_2=two,
            vae_scale_temporal=int(vae["scale_factor_temporal"]),
            vae_scale_spatial=int(vae["scale_factor_spatial"]),
            z_dim=int(vae["z_dim"]),
            patch_size=tuple(transformer["patch_size"]),
            in_channels=int(transformer["in_channels"]),
        )
