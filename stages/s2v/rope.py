"""Rotary position embedding of the S2V DiT: one 3-D (time, height, width) position per token.

The S2V sequence is several grids laid end to end: the noisy latent frames (time 0..F-1), the
reference image's latent frame (time 30, "far in the future"), and the FramePack motion tokens of the
previous clip (negative times, coarser buckets further back). A `Grid` names where a block of tokens
sits: its start and end position per axis and the position range the tokens are spread over (a
coarse 2x/4x bucket covers more positions than it has tokens; the positions are sampled evenly, as
`numpy.linspace` truncated to integers). Negative times rotate backwards (the complex conjugate).

The factors are complex128, and applied in float64 as the official code does (`rope_apply` of
wan/modules/s2v/model_s2v.py), so the rotated q/k are bit-identical to it. diffusers' Wan rotary
embedding is the same maths in float32 cos/sin, which differs in the last bits, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ROPE_POSITIONS = 1024  # the official table's length
THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex columns of the (time, height, width) parts of a head's rotary table."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_table(positions: int, dim: int) -> torch.Tensor:
    inv = 1.0 / torch.pow(THETA, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rope_table(head_dim: int, positions: int = ROPE_POSITIONS) -> torch.Tensor:
    """(positions, head_dim // 2) complex128: the time, height and width tables side by side."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {head_dim}")
    t = head_dim - 4 * (head_dim // 6)
    s = 2 * (head_dim // 6)
    return torch.cat([_axis_table(positions, t), _axis_table(positions, s), _axis_table(positions, s)], dim=1)


@dataclass(frozen=True)
class Grid:
    """A block of tokens: `start` and `end` (f, h, w) positions (end exclusive) and the `span`
    (f, h, w) of positions its tokens are spread over (equal to end - start for a plain grid)."""

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    span: tuple[int, int, int]

    @classmethod
    def plain(cls, f: int, h: int, w: int, t0: int = 0) -> Grid:
        return cls((t0, 0, 0), (t0 + f, h, w), (f, h, w))


def _positions(start: int, span: int, count: int) -> list[int]:
    """`count` positions spread over `span` from `start` (negative starts count backwards)."""
    if start >= 0:
        return np.linspace(start, start + span - 1, count).astype(int).tolist()
    return np.linspace(-start, -start - span + 1, count).astype(int).tolist()


def grid_freqs(table: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
    """(tokens, head_dim // 2) complex128 rotation factors for the grids, in order."""
    t_tab, h_tab, w_tab = table.split(axis_dims(2 * table.shape[1]), dim=1)
    parts = []
    for g in grids:
        (f0, h0, w0), (f1, h1, w1) = g.start, g.end
        nf, nh, nw = f1 - f0, h1 - h0, w1 - w0
        if nf * nh * nw <= 0:
            continue
        if f0 * f1 < 0 or h0 * h1 < 0 or w0 * w1 < 0:
            raise ValueError(f"a grid may not cross position 0: {g}")
        ft = t_tab[_positions(f0, g.span[0], nf)]
        if f0 < 0:
            ft = ft.conj()
        fh = h_tab[_positions(h0, g.span[1], nh)]
        fw = w_tab[_positions(w0, g.span[2], nw)]
        parts.append(
            torch.cat(
                [
                    ft.view(nf, 1, 1, -1).expand(nf, nh, nw, -1),
                    fh.view(1, nh, 1, -1).expand(nf, nh, nw, -1),
                    fw.view(1, 1, nw, -1).expand(nf, nh, nw, -1),
                ],
                dim=-1,
            ).reshape(nf * nh * nw, -1)
        )
    if not parts:
        return torch.zeros(0, table.shape[1], dtype=table.dtype)
    return torch.cat(parts)


ROPE_CHUNK = 8192  # tokens rotated at a time: bounds the float64 temporaries (elementwise, so exact)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, L, heads, head_dim) by `freqs` (B, L, head_dim // 2) complex128, in float64;
    returns float32 (as the official code), which the caller casts to its compute dtype.

    The product is written out in reals, (ac - bd, ad + bc): that is what PyTorch's complex multiply
    computes on equal-shaped operands (the official code's case: its factors are expanded over the
    heads), while a broadcast complex multiply takes another path with other last bits. Written out,
    the factors broadcast over the heads and are not materialised per head; and the tokens go in
    chunks, so a 63k-token clip never holds its q in float64 at once.
    """
    b, s, n, d = x.shape
    out = torch.empty(b, s, n, d, dtype=torch.float32, device=x.device)
    fr_all, fi_all = freqs.real.to(x.device), freqs.imag.to(x.device)
    for i in range(0, s, ROPE_CHUNK):
        xr, xi = x[:, i : i + ROPE_CHUNK].to(torch.float64).reshape(b, -1, n, d // 2, 2).unbind(-1)
        fr, fi = fr_all[:, i : i + ROPE_CHUNK].unsqueeze(2), fi_all[:, i : i + ROPE_CHUNK].unsqueeze(2)
        out[:, i : i + ROPE_CHUNK] = torch.stack([xr * fr - xi * fi, xr * fi + xi * fr], dim=-1).flatten(3)
    return out
