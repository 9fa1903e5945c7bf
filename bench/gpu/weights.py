"""Models with random weights built straight on the device, as `from_pretrained` would lay them out."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init); buffers stay real, as under
    accelerate's `init_empty_weights()` that `from_pretrained` uses."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_random(cls: type, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Any:
    """`cls(**config)` with random weights on `device`: parameters in `dtype`, except those
    `from_pretrained(torch_dtype=dtype)` keeps in float32 (`_keep_in_fp32_modules`); buffers
    (the RoPE tables) as the constructor made them."""
    with params_on_meta():
        model = cls(**config)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    torch.manual_seed(seed)
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            pdtype = torch.float32 if any(k in full.split(".") for k in keep) else dtype
            t = torch.empty(p.shape, device=device, dtype=pdtype)
            if pname == "bias":
                t.zero_()
            elif pname == "gamma" or t.ndim == 1:
                t.fill_(1.0)
            elif pname == "scale_shift_table":
                t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]))
            else:  # unit-variance-preserving init, so random activations stay finite
                fan_in = max(1, t.numel() // t.shape[0])
                t.normal_(0.0, 1.0 / math.sqrt(fan_in))
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model.to(device).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def approx_forward_flops(model: Any, tokens: int, text_len: int, ts_tokens: int) -> float:
    """Matmul FLOPs of one batch-1 WanTransformer3DModel forward (linear layers + attention)."""
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        n = 2.0 * mod.in_features * mod.out_features
        if ".attn2.to_k" in name or ".attn2.to_v" in name or "text_embedder" in name:
            flops += n * text_len
        elif "time_embedder" in name or "time_proj" in name:
            flops += n * ts_tokens
        else:
            flops += n * tokens
    flops += cfg.num_layers * (4.0 * tokens * tokens * inner + 4.0 * tokens * text_len * inner)
    return flops
