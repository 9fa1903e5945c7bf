"""Loading a Wan2.2 checkpoint in the official release layout, as users download it.

    <folder>/high_noise_model/, low_noise_model/   A14B experts: sharded safetensors + index + config.json
    <folder>/diffusion_pytorch_model*.safetensors  TI2V-5B: its one DiT at the top (+ index, config.json);
                                                   S2V-14B too (config.json: model_type s2v, WanModel_S2V)
    <folder>/models_t5_umt5-xxl-enc-bf16.pth       Wan's own T5 encoder
    <folder>/Wan2.1_VAE.pth | Wan2.2_VAE.pth       the VAE (Wan2.2: z48, TI2V-5B)
    <folder>/google/umt5-xxl/                      the tokenizer

Each component is converted on load into the diffusers/transformers class the stages already use
(the S2V DiT into `stages/s2v/transformer.WanS2VTransformer`, which has the release's names),
with the dtype rules `from_pretrained` applies, so either layout gives the same modules. Before
anything is built, every tensor's name and shape is checked against what the model needs; a missing
file, key or a wrong shape is a MODEL_LOAD_ERROR that names the file and what was expected.
`.pth` files are read with `weights_only=True`: a pickle that carries code is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import ModelLoadError
from stages import official_keys as keys

log = logging.getLogger(__name__)

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"Wan2.1_VAE.pth": False, "Wan2.2_VAE.pth": True}  # file -> is the Wan2.2 VAE
EXPERT_DIRS = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# Per model type (the official config.json's model_type), from wan/configs/wan_*.py of the release.
MODEL_TYPES: dict[str, dict[str, Any]] = {
    "t2v": {"flow_shift": 12.0, "boundary_ratio": 0.875, "expand_timesteps": False},
    "i2v": {"flow_shift": 5.0, "boundary_ratio": 0.900, "expand_timesteps": False},
    "ti2v": {"flow_shift": 5.0, "boundary_ratio": None, "expand_timesteps": True},
}
SHOWN = 8  # names listed in an error message


def is_official(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / T5_FILE).is_file() or (folder / EXPERT_DIRS["transformer"]).is_dir() or any(
        (folder / name).is_file() for name in VAE_FILES
    )


def expected_files(folder: Path) -> list[str]:
    """What an official folder must hold, for error messages and the startup check."""
    two = (folder / EXPERT_DIRS["transformer"]).is_dir()
    dits = [f"{d}/config.json" for d in EXPERT_DIRS.values()] if two else ["config.json"]
    return [*dits, T5_FILE, "Wan2.1_VAE.pth or Wan2.2_VAE.pth", f"{TOKENIZER_DIR}/"]


def check_folder(folder: Path, model: str) -> None:
    """Every file the layout needs is there (the rest is checked as each component loads)."""
    missing = []
    for name in expected_files(folder):
        if name.startswith("Wan2.1_VAE"):
            if not any((folder / v).is_file() for v in VAE_FILES):
                missing.append(name)
        elif not (folder / name).exists():
            missing.append(name)
    if missing:
        raise ModelLoadError(
            f"{folder} is not a complete official Wan2.2 folder: missing {', '.join(missing)}",
            {"model": model, "path": str(folder), "missing": missing, "expected": expected_files(folder)},
        )


# ---- reading files ------------------------------------------------------------------------------


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, loaded without running any code from the pickle."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing", {"path": str(path)})
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # mmap needs the zip format; older torch.save files are not
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not any(c.__name__ == "UnpicklingError" for c in type(exc).__mro__):  # no pickle import here
            raise ModelLoadError(f"{path} could not be read: {type(exc).__name__}: {exc}", {"path": str(path)}) from exc
        # torch's message is long advice; keep the line that says what the pickle wanted
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), lines[0] if lines else "")
        why = why.split(" Please use")[0]
        raise ModelLoadError(
            f"{path} was refused: it is not a plain tensor state dict (loaded with weights_only=True): {why}",
            {"path": str(path), "reason": "weights_only", "error": why},
        ) from None
    tensors_by_name = isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    )
    if not tensors_by_name:
        raise ModelLoadError(
            f"{path} does not hold a state dict of named tensors", {"path": str(path), "found": type(data).__name__}
        )
    return data


class SafetensorsSet:
    """The safetensors files of one DiT: one file, or shards listed in an index json."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index} is not a safetensors index: {exc}", {"path": str(index)}) from None
        elif (folder / WEIGHTS_NAME).is_file():
            weight_map = None
        else:
            raise ModelLoadError(
                f"{folder} has no DiT weights: expected {INDEX_NAME} (with its shards) or {WEIGHTS_NAME}",
                {"path": str(folder), "expected": [INDEX_NAME, WEIGHTS_NAME]},
            )
        from safetensors import safe_open

        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS_NAME]
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(
                    f"{path} is missing (listed in {INDEX_NAME})",
                    {"path": str(path), "index": str(folder / INDEX_NAME)},
                )
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.where[key] = name
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as exc:
                raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}", {"path": str(path)}) from None
        if weight_map:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise ModelLoadError(
                        f"{folder / name} does not hold {key}, which {INDEX_NAME} places there",
                        {"path": str(folder / name), "key": key},
                    )

    def file_of(self, key: str) -> str:
        return str(self.folder / self.where[key]) if key in self.where else str(self.folder)

    def tensors(self, dtype_of: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
        """Every tensor, floating ones cast to `dtype_of(key)` one at a time (a 14B expert stored
        in float32 never sits in memory twice)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for name in sorted(set(self.where.values())):
            with safe_open(self.folder / name, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype_of(key)) if torch.is_floating_point(t) else t
        return out


def read_config(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing", {"path": str(path)}) from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}", {"path": str(path)}) from None
    absent = [f for f in fields if f not in data]
    if absent:
        raise ModelLoadError(f"{path} lacks {', '.join(absent)}", {"path": str(path), "missing": absent})
    return data


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    file_of: Callable[[str], str],
    what: str,
) -> None:
    """Names and shapes in a checkpoint are exactly those the model has; else a precise error."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        {"key": k, "file": file_of(k), "shape": list(found[k]), "expected": list(expected[k])}
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        w = wrong[0]
        parts.append(f"{w['file']}: {w['key']} has shape {w['shape']}, expected {w['expected']}"
                     + (f" (and {len(wrong) - 1} more wrong shapes)" if len(wrong) > 1 else ""))
    if missing:
        parts.append(f"missing {len(missing)} tensors, e.g. "
                     + ", ".join(f"{k} {list(expected[k])}" for k in missing[:3]))
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the model does not have, e.g. "
                     + ", ".join(f"{k} (in {file_of(k)})" for k in unexpected[:3]))
    raise ModelLoadError(
        f"{what}: " + "; ".join(parts),
        {"component": what, "wrong_shape": wrong[:SHOWN], "missing": missing[:SHOWN],
         "unexpected": unexpected[:SHOWN], "files": sorted({file_of(k) for k in (missing + unexpected)[:SHOWN]
                                                             if k in found} | {w["file"] for w in wrong[:SHOWN]})},
    )


