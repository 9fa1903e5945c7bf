"""The official Wan2.2 code (PyPI `wan22`, import name `wan`) as a test oracle, loaded on the CPU.

`wan/__init__.py` imports every pipeline, and with them decord and torchvision (which do not import
beside the CPU torch here), and `wan/modules/__init__.py` imports the T5 and VAE modules. So the
packages `wan`, `wan.modules`, `wan.modules.s2v`, `wan.distributed` and `wan.utils` are registered
as empty package modules with their real `__path__`, and only the submodules a test asks for are
imported from the installed files (unchanged). The official attention calls flash-attn, on CUDA
only and in bf16: `flash_attention` is replaced, in every module that imported the name, by
PyTorch's `scaled_dot_product_attention` in the inputs' dtype (our stages' `sdpa` backend), with the
key lengths (`k_lens`) as a padding mask when they are shorter than the sequence.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PACKAGES = ("wan", "wan.modules", "wan.modules.s2v", "wan.distributed", "wan.utils")
# modules that bind `flash_attention` by name
_USERS = (
    "wan.modules.model",
    "wan.modules.s2v.model_s2v",
    "wan.modules.s2v.motioner",
    "wan.distributed.ulysses",
    "wan.distributed.sequence_parallel",
)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: Any = None,
    k_lens: Any = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    q_scale: Any = None,
    causal: bool = False,
    window_size: Any = (-1, -1),
    deterministic: bool = False,
    dtype: Any = None,
    version: Any = None,
) -> torch.Tensor:
    """flash_attention's contract ([B, L, N, D] in and out) on PyTorch SDPA, in q's dtype."""
    assert window_size in ((-1, -1), [-1, -1]) and not causal and q_scale is None and dropout_p == 0.0
    mask = None
    if k_lens is not None and int(torch.as_tensor(k_lens).min()) < k.size(1):
        lens = torch.as_tensor(k_lens, device=q.device).view(-1, 1)
        keep = torch.arange(k.size(1), device=q.device).view(1, -1) < lens
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.to(q.dtype).transpose(1, 2),
        v.to(q.dtype).transpose(1, 2),
        attn_mask=mask,
        scale=softmax_scale,
    )
    return out.transpose(1, 2).to(v.dtype)


def _root() -> Path:
    if "wan" in sys.modules:  # registered (by a previous load) or imported: its __path__ says where
        return Path(list(sys.modules["wan"].__path__)[0])
    spec = importlib.util.find_spec("wan")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("the official Wan2.2 code (wan22) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load(name: str) -> types.ModuleType:
    """Import the official submodule `name` (e.g. "wan.modules.s2v.model_s2v") without the package
    `__init__`s, with its attention on SDPA."""
    root = _root()
    for pkg in PACKAGES:
        mod = sys.modules.get(pkg)
        if mod is None or getattr(mod, "__file__", None) is not None:  # never the real __init__
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(root.joinpath(*pkg.split(".")[1:]))]
            mod.__package__ = pkg
            sys.modules[pkg] = mod
    with warnings.catch_warnings():  # its torch.cuda.amp decorators are deprecated: not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        module = importlib.import_module(name)
    for user in _USERS:
        if user in sys.modules and hasattr(sys.modules[user], "flash_attention"):
            setattr(sys.modules[user], "flash_attention", sdpa_attention)  # noqa: B010
    return module


def s2v_model_class() -> Any:
    return load("wan.modules.s2v.model_s2v").WanModel_S2V


def unipc_scheduler_class() -> Any:
    return load("wan.utils.fm_solvers_unipc").FlowUniPCMultistepScheduler
