"""Quantized compute for a DiT's transformer blocks (`[stages.<dit>] compute_dtype`).

`fp8` or `int8`: every Linear layer inside the repeated transformer blocks (attention projections
and feed-forward: nearly all of a Wan DiT's FLOPs) computes with dynamically quantized activations
and weights quantized once at load, through torchao. The embeddings, the time/text projections
and the output head stay in the stage's `dtype`. fp8 (e4m3, one scale per row) needs tensor cores
that have it: CUDA capability 8.9 or above (Ada, Hopper); int8 runs on Ampere (8.0) and above, and
on the CPU. Asked for on hardware without it, the stage refuses at startup (MODEL_LOAD_ERROR)
instead of running something slower or different from what was configured. This trades quality
for speed: the result's metadata names the stages that ran quantized (`compute`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from common.errors import ModelLoadError

log = logging.getLogger(__name__)

# The lowest CUDA compute capability with the tensor-core instructions each needs.
CAPABILITY = {"fp8": (8, 9), "int8": (8, 0)}
BLOCKS_PREFIX = "blocks."


def check_supported(kind: str, device: torch.device, stage: str) -> None:
    """Raise MODEL_LOAD_ERROR if `device` cannot compute in `kind`."""
    if kind not in CAPABILITY:
        raise ModelLoadError(f"stage {stage}: unknown compute_dtype {kind!r}",
                             {"stage": stage, "allowed": sorted(CAPABILITY)})
    if device.type == "cpu":
        if kind == "fp8":
            raise ModelLoadError(f"stage {stage}: compute_dtype fp8 needs a CUDA GPU of capability 8.9+ "
                                 "(Ada, Hopper); this stage runs on the CPU: use int8 or leave it unset",
                                 {"stage": stage, "compute_dtype": kind, "device": "cpu"})
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < CAPABILITY[kind]:
        need = ".".join(map(str, CAPABILITY[kind]))
        hint = " (an RTX 3090 or A100 has no fp8 tensor cores: use int8)" if kind == "fp8" else ""
        raise ModelLoadError(f"stage {stage}: compute_dtype {kind} needs CUDA capability {need}+, "
                             f"{torch.cuda.get_device_name(device)} has {major}.{minor}{hint}",
                             {"stage": stage, "compute_dtype": kind, "capability": f"{major}.{minor}",
                              "needs": need})


def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
    """The layers that get quantized: the Linear layers of the repeated transformer blocks."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith(BLOCKS_PREFIX)


def quantize(model: torch.nn.Module, kind: str) -> int:
    """Quantize `model`'s block Linear layers in place for `kind` compute; returns how many."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    count = sum(1 for name, module in model.named_modules() if in_blocks(module, name))
    if count == 0:
        raise ModelLoadError("compute_dtype: the model has no transformer-block Linear layers to quantize",
                             {"prefix": BLOCKS_PREFIX})
    config: Any = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if kind == "fp8"
                   else Int8DynamicActivationInt8WeightConfig())
    quantize_(model, config, filter_fn=in_blocks)
    log.info("%s compute on %d block Linear layers", kind, count)
    return count