# ---- dtype rules of from_pretrained --------------------------------------------------------------


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: list[str]) -> dict[str, torch.Tensor]:
    """Cast floating tensors to `dtype`, those of modules named in `keep_fp32` to float32, as
    `from_pretrained` does (so a model loads with the same dtypes from either layout)."""
    if dtype is None:
        dtype = torch.float32
    out = {}
    for k, v in sd.items():
        if torch.is_floating_point(v):
            target = torch.float32 if any(m in k.split(".") for m in keep_fp32) else dtype
            v = v.to(target)
        out[k] = v.contiguous()
    return out


def _no_meta(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{what}: tensors were not loaded: {', '.join(left[:SHOWN])}", {"missing": left[:SHOWN]})


# ---- components ---------------------------------------------------------------------------------


def expert_dir(folder: Path, name: str) -> Path:
    if (folder / EXPERT_DIRS["transformer"]).is_dir():
        return folder / EXPERT_DIRS[name]
    if name != "transformer":
        raise ModelLoadError(f"{folder} holds one DiT; there is no {name}", {"path": str(folder), "component": name})
    return folder


def transformer_config(
    folder: Path, name: str = "transformer"
) -> tuple[dict[str, Any], dict[str, Any], SafetensorsSet]:
    """(official config.json, diffusers config, the files) of one DiT."""
    where = expert_dir(folder, name)
    official = read_config(where / "config.json", keys.OFFICIAL_TRANSFORMER_FIELDS)
    files = SafetensorsSet(where)
    for need in ("patch_embedding.weight", "text_embedding.0.weight"):
        if need not in files.shapes:
            raise ModelLoadError(f"{where}: the DiT weights lack {need}", {"path": str(where), "missing": [need]})
    return official, keys.transformer_config_from_official(official, files.shapes), files


def is_s2v(folder: Path) -> bool:
    """The DiT at the top of `folder` is the S2V one (config.json: model_type s2v / WanModel_S2V)."""
    path = Path(folder) / "config.json"
    try:
        return keys.is_s2v_config(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


S2V_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers")  # a config.json without them is not a release's


def s2v_transformer_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any], SafetensorsSet]:
    """(release config.json, `WanS2VTransformer` config, the files) of the S2V DiT at the top of `folder`."""
    path = folder / "config.json"
    official = read_config(path, S2V_FIELDS)
    files = SafetensorsSet(folder)
    try:
        config = keys.s2v_config_from_official(official, files.shapes)
    except KeyError as exc:
        need = exc.args[0] if exc.args else str(exc)
        raise ModelLoadError(
            f"{folder}: the S2V DiT weights lack {need}", {"path": str(folder), "missing": [need]}
        ) from None
    return official, config, files


