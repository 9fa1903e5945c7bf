"""Putting a stage's models on its device, as its profile says, and reporting what that costs.

Per stage (`[stages.<name>]`): `device` (`cpu`, `cuda`, `cuda:N`), `dtype` (the compute dtype),
`storage_dtype` (weights stored in fp8 and cast layer by layer to `dtype` for each forward:
diffusers' layerwise casting; halves a 14B expert so it fits a 24 GB card), and for DiT stages
`attention`:

- `auto`: flash-attn when it is importable (and the device is CUDA), else PyTorch SDPA, which picks
  its cuDNN / flash / memory-efficient kernel itself (on an H200 it picked cuDNN attention);
- `sdpa`: PyTorch SDPA (diffusers' `native` backend);
- `flash`: flash-attn; a stage asked for it when flash-attn is not importable fails at startup.

Weights are cast to the storage dtype on the CPU before they move, so a 14B expert never needs its
bf16 size on the card. After setup each stage logs one line with its device, dtypes, attention
backend and memory footprint, and reports device memory in its heartbeat for admission.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from common.config import StageSpec
from common.errors import ModelLoadError
from stages import quantize
from stages.models import torch_dtype

log = logging.getLogger(__name__)

GIB = 1 << 30
STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Our attention names -> diffusers' attention backends.
DIFFUSERS_BACKENDS = {"sdpa": "native", "flash": "flash"}


def flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from diffusers.models import attention_dispatch

    return bool(attention_dispatch._CAN_USE_FLASH_ATTN)  # also checks the version diffusers needs


def resolve_attention(requested: str, device: torch.device, stage: str) -> tuple[str, str]:
    """(backend, why) for a requested `auto` | `sdpa` | `flash`."""
    if requested == "sdpa":
        return "sdpa", "configured"
    if requested == "flash":
        if device.type != "cuda":
            raise ModelLoadError(
                f"stage {stage}: attention = \"flash\" needs a CUDA device, this stage is on {device}",
                {"stage": stage, "attention": requested, "device": str(device)},
            )
        if not flash_attn_importable():
            raise ModelLoadError(
                f"stage {stage}: attention = \"flash\" but flash-attn is not importable here; install flash-attn "
                "(>= the version diffusers needs) or set attention = \"auto\" or \"sdpa\"",
                {"stage": stage, "attention": requested},
            )
        return "flash", "configured"
    if requested != "auto":
        raise ModelLoadError(f"stage {stage}: unknown attention {requested!r}", {"stage": stage})
    if device.type != "cuda":
        return "sdpa", "auto: flash-attn needs CUDA"
    if flash_attn_importable():
        return "flash", "auto: flash-attn is importable"
    return "sdpa", "auto: flash-attn is not importable"


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of the device: the card for CUDA, the host's RAM for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(total), int(free)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass
class Placement:
    stage: str
    device: torch.device
    dtype: torch.dtype
    storage_dtype: torch.dtype | None
    attention: str | None  # None: this stage's models have no configurable attention
    attention_why: str = ""
    components: dict[str, int] = field(default_factory=dict)  # label -> bytes of weights on the device
    compute: str | None = None  # "fp8" | "int8": quantized block matmuls (stages/quantize.py)

    @classmethod
    def from_spec(cls, spec: StageSpec, attention: bool = False) -> Placement:
        device = torch.device(spec.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                f"stage {spec.name} is configured for {device} but CUDA is not available in this process",
                {"stage": spec.name, "device": str(device)},
            )
        storage = None
        if spec.storage_dtype is not None:
            if spec.storage_dtype not in STORAGE_DTYPES:
                raise ModelLoadError(
                    f"stage {spec.name}: unsupported storage_dtype {spec.storage_dtype!r}",
                    {"stage": spec.name, "allowed": sorted(STORAGE_DTYPES)},
                )
            storage = STORAGE_DTYPES[spec.storage_dtype]
        backend, why = (None, "")
        if attention:
            backend, why = resolve_attention(spec.attention, device, spec.name)
        elif spec.attention not in ("auto", "sdpa"):
            raise ModelLoadError(
                f"stage {spec.name}: attention = {spec.attention!r} is only configurable for dit stages",
                {"stage": spec.name, "attention": spec.attention},
            )
        compute = getattr(spec, "compute_dtype", None)
        if compute is not None:
            quantize.check_supported(compute, device, spec.name)
        return cls(spec.name, device, torch_dtype(spec.dtype), storage, backend, why, compute=compute)

    def place(self, model: Any, label: str) -> Any:
        """Storage dtype (on the CPU, before moving), attention backend, device, quantized compute
        (on the device); returns the model."""
        if self.storage_dtype is not None:
            if hasattr(model, "enable_layerwise_casting"):  # a diffusers model: its own skip patterns
                model.enable_layerwise_casting(storage_dtype=self.storage_dtype, compute_dtype=self.dtype)
            else:  # e.g. the transformers text encoder: diffusers' hook on its Linear/Conv layers
                from diffusers.hooks import apply_layerwise_casting

                # UMT5's feed-forward casts its input to `wo.weight.dtype` before calling `wo`: keep
                # `wo` in the compute dtype, or it would see fp8 inputs.
                apply_layerwise_casting(
                    model, self.storage_dtype, self.dtype,
                    skip_modules_pattern=("norm", "embed", "shared", r"DenseReluDense\.wo$"),
                )
        if self.attention is not None and hasattr(model, "set_attention_backend"):
            model.set_attention_backend(DIFFUSERS_BACKENDS[self.attention])
        model = model.to(self.device).eval()
        if self.compute is not None:
            quantize.quantize(model, self.compute)
        self.components[label] = module_bytes(model)
        return model

    @property
    def weight_bytes(self) -> int:
        return sum(self.components.values())

    def memory(self) -> dict[str, Any]:
        """What the heartbeat carries for memory admission."""
        total, free = device_memory(self.device)
        return {"device": str(self.device), "device_total_bytes": total, "device_free_bytes": free,
                "weight_bytes": self.weight_bytes}

    def summary(self) -> str:
        """The one startup line: device, dtypes, attention backend, memory footprint."""
        storage = str(self.storage_dtype).removeprefix("torch.") if self.storage_dtype else "same"
        parts = [
            f"stage {self.stage}: device {self.device}",
            f"compute {str(self.dtype).removeprefix('torch.')}",
            f"storage {storage}",
        ]
        if self.attention is not None:
            parts.append(f"attention {self.attention} ({self.attention_why})")
        comps = ", ".join(f"{k} {gib(v)}" for k, v in self.components.items())
        parts.append(f"weights {gib(self.weight_bytes)} = {self.weight_bytes} bytes [{comps}]")
        if self.device.type == "cuda":
            total, free = device_memory(self.device)
            parts.append(
                f"{self.device} allocated {gib(torch.cuda.memory_allocated(self.device))}, "
                f"reserved {gib(torch.cuda.memory_reserved(self.device))}, free {gib(free)}, total {gib(total)}"
            )
        return "; ".join(parts)
