"""The CPU path of RoPE (what ``apply_rope(backend="torch")`` runs) and its helpers.

Same angles as the reference (:func:`~lol_kernels.rope.reference.rope_angles`: ``pos * omega``
in float64, reduced modulo ``2 pi``), but formed once per *distinct* position value of each axis
(a video block has few distinct ``t``, ``h``, ``w``) and applied as one complex multiply per
channel pair. Stateless: safe to call from several threads at once.
"""

from __future__ import annotations

import torch

from .reference import TWO_PI, compute_dtype
from .table import RopeTable


def rope_factors(pos: torch.Tensor, table: RopeTable, dtype: torch.dtype, *,
                 head_major: bool = False):
    """Per-axis complex rotation factors ``exp(i * pos * omega)`` for the fast path.

    Angles are formed once per *distinct* position of each axis (a video block has few distinct
    ``t``, ``h``, ``w`` values), in float64 and reduced mod 2 pi, then gathered per token. An
    axis whose frequencies are equal across heads gets a broadcast head dimension of 1.

    Returns:
        list of ``(start, end, factor [..., N, H or 1, end - start])`` complex tensors, one per
        axis, covering pairs ``start:end``; with ``head_major`` the factors are
        ``[..., H or 1, N, end - start]``, to rotate a head-major ``[..., H, N, D]`` tensor with
        both operands read in memory order.
    """
    t = table.to(pos.device)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    out, start = [], 0
    for a, n in enumerate(table.axes):
        end = start + n // 2
        u, inv = torch.unique(pos[..., a], return_inverse=True)
        f = t.freqs[:, start:end]
        if table.axis_shared(a):
            f = f[:1]
        ang = torch.remainder(u.to(torch.float64)[:, None, None] * f, TWO_PI).to(dtype)
        fac = torch.complex(torch.cos(ang), torch.sin(ang)).to(cdt)  # [U, H', n]
        if head_major:  # [H', ..., N, n] gathered in memory order, then heads moved in place
            out.append((start, end, fac.transpose(0, 1)[:, inv].movedim(0, -3)))
        else:
            out.append((start, end, fac[inv]))
        start = end
    return out


def rotate_(x: torch.Tensor, factors) -> torch.Tensor:
    """Rotate ``x`` **in place** by :func:`rope_factors`: ``x [..., N, H, D]``, or
    ``[..., H, N, D]`` with head-major factors. The last dim must be contiguous."""
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    for start, end, fac in factors:
        xc[..., start:end] *= fac
    return x


def apply_rope_torch(x: torch.Tensor, pos: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Accurate fast path: float64 angles mod 2 pi, fp32 rotation, output in ``x.dtype``."""
    ct = compute_dtype(x.dtype)
    y = x.to(ct, memory_format=torch.contiguous_format, copy=True)
    return rotate_(y, rope_factors(pos, table, ct)).to(x.dtype)


def rope_phasor_tables(pos: torch.Tensor, table: RopeTable, dtype: torch.dtype):
    """Unit phasors ``exp(i angle)`` of ``pos [L, A]`` (complex of ``dtype``), per axis.

    Returns ``[(tab [H, U_a, n_a], inv [L])]`` over axes: token ``l`` rotates the pairs of
    axis ``a`` by ``tab[:, inv[l]]``. Same angles as ``rope_angles`` (float64 product reduced
    modulo ``2 pi``), formed once per distinct position value (frame index, patch row, patch
    column: few of each) instead of once per token and head.
    """
    out, j0 = [], 0
    L = pos.shape[0]
    for a, width in enumerate(table.axes):
        j1 = j0 + width // 2
        p_a = pos[:, a]
        lo, hi = (int(v) for v in torch.aminmax(p_a)) if L else (0, 0)
        if hi - lo < max(4096, L // 4):  # a dense range: index by offset, no sort
            u = torch.arange(lo, hi + 1, device=pos.device)
            inv = (p_a - lo).long()
        else:
            u, inv = torch.unique(p_a, return_inverse=True)
        ang = torch.remainder(u.to(torch.float64)[None, :, None] * table.freqs[:, None, j0:j1],
                              TWO_PI).to(dtype)  # [H, U_a, n_a]
        out.append((torch.polar(torch.ones_like(ang), ang), inv))
        j0 = j1
    return out


def phasors(tabs, rows: slice) -> torch.Tensor:
    """``[H, n, D/2]`` phasors of the tokens ``rows`` from :func:`rope_phasor_tables`."""
    return torch.cat([tab[:, inv[rows]] for tab, inv in tabs], dim=-1)