def load_s2v_transformer(folder: Path, dtype: torch.dtype | None) -> Any:
    """The S2V DiT, checked tensor by tensor: its parameter names are the release's, so no renaming."""
    from accelerate import init_empty_weights

    from stages.s2v.transformer import WanS2VTransformer

    _, config, files = s2v_transformer_config(folder)
    what = f"transformer ({files.folder})"
    try:
        with init_empty_weights():
            model = WanS2VTransformer.from_config(config)
    except ValueError as exc:  # a config the release's code does not build as S2V-14B
        raise ModelLoadError(f"{folder / 'config.json'}: {exc}", {"path": str(folder / "config.json")}) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, files.shapes, files.file_of, what)
    keep = list(WanS2VTransformer._keep_in_fp32_modules)
    target = {k: torch.float32 if any(m in k.split(".") for m in keep) else (dtype or torch.float32) for k in expected}
    state = files.tensors(target.__getitem__)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    _no_meta(model, what)
    return model.eval()


def load_transformer(folder: Path, name: str, dtype: torch.dtype | None) -> Any:
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if name == "transformer" and not (folder / EXPERT_DIRS["transformer"]).is_dir() and is_s2v(folder):
        return load_s2v_transformer(folder, dtype)
    _, config, files = transformer_config(folder, name)
    what = f"{name} ({files.folder})"
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    names = {k: keys.transformer_key_to_official(k) for k in model.state_dict()}
    expected = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, files.shapes, files.file_of, what)
    # from_pretrained's dtype rule: _keep_in_fp32_modules stay float32, the rest takes `dtype`
    keep = list(WanTransformer3DModel._keep_in_fp32_modules or [])
    target = {o: torch.float32 if any(m in k.split(".") for m in keep) else (dtype or torch.float32)
              for k, o in names.items()}
    # diffusers' own single-file conversion maps the names. (`from_single_file` itself is not used:
    # it casts every tensor to torch_dtype, where from_pretrained keeps _keep_in_fp32_modules in
    # float32, so a bf16 model would differ between the two layouts.)
    state = convert_wan_transformer_to_diffusers(files.tensors(target.__getitem__))
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    _no_meta(model, what)
    return model.eval()


