"""Reading a weights file the user places for a side model (RIFE, the upscale models): a `.safetensors`
file, or a `.pth` / `.pkl` pickle read with torch's restricted unpickler (`weights_only=True`: a
pickle that would run code is refused, and no `pickle` import is needed here to say so)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from common.errors import ModelLoadError

M = TypeVar("M", bound=nn.Module)
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_strictly(model: M, state: dict[str, torch.Tensor], what: str, path: Path, layout: str,
                  **details: Any) -> M:
    """`model` (built from the layout detected in `state`) with `state` loaded: every tensor present,
    none extra, each shape right, all finite floating point; else MODEL_LOAD_ERROR naming the file,
    what differs, and `details`."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        shapes = {k: {"file": list(state[k].shape), "expected": list(expected[k].shape)} for k in wrong[:5]}
        raise refuse(what, path, f"keys or shapes do not match {layout} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected, {len(wrong)} of the wrong shape)",
                     missing=missing[:10], unexpected=unexpected[:10], wrong_shapes=shapes, **details)
    bad = [k for k, v in state.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    if bad:
        raise refuse(what, path, "tensors that are not finite floating-point numbers", keys=bad[:10])
    model.load_state_dict(state, strict=True)
    return model.eval()
