"""Distilled drafts: the draft preset of a model whose profile names a step-distillation LoRA.

A profile sets `[models.<A14B model>] distill_lora = "<name in the LoRA folder>"` (a LoRA with a
high- and a low-noise part, e.g. Wan2.2-Lightning's, placed as any other LoRA; broker/loras.py).
That model's draft preset then runs the recipe those LoRAs were trained for instead of its
configured steps: 4 steps (2 per expert), guidance 1 on both experts (no unconditional pass), flow
shift 5, and the timesteps of the training (sigmas 1, 0.75, 0.5, 0.25 before the shift; the stock
UniPC asked for 4 steps at shift 5 would pick other timesteps), one Euler flow-matching step each
(stages/schedule.py). The preset keeps its resolution, frames and fps. `/api/v1/presets` shows
each preset's `sampler`: "distilled" (with its `distill_lora`), "dmd" or "unipc".

A DMD-distilled checkpoint (FastWan-style TI2V-5B: `[models.<id>] path` at it, `sampler = "dmd"`)
samples every preset its own way: at each of `dmd_timesteps` (default 1000, 757, 522) the model
predicts the clean latents, which are noised again with fresh noise to the next timestep (the noise
seeded by the job's seed and the step); guidance 1. Only the steps, guidance and shift are the
recipe's; each preset keeps its size, frames and fps.
"""

from __future__ import annotations

from typing import Any

from common.config import Config
from common.errors import ValidationError

DRAFT = "draft"
SIGMAS = (1.0, 0.75, 0.5, 0.25)
RECIPE: dict[str, Any] = {"steps": len(SIGMAS), "guidance_scale": 1.0, "guidance_scale_2": 1.0, "shift": 5.0,
                          "sigmas": list(SIGMAS), "sampler": "distilled"}
# Options that would undo the recipe: the LoRA was distilled for these values only.
FIXED_OPTIONS = {"steps": "steps", "cfg_scale": "guidance_scale", "cfg_scale_2": "guidance_scale_2", "shift": "shift"}


def distill_lora(config: Config, model: str) -> str | None:
    spec = config.models.get(model)
    return None if spec is None else spec.distill_lora


def dmd_recipe(timesteps: tuple[int, ...]) -> dict[str, Any]:
    """A DMD checkpoint's preset fields: one step per timestep, at sigma = t / 1000 (no shift)."""
    return {"steps": len(timesteps), "guidance_scale": 1.0, "guidance_scale_2": None, "shift": None,
            "sigmas": [t / 1000 for t in timesteps], "sampler": "dmd", "cache": None}


def apply(config: Config, model: str, table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`table` (preset name -> row) with each row's `sampler`: the draft row distilled when the
    profile names a distillation LoRA for `model`, every row DMD for a DMD checkpoint."""
    name = distill_lora(config, model)
    spec = config.models.get(model)
    out = {}
    for preset, row in table.items():
        if spec is not None and spec.sampler == "dmd":
            out[preset] = {**row, **dmd_recipe(spec.dmd_timesteps)}
        elif preset == DRAFT and name is not None:
            out[preset] = {**row, **RECIPE, "distill_lora": name, "cache": None}
        else:
            out[preset] = {**row, "sampler": "unipc"}
    return out


def check_options(row: dict[str, Any], options: dict[str, Any]) -> None:
    """A distilled preset's steps, guidance and shift are the LoRA's: custom_options may not change them."""
    if row.get("sampler") not in ("distilled", "dmd"):
        return
    for option, key in FIXED_OPTIONS.items():
        if option in options and options[option] != row[key]:
            raise ValidationError(
                f"this preset runs {row['steps']} distilled steps ({row['sampler']}) at guidance 1, what its "
                f"weights were distilled for; custom_options.{option} cannot change that",
                {"field": f"custom_options.{option}", "distilled": row[key], "sampler": row["sampler"]})
