"""Reading a weights file the user places for a side model (RIFE, the upscale models): a `.safetensors`
file, or a `.pth` / `.pkl` pickle read with torch's restricted unpickler (`weights_only=True`: a
pickle that would run code is refused, and no `pickle` import is needed here to say so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.errors import ModelLoadError

READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError)


def refuse(what: str, path: Path, why: str, **details: Any) -> ModelLoadError:
    return ModelLoadError(f"{what} {path}: {why}", {"path": str(path), **details})


def read_tensors(path: Path, what: str, wrappers: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The file's tensors by name: unwrapped from the first of `wrappers` it holds (Real-ESRGAN's
    `params_ema`), a `module.` prefix (a DataParallel save) stripped. MODEL_LOAD_ERROR, its
    message starting with `what` and the path, for a missing or unreadable file or one that is
    not a state dict of tensors."""
    if not path.is_file():
        raise refuse(what, path, "the file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        unpickling = any(c.__name__ == "UnpicklingError" for c in type(exc).__mro__)
        if not unpickling and not isinstance(exc, READ_ERRORS):
            raise
        raise refuse(what, path, f"not a readable state dict ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(state, dict):
        wrapper = next((k for k in wrappers if k in state), None)
        if wrapper is not None:
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise refuse(what, path, "not a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name in out:
            raise refuse(what, path, f"{name!r} appears both with and without the module. prefix")
        out[name] = value
    return out
