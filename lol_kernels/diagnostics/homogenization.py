"""Inter-head attention homogenization: how many heads over-attend the sink pages at once.

LoL's Figure 3: at a collapse, many heads put most of their attention on the sink frames at the
same time. Given the per-entry attention mass of one block
(:func:`~lol_kernels.diagnostics.page_mass.paged_attention_page_mass`, ``[B, Hq, N, M + 1]``)
and which page-table entries hold sink pages, this module reports the per-head sink mass of the
block and the fraction of heads above a threshold; stacking blocks gives the curve over a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Homogenization:
    """Sink attention of one block (``B`` batch rows, ``Hq`` heads).

    Attributes:
        sink_mass: ``[B, Hq]`` float64, mean over the block's queries (rows that see at least
            one key) of the attention probability on the sink entries.
        frac_heads: ``[B]`` float64, fraction of heads with ``sink_mass > threshold``.
        threshold: the threshold used.
    """

    sink_mass: torch.Tensor
    frac_heads: torch.Tensor
    threshold: float


def _sink_mask(sink_entries, B: int, M: int, device) -> torch.Tensor:
    """``[B, M + 1]`` bool from a list of entry indices or a ``[M]`` / ``[B, M]`` bool mask."""
    if isinstance(sink_entries, torch.Tensor) and sink_entries.dtype == torch.bool:
        m = sink_entries.to(device)
        if m.shape == (M,):
            m = m.expand(B, M)
        if m.shape != (B, M):
            raise ValueError(f"sink_entries as a bool mask must have shape [M={M}] or "
                             f"[B={B}, M={M}], got {list(m.shape)}")
    else:
        idx = torch.as_tensor(list(sink_entries) if not isinstance(sink_entries, torch.Tensor)
                              else sink_entries)
        if idx.dim() != 1 or idx.is_floating_point():
            raise ValueError(f"sink_entries must be int entry indices or a bool mask, got "
                             f"{sink_entries!r}")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= M):
            raise ValueError(f"sink_entries must index page-table entries [0, {M}), got "
                             f"{idx.tolist()}")
        m = torch.zeros(M, dtype=torch.bool)
        m[idx] = True
        m = m.to(device).expand(B, M)
    # the block's own new keys (last column) are never sink
    return torch.cat([m, torch.zeros(B, 1, dtype=torch.bool, device=device)], dim=1)


def sink_mass(mass: torch.Tensor, sink_entries: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-head attention mass on the sink entries, averaged over the block's queries.

    Args:
        mass: ``[B, Hq, N, M + 1]`` float, per-entry mass (last column = new keys); rows that
            see no key are all zeros and are left out of the average.
        sink_entries: which of the ``M`` page-table entries hold sink pages: int indices (the
            same for every batch row) or a bool mask ``[M]`` / ``[B, M]``.

    Returns:
        ``[B, Hq]`` float64 in ``[0, 1]`` (0 for a head none of whose rows sees a key).
    """
    if not isinstance(mass, torch.Tensor) or mass.dim() != 4 or not mass.is_floating_point():
        raise ValueError("mass must be a float tensor [B, Hq, N, M + 1], got "
                         f"{getattr(mass, 'shape', type(mass).__name__)}")
    B, _, _, M1 = mass.shape
    sink = _sink_mask(sink_entries, B, M1 - 1, mass.device)  # [B, M + 1]
    m = mass.to(torch.float64)
    per_row = (m * sink[:, None, None, :]).sum(-1)  # [B, Hq, N]
    seen = m.sum(-1) > 0
    n = seen.sum(-1)
    return (per_row * seen).sum(-1) / n.clamp_min(1)


def homogenization(mass: torch.Tensor, sink_entries: Sequence[int] | torch.Tensor, *,
                   threshold: float = 0.5) -> Homogenization:
    """Sink mass per head of one block and the fraction of heads above ``threshold``.

    A block is homogenized when ``frac_heads`` is high: most heads put more than ``threshold``
    of their attention on the sinks together (LoL's multi-head synchronization, seen in the
    attention itself rather than predicted from the RoPE table).

    Args:
        mass: ``[B, Hq, N, M + 1]`` per-entry mass of one block.
        sink_entries: sink entries (see :func:`sink_mass`).
        threshold: in ``[0, 1]``, strict ``sink_mass > threshold``.

    Returns:
        :class:`Homogenization`.
    """
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    sm = sink_mass(mass, sink_entries)
    frac = (sm > threshold).to(torch.float64).mean(-1)
    return Homogenization(sm, frac, float(threshold))


def homogenization_over_blocks(masses: Sequence[torch.Tensor],
                               sink_entries: Sequence[int] | torch.Tensor, *,
                               threshold: float = 0.5) -> Homogenization:
    """:func:`homogenization` of a stream of blocks, stacked on a leading block axis.

    Args:
        masses: ``n`` per-block masses ``[B, Hq, Nq_k, M_k + 1]`` (``N``, ``M`` may vary).
        sink_entries: sink entries, the same for every block.

    Returns:
        :class:`Homogenization` with ``sink_mass [n, B, Hq]`` and ``frac_heads [n, B]``.
    """
    hs = [homogenization(m, sink_entries, threshold=threshold) for m in masses]
    if not hs:
        raise ValueError("masses must hold at least one block")
    return Homogenization(torch.stack([h.sink_mass for h in hs]),
                          torch.stack([h.frac_heads for h in hs]), float(threshold))
