"""PyTorch reference of the MoC chunk router (``lk.moc_route(..., backend="torch")``).

Score order (the bit-exact contract shared with ``csrc/moc/router_core.h``): both inputs are
converted to fp32 (exact for fp16/bf16, ``float()`` rounding for fp64); lane ``j`` (``j = 0..7``)
sums the products ``q[d] * c[d]`` of ``d = j, j + 8, j + 16, ... < D`` in increasing ``d``,
starting from ``0.0``, every product and sum rounded to fp32 (no fused multiply-add); then
``score = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``. Because every step is one IEEE
fp32 operation in a fixed order, the reference, the C++ and the CUDA kernels produce identical
scores and therefore identical indices, near-ties included. NaN scores rank as ``-inf``; ``-0.0``
ties with ``+0.0``.
"""

from __future__ import annotations

import torch

LANES = 8  # partial sums of a score (part of the bit-exact contract)


def moc_scores_reference(q_mean: torch.Tensor, chunk_mean: torch.Tensor, *,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Router scores of every (tile, head, chunk).

    Args:
        q_mean: ``[B, T, H, D]`` float, summary of each query tile.
        chunk_mean: ``[B, C, H, D]`` float, summary of each chunk.
        dtype: ``torch.float32`` for the contract's scores in the contract's order;
            ``torch.float64`` for plain float64 dot products (to check the fp32 scores).

    Returns:
        ``[B, T, H, C]`` scores in ``dtype``.
    """
    if dtype == torch.float64:
        return torch.einsum("bthd,bchd->bthc", q_mean.double(), chunk_mean.double())
    if dtype != torch.float32:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    q = q_mean.float().permute(0, 2, 1, 3)  # [B, H, T, D]
    c = chunk_mean.float().permute(0, 2, 3, 1).contiguous()  # [B, H, D, C]
    B, H, T, D = q.shape
    C = c.shape[3]
    prod = q.new_empty((B, H, T, C))

    def lane(j):
        acc = q.new_zeros((B, H, T, C))
        for d in range(j, D, LANES):
            # separate multiply and add kernels: the product is rounded before the add (no FMA)
            torch.mul(q[..., d, None], c[:, :, None, d, :], out=prod)
            acc.add_(prod)
        return acc

    s = ((lane(0) + lane(1)) + (lane(2) + lane(3))) + ((lane(4) + lane(5)) + (lane(6) + lane(7)))
    return s.permute(0, 2, 1, 3)


def eligibility(B: int, T: int, C: int, chunk_valid: torch.Tensor | None,
                causal_limit: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[B, T, C]`` bool: chunk ``c`` is eligible for tile ``t`` of batch ``b`` iff
    ``chunk_valid[b, c]`` (all valid when None) and ``c < causal_limit[b, t]`` (no limit when
    None)."""
    elig = torch.ones((B, T, C), dtype=torch.bool, device=device)
    if chunk_valid is not None:
        elig = elig & chunk_valid[:, None, :]
    if causal_limit is not None:
        c = torch.arange(C, device=device)
        elig = elig & (c[None, None, :] < causal_limit.long()[:, :, None])
    return elig


def select_topk(scores: torch.Tensor, elig: torch.Tensor, k: int) -> torch.Tensor:
    """The contract's selection from ``scores [B, T, H, C]`` and ``elig [B, T, C]``.

    Returns ``[B, T, H, k]`` int32: the eligible chunks with the ``k`` largest scores (ties to
    the lower chunk index, NaN as ``-inf``), in ascending chunk order, ``-1`` padded.
    """
    B, T, H, C = scores.shape
    s = torch.where(scores.isnan(), torch.full_like(scores, float("-inf")), scores) + 0.0  # -0 -> +0
    e = elig[:, :, None, :].expand(B, T, H, C)
    # Stable sorts keep equal keys in index order: by score (desc), then eligible first.
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    by_elig = torch.sort(e.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                         stable=True).indices
    ranked = order.gather(-1, by_elig)
    if C < k:
        ranked = torch.cat([ranked, ranked.new_zeros((B, T, H, k - C))], dim=-1)
    n = e.sum(-1, keepdim=True)  # eligible count
    take = torch.arange(k, device=scores.device) < n
    picked = torch.where(take, ranked[..., :k], torch.full_like(ranked[..., :k], C))
    picked = picked.sort(dim=-1).values  # ascending; the C sentinels go last
    return torch.where(picked == C, torch.full_like(picked, -1), picked).to(torch.int32)


def moc_route_reference(q_mean: torch.Tensor, chunk_mean: torch.Tensor, k: int, *,
                        chunk_valid: torch.Tensor | None = None,
                        causal_limit: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`lol_kernels.moc_route` (no input validation; see there).

    Args:
        q_mean: ``[B, T, H, D]`` float; chunk_mean: ``[B, C, H, D]`` float.
        k: chunks per (tile, head).
        chunk_valid: ``[B, C]`` bool or None; causal_limit: ``[B, T]`` int or None.

    Returns:
        ``[B, T, H, k]`` int32 chunk indices, ascending, ``-1`` padded.
    """
    B, T = q_mean.shape[:2]
    C = chunk_mean.shape[1]
    scores = moc_scores_reference(q_mean, chunk_mean)
    elig = eligibility(B, T, C, chunk_valid, causal_limit, q_mean.device)
    return select_topk(scores, elig, k)
