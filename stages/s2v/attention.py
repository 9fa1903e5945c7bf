"""Attention of the S2V DiT, under the official parameter names (`q`, `k`, `v`, `o`, `norm_q`, `norm_k`).

One module serves the three kinds the S2V DiT has: the blocks' self-attention (with rotary
positions), their cross-attention to the text, and the audio injectors' cross-attention from a
latent frame's tokens to its audio tokens. q and k are RMS-normalised across all heads (torch's
`RMSNorm`, as diffusers' `WanAttention`; bit-identical to the official `WanRMSNorm`), and the
attention itself goes through diffusers' `dispatch_attention_fn`, so `set_attention_backend`
("native" = PyTorch SDPA, "flash") picks the kernel as for the other DiTs of the server.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from stages.s2v.rope import apply_rope


class S2VAttnProcessor:
    """q/k/v projections, q/k RMS norm, optional rotary positions, attention, output projection."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self, attn: S2VAttention, x: torch.Tensor, context: torch.Tensor | None = None, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        source = x if context is None else context
        b, n = x.shape[0], attn.heads
        q = attn.norm_q(attn.q(x)).view(b, -1, n, attn.head_dim)
        k = attn.norm_k(attn.k(source)).view(b, -1, n, attn.head_dim)
        v = attn.v(source).view(b, -1, n, attn.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope).to(v.dtype), apply_rope(k, rope).to(v.dtype)
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend)
        return attn.o(out.flatten(2).type_as(v))


class S2VAttention(nn.Module, AttentionModuleMixin):  # type: ignore[misc]
    _default_processor_cls = S2VAttnProcessor
    _available_processors = [S2VAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.set_processor(S2VAttnProcessor())  # type: ignore[operator]

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        processor: S2VAttnProcessor = self.processor  # type: ignore[assignment]
        return processor(self, x, context, rope)
