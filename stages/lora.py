"""LoRA adapters in a DiT process: loaded with diffusers' Wan LoRA loader (peft underneath) into the
experts this process owns, switched per job without touching the base weights.

A job's `params.loras` (resolved by broker/loras.py) names, per LoRA, the file of each expert's part:
`transformer` (the one expert, or the high-noise one of A14B) and/or `transformer_2` (the low-noise
expert). Each process loads only the parts of the experts it holds: dit_high the `transformer`
parts, dit_low the `transformer_2` parts, a part-"all" process both. Loading a part is what
`WanLoraLoaderMixin.load_lora_weights` does for that expert (`load_into_transformer_2=True` for the
low part): the same state-dict conversion, the same i2v expansion, the same `load_lora_adapter`.

Adapters are named after their file's sha256 (and key prefix), so the same file is loaded once and
a changed file is a new adapter. Per expert at most `[loras] max_resident` stay loaded; loading
one more unloads the least recently used (`delete_adapters`). A job then `set_adapters` its LoRAs
with their scales, in its order; a job without LoRAs runs with the adapters disabled, which is the
base model exactly. A file that is missing, changed since submit, or fails to load fails that job
(STAGE_ERROR, its reason in the stage's log), and the process goes on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from stages.weight_files import file_sha256

log = logging.getLogger(__name__)


class LoraLoadFailed(RuntimeError):
    """A job's LoRA could not be loaded here; the job fails (STAGE_ERROR), the stage goes on."""


def adapter_name(part: dict[str, str]) -> str:
    tag = "" if part.get("prefix", "transformer.") == "transformer." else "_2"
    return f"lora_{part['sha256'][:24]}{tag}"


def load_part(module: torch.nn.Module, path: Path, prefix: str, name: str) -> None:
    """Load one LoRA part into `module` as adapter `name`, as `WanLoraLoaderMixin.load_lora_weights` does
    (a `transformer_2.` part of a two-part file is renamed to `transformer.` first, as its own file would be)."""
    from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, WanLoraLoaderMixin

    state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), use_safetensors=True,
                                                              return_lora_metadata=True)
    if prefix != "transformer.":
        state_dict = {"transformer." + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state_dict = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(transformer=module, state_dict=state_dict)
    if not state_dict or not all("lora" in k for k in state_dict):
        raise LoraLoadFailed(f"{path.name}: not a LoRA state dict")
    WanLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=module, adapter_name=name,
                                                  metadata=metadata, low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA)


class LoraCache:
    """The adapters resident in each expert of this process, least recently used first."""

    def __init__(self, lora_dir: Path, max_resident: int) -> None:
        self.lora_dir = Path(lora_dir)
        self.max_resident = max(1, max_resident)
        self.resident: dict[int, OrderedDict[str, None]] = {}  # id(expert module) -> adapter names

    def apply(self, experts: dict[str, torch.nn.Module], loras: list[dict[str, Any]]) -> dict[str, list[str]]:
        """Make exactly the job's LoRAs active in each expert, with its scales; returns the adapters
        active per expert."""
        active = {}
        for expert, module in experts.items():
            wanted = [(adapter_name(x["parts"][expert]), float(x["scale"]), x["parts"][expert])
                      for x in loras if expert in x["parts"]]
            resident = self.resident.setdefault(id(module), OrderedDict())
            if len(wanted) > self.max_resident:
                raise LoraLoadFailed(f"the job has {len(wanted)} LoRAs for {expert}; [loras] max_resident is "
                                     f"{self.max_resident}")
            for name, _, part in wanted:
                if name in resident:
                    resident.move_to_end(name)
                    continue
                keep = {n for n, _, _ in wanted}
                while len(resident) >= self.max_resident:
                    old = next(n for n in resident if n not in keep)
                    module.delete_adapters(old)  # type: ignore[operator]
                    del resident[old]
                    log.info("unloaded LoRA adapter %s from %s", old, expert)
                self.load(module, expert, name, part)
                resident[name] = None
            if wanted:
                module.enable_adapters()  # type: ignore[operator]
                module.set_adapters([n for n, _, _ in wanted], [s for _, s, _ in wanted])  # type: ignore[operator]
            elif resident:
                module.disable_adapters()  # type: ignore[operator]
            active[expert] = [n for n, _, _ in wanted]
        return active

    def load(self, module: torch.nn.Module, expert: str, name: str, part: dict[str, str]) -> None:
        path = (self.lora_dir / part["file"]).resolve()
        if path.parent != self.lora_dir.resolve():
            raise LoraLoadFailed(f"LoRA file {part['file'][:80]!r} is not in the LoRA folder")
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise LoraLoadFailed(f"LoRA file {path.name} cannot be read: {type(exc).__name__}") from None
        if sha != part["sha256"]:
            raise LoraLoadFailed(f"LoRA file {path.name} changed since the job was submitted")
        try:
            load_part(module, path, part.get("prefix", "transformer."), name)
        except Exception:
            peft_config = getattr(module, "peft_config", None) or {}
            if name in peft_config:  # whatever got injected before the failure goes again
                module.delete_adapters(name)  # type: ignore[operator]
            raise
        log.info("loaded LoRA %s (%s) into %s as %s", path.name, part.get("prefix"), expert, name)