def vae_file(folder: Path) -> tuple[Path, bool]:
    found = [(folder / name, wan22) for name, wan22 in VAE_FILES.items() if (folder / name).is_file()]
    if len(found) != 1:
        raise ModelLoadError(
            f"{folder} must hold exactly one of {', '.join(VAE_FILES)}" + (f"; found {len(found)}" if found else ""),
            {"path": str(folder), "expected": list(VAE_FILES)},
        )
    return found[0]


def vae_config(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path, bool]:
    path, wan22 = vae_file(folder)
    state = load_pth(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = keys.vae_config_from_official(shapes, wan22)
    except (KeyError, IndexError, ZeroDivisionError) as exc:
        need = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ModelLoadError(
            f"{path} is not a {'Wan2.2' if wan22 else 'Wan2.1'} VAE state dict: expected {need}",
            {"path": str(path), "missing": [str(need)]},
        ) from None
    return config, state, path, wan22


def load_vae(folder: Path, dtype: torch.dtype | None) -> Any:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    config, state, path, wan22 = vae_config(folder)
    with init_empty_weights():
        model = AutoencoderKLWan.from_config(config)
    names = {k: keys.vae_key_to_official(k, config["num_res_blocks"], wan22) for k in model.state_dict()}
    expected = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, {k: tuple(v.shape) for k, v in state.items()}, lambda _k: str(path), f"VAE ({path})")
    converted = _cast({k: state[official] for k, official in names.items()}, dtype, [])
    model.load_state_dict(converted, strict=True, assign=True)
    _no_meta(model, f"VAE ({path})")
    return model.eval()


def load_text_encoder(folder: Path, dtype: torch.dtype | None) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    path = folder / T5_FILE
    state = load_pth(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        config = UMT5Config(**keys.t5_config_from_official(shapes))
    except KeyError as exc:
        raise ModelLoadError(
            f"{path} is not a umt5 encoder state dict: expected {exc.args[0]}",
            {"path": str(path), "missing": [exc.args[0]]},
        ) from None
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    names = {k: keys.t5_key_to_official(k) for k in model.state_dict()}
    expected = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(expected, shapes, lambda _k: str(path), f"text encoder ({path})")
    # transformers keeps _keep_in_fp32_modules in float32 only for float16
    keep = list(model._keep_in_fp32_modules or []) if dtype == torch.float16 else []
    converted = _cast({k: state[official] for k, official in names.items()}, dtype, keep)
    model.load_state_dict(converted, strict=True, assign=True)
    _no_meta(model, f"text encoder ({path})")
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)


def model_type(folder: Path) -> str:
    official, _, _ = transformer_config(folder)
    kind = str(official["model_type"])
    if kind not in MODEL_TYPES:
        raise ModelLoadError(
            f"{expert_dir(folder, 'transformer') / 'config.json'}: model_type {kind!r} is not served",
            {"model_type": kind, "served": sorted(MODEL_TYPES)},
        )
    return kind


def scheduler_config(folder: Path) -> dict[str, Any]:
    """The UniPC flow-matching scheduler of the model type, as the diffusers Wan2.2 pipelines set it."""
    from diffusers import UniPCMultistepScheduler

    shift = MODEL_TYPES[model_type(folder)]["flow_shift"]
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )
    return dict(scheduler.config)


def load_component(folder: Path, component: str, dtype: torch.dtype | None) -> Any:
    """`component` is a diffusers subfolder name: transformer, transformer_2, vae, text_encoder, tokenizer."""
    folder = Path(folder)
    try:
        if component in EXPERT_DIRS:
            return load_transformer(folder, component, dtype)
        if component == "vae":
            return load_vae(folder, dtype)
        if component == "text_encoder":
            return load_text_encoder(folder, dtype)
        if component == "tokenizer":
            return load_tokenizer(folder)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {component} from the official folder {folder}: {type(exc).__name__}: {exc}",
            {"path": str(folder), "component": component},
        ) from exc
    raise ModelLoadError(f"the official layout has no component {component!r}", {"component": component})
