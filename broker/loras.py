"""The LoRA folder ([loras] dir): what GET /api/v1/loras lists, and a request's `custom_options.loras`
resolved to the files and hashes a DiT stage loads (stages/lora.py).

Files and names:
- `NAME.safetensors`: one LoRA for the model's first expert (`transformer`: the one expert of
  TI2V-5B, the high-noise expert of the A14B models), as diffusers' `load_lora_weights` loads it.
  If its keys also hold a `transformer_2.` part, that part goes to the low-noise expert.
- `NAME.high.safetensors` and/or `NAME.low.safetensors`: the two parts of an A14B LoRA (as the
  Wan2.2 LoRAs are published): high to `transformer`, low to `transformer_2` (what
  `load_lora_weights(..., load_into_transformer_2=True)` does).
- Anything else with a weights extension (.pt, .pth, .bin, .ckpt, .pkl: pickles, which can run
  code when loaded) is listed as refused and never loaded; so is a safetensors file whose header
  does not parse, or a NAME with both a plain and a high file.

Keys are diffusers' LoRA format (what `save_lora_weights` writes): `transformer.<module>.lora_A.weight`
(rank x in) and `.lora_B.weight` (out x rank), optionally `.lora_B.bias`; or one of the formats
diffusers' Wan loader converts on load (the official names under `diffusion_model.`, musubi-tuner's
`lora_unet_*`), read as what they convert to (broker/lora_keys.py). A LoRA fits a model when every
module it names is a linear layer of that expert with those shapes, read from the safetensors
headers of the model's own weights, in either checkpoint layout (an official checkpoint's names
mapped to diffusers'). Only headers are read here, by hand: the broker never imports torch. Hashes
are cached by (path, size, mtime), so a scan is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import lora_keys
from common import catalog
from common.config import Config
from common.errors import LoraIncompatible, LoraNotFound, ValidationError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PART_SUFFIXES = {".high": "transformer", ".low": "transformer_2"}
EXPERT_PREFIXES = ("transformer_2.", "transformer.")  # longest first
MAX_HEADER_BYTES = 64 << 20
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file ({tensor: {dtype, shape, data_offsets}}, `__metadata__`);
    ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= MAX_HEADER_BYTES:
            raise ValueError("not a safetensors header")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError("truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    size = path.stat().st_size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= size):
            raise ValueError(f"tensor {name[:80]!r} has a bad header entry")
    return header


def shapes(header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


_hashes: dict[tuple[str, int, int], str] = {}
_model_shapes: dict[tuple[str, int], dict[str, tuple[int, ...]] | None] = {}


def sha256_of(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def model_folder(config: Config, model: str) -> tuple[Path, str] | None:
    """(folder, layout) of a served model's weights (a tiny one where the stages build it); None
    where the config gives no folder. A folder left to detection is official when it has no
    model_index.json (stages/models.layout_of)."""
    spec = config.model(model)
    if spec.tiny:  # as stages/tiny_models.ensure names it
        shape = spec.tiny_shape or model
        if spec.layout == "official":
            return config.model_cache_dir / f"tiny-{shape}-seed{spec.seed}-official", "official"
        return config.model_cache_dir / f"tiny-{shape}-seed{spec.seed}", "diffusers"
    if not spec.path:
        return None
    folder = config.path(spec.path)
    layout = spec.layout or ("diffusers" if (folder / "model_index.json").is_file() else "official")
    return folder, layout


# Where the official layout keeps each expert (stages/official.EXPERT_DIRS): the A14B experts in
# folders of their own, a one-DiT model's weights at the top.
OFFICIAL_EXPERT_DIRS = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"}
OFFICIAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _weight_files(sub: Path) -> list[Path]:
    index = sub / f"{WEIGHTS}.index.json"
    if (sub / WEIGHTS).is_file():
        return [sub / WEIGHTS]
    if index.is_file():
        return [sub / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def expert_shapes(folder: Path, expert: str, layout: str = "diffusers") -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of one expert's weights, from the headers, under diffusers' names (an official
    checkpoint's keys are renamed as stages/official_keys maps them); None if absent."""
    if layout == "official":
        split = (folder / OFFICIAL_EXPERT_DIRS["transformer"]).is_dir()
        if not split and expert != "transformer":
            return None
        sub = folder / OFFICIAL_EXPERT_DIRS[expert] if split else folder
    else:
        sub = folder / expert
    files = _weight_files(sub)
    if not files:
        return None
    key = (str(files[0]), files[0].stat().st_mtime_ns)
    if key not in _model_shapes:
        found: dict[str, tuple[int, ...]] = {}
        for f in files:
            found.update(shapes(read_header(f)))
        if layout == "official":
            found = _diffusers_names(found)
        _model_shapes[key] = found
    return _model_shapes[key]


def _diffusers_names(official: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """An official DiT's linear weights (two-dimensional `*.weight`) under diffusers' names, for the
    modules a LoRA can target (broker/lora_keys maps the official module names, as diffusers' LoRA
    converter does)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in official.items():
        if key.endswith(".weight") and len(shape) == 2:
            module = lora_keys.module_name(key[: -len(".weight")], image_attention=True)
            if module is not None:
                out[module + ".weight"] = shape
    return out


@dataclass
class Lora:
    name: str
    files: dict[str, str] = field(default_factory=dict)  # expert -> file name (relative to the folder)
    prefixes: dict[str, str] = field(default_factory=dict)  # expert -> key prefix in its file
    sha256: dict[str, str] = field(default_factory=dict)  # expert -> sha256 of its file
    modules: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = field(default_factory=dict)
    rank: int | None = None
    refused: str | None = None
    fits: dict[str, str | None] = field(default_factory=dict)  # model -> None (fits) or why not

    def listing(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "files": dict(self.files), "sha256": dict(self.sha256),
                                "models": [m for m, why in self.fits.items() if why is None]}
        if self.rank is not None:
            body["rank"] = self.rank
        if self.refused is not None:
            body["refused"] = self.refused
        else:
            body["not_fitting"] = {m: why for m, why in self.fits.items() if why is not None}
        return body

    def parts(self) -> dict[str, dict[str, str]]:
        """What JobParams.loras carries for each expert."""
        return {e: {"file": self.files[e], "prefix": self.prefixes[e], "sha256": self.sha256[e]} for e in self.files}


def _lora_modules(header_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """prefix ("transformer." / "transformer_2.") -> module -> {"A": shape, "B": shape[, "bias": shape]};
    ValueError for a key not in diffusers' LoRA format."""
    out: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {}
    for key, shape in header_shapes.items():
        prefix = next((p for p in EXPERT_PREFIXES if key.startswith(p)), None)
        rest = key[len(prefix):] if prefix else ""
        for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias")):
            if prefix and rest.endswith(suffix):
                out.setdefault(prefix, {}).setdefault(rest[: -len(suffix)], {})[slot] = shape
                break
        else:
            raise ValueError(f"key {key[:80]!r} is in none of the LoRA formats read here: diffusers' "
                             "(transformer.<module>.lora_A.weight), the official names (diffusion_model.*) "
                             "or musubi-tuner's (lora_unet_*)")
    for prefix, modules in out.items():
        for module, slots in modules.items():
            if "A" not in slots or "B" not in slots or len(slots["A"]) != 2 or len(slots["B"]) != 2:
                raise ValueError(f"{prefix}{module[:80]} lacks a 2-D lora_A or lora_B")
    return out


def _fit(lora: Lora, config: Config, model: str) -> str | None:
    """None if every part of `lora` fits `model`'s expert, else why not."""
    if catalog.BY_ID.get(model) is not None and "audio" in dict(catalog.BY_ID[model].inputs):
        return f"LoRAs are not supported for {model}"
    where = model_folder(config, model)
    if where is None:
        return f"{model} has no weights folder in the config"
    folder, layout = where
    for expert, modules in lora.modules.items():
        base = expert_shapes(folder, expert, layout)
        if base is None:
            if expert == "transformer_2" and expert_shapes(folder, "transformer", layout) is not None:
                return f"{model} has one expert; this LoRA has a low-noise (transformer_2) part"
            return f"the weights of {model} are not on disk yet"
        for module, (a, b) in modules.items():
            weight = base.get(f"{module}.weight")
            if weight is None or len(weight) != 2:
                return f"{model} has no linear layer {module[:80]!r}"
            if a[1] != weight[1] or b[0] != weight[0] or a[0] != b[1]:
                return (f"{module[:80]}: lora_A {list(a)} / lora_B {list(b)} do not fit its weight {list(weight)}")
    return None


def scan(config: Config) -> dict[str, Lora]:
    """Every LoRA of the folder by name, each with the models it fits (or why it is refused)."""
    folder = config.lora_dir
    found: dict[str, Lora] = {}
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except FileNotFoundError:
        return found
    for path in entries:
        stem, suffix = os.path.splitext(path.name)
        if suffix.lower() in PICKLE_SUFFIXES:
            lora = found.setdefault(stem, Lora(stem))
            lora.files.setdefault("pickle", path.name)
            lora.refused = "not a safetensors file: pickled weights can run code when loaded and are never loaded"
            continue
        if suffix != ".safetensors":
            continue
        base, part = os.path.splitext(stem)
        expert = PART_SUFFIXES.get(part)
        name = base if expert else stem
        lora = found.setdefault(name, Lora(name))
        try:
            lora_modules = _lora_modules(lora_keys.to_diffusers(shapes(read_header(path))))
        except (ValueError, OSError) as exc:
            lora.refused = f"{path.name}: {exc}"
            continue
        if expert is not None:
            if set(lora_modules) != {"transformer."}:
                lora.refused = f"{path.name}: a .high/.low file holds one part, with keys transformer.*"
                continue
            pairs = {expert: "transformer."}
        else:
            pairs = {"transformer": "transformer."} if "transformer." in lora_modules else {}
            if "transformer_2." in lora_modules:
                pairs["transformer_2"] = "transformer_2."
        for e, prefix in pairs.items():
            if e in lora.files:
                lora.refused = f"{name} has its {e} part in two files"
            lora.files[e], lora.prefixes[e] = path.name, prefix
            lora.sha256[e] = sha256_of(path)
            lora.modules[e] = {mod: (s["A"], s["B"]) for mod, s in lora_modules[prefix].items()}
    for lora in found.values():
        ranks = {a[0] for mods in lora.modules.values() for a, _ in mods.values()}
        lora.rank = ranks.pop() if len(ranks) == 1 else None
        if lora.refused is None:
            lora.fits = {model: _fit(lora, config, model) for model in config.model_names()}
    return found


def listing(config: Config) -> dict[str, Any]:
    """GET /api/v1/loras."""
    loras = scan(config)
    return {"loras": [loras[name].listing() for name in sorted(loras)],
            "scale": {"min": config.loras.min_scale, "max": config.loras.max_scale},
            "max_per_job": config.loras.max_per_job}


def resolve(config: Config, model: str, requested: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's checked `custom_options.loras` ([{name, scale}]) -> JobParams.loras, or a 4xx:
    LORA_NOT_FOUND for an unknown name, LORA_INCOMPATIBLE for a LoRA refused or not fitting `model`,
    VALIDATION_ERROR for a scale outside [loras] min_scale..max_scale or a name given twice."""
    if not requested:
        return []
    lo, hi = config.loras.min_scale, config.loras.max_scale
    names = [x["name"] for x in requested]
    for i, item in enumerate(requested):
        where = f"custom_options.loras[{i}]"
        if not lo <= item["scale"] <= hi:
            raise ValidationError(f"{where}.scale must be between {lo} and {hi}, got {item['scale']}",
                                  {"field": f"{where}.scale", "min": lo, "max": hi})
        if names.index(item["name"]) != i:
            raise ValidationError(f"{where}: LoRA {item['name']!r} is named twice", {"field": f"{where}.name"})
    found = scan(config)
    out = []
    for i, item in enumerate(requested):
        where = f"custom_options.loras[{i}].name"
        lora = found.get(item["name"])
        if lora is None:
            raise LoraNotFound(f"no LoRA {item['name']!r} in this server's LoRA folder (GET /api/v1/loras)",
                               {"field": where, "name": item["name"]})
        if lora.refused is not None:
            raise LoraIncompatible(f"LoRA {lora.name!r} is refused: {lora.refused}",
                                   {"field": where, "name": lora.name, "reason": "refused"})
        why = lora.fits.get(model, f"{model} is not served")
        if why is not None:
            raise LoraIncompatible(f"LoRA {lora.name!r} does not fit {model}: {why}",
                                   {"field": where, "name": lora.name, "model": model,
                                    "fits": [m for m, w in lora.fits.items() if w is None]})
        out.append({"name": lora.name, "scale": float(item["scale"]), "parts": lora.parts()})
    return out


def check_request(config: Config, model: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """custom_options.loras checked against the catalog and the profile, then resolved."""
    spec = catalog.OPTION_FIELDS["loras"]
    requested = catalog.check(spec, options.get("loras"), "custom_options.loras", maximum=config.loras.max_per_job)
    return resolve(config, model, requested or [])
