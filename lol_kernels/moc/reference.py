"""The plain PyTorch references of the MoC ops: the chunk router (what
``lk.moc_route(..., backend="torch")`` runs) and the block-sparse attention.

Router score order (the bit-exact contract shared with ``csrc/moc/router_core.h``): both inputs
are converted to fp32 (exact for fp16/bf16, ``float()`` rounding for fp64); lane ``j`` (``j =
0..7``) sums the products ``q[d] * c[d]`` of ``d = j, j + 8, j + 16, ... < D`` in increasing
``d``, starting from ``0.0``, every product and sum rounded to fp32 (no fused multiply-add);
then ``score = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``. Because every step is one
IEEE fp32 operation in a fixed order, the reference, the C++ and the CUDA kernels produce
identical scores and therefore identical indices, near-ties included. NaN scores rank as
``-inf``; ``-0.0`` ties with ``+0.0``.

The plain reference of ``moc_attention``: formulas only, no state, float64-capable. Query ``i``
(in query tile ``t = i // tile_size``) of head ``h`` sees:

* every valid slot of the **mandatory** pages ``page_table[b]`` (sink and fast window),
* every valid slot of the pages ``chunk_pages[b, c]`` of the chunks ``c`` listed in
  ``routed[b, t, h]`` (``-1`` entries ignored),
* the block's own keys ``k_new`` (all of them, or ``j <= i`` when ``causal``).

:func:`moc_attention_reference` gathers every chunk of the pool and expresses the routing as a
dense ``[B, Hq, N, L]`` mask; run in float64 it is the ground truth of the kernel tests.
:func:`merge_lse` merges partial results over disjoint key sets (what the CPU path,
:mod:`.moc_attention_cpu`, does with its mandatory and routed parts).
"""

from __future__ import annotations

import torch

from ..attention.reference import gather_keys, masked_softmax, page_fill, rotated_scores
from ..rope.reference import compute_dtype
from ..rope.table import RopeTable

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


def gather_chunks(cache_k, cache_v, cache_pos, page_len, chunk_pages, chunk_shift):
    """Gather the slots of every chunk, padded to ``Lc = Pc * S`` slots per chunk.

    Args:
        cache_k, cache_v: ``[P, S, Hkv, D]``. cache_pos: ``[P, S, A]`` int. page_len: ``[P]``.
        chunk_pages: ``[B, C, Pc]`` page ids of each chunk, ``-1`` = no page.
        chunk_shift: ``[B, C, A]`` int added to the stored positions of the chunk, or ``None``.

    Returns:
        ``k, v [B, C, Lc, Hkv, D]``, ``pos [B, C, Lc, A]`` int64 and ``valid [B, C, Lc]`` bool
        (slot ``s`` of page ``p`` is valid iff ``p >= 0`` and ``s < page_len[p]``).
    """
    P, S, Hkv, D = cache_k.shape
    B, C, Pc = chunk_pages.shape
    A = cache_pos.shape[-1]
    cp = chunk_pages.long()
    ids = cp.clamp(min=0)
    slots = torch.arange(S, device=cp.device)
    fill = page_fill(page_len)[ids]  # [B, C, Pc]
    valid = ((cp >= 0).unsqueeze(-1) & (slots < fill.unsqueeze(-1))).reshape(B, C, Pc * S)
    flat = (ids.unsqueeze(-1) * S + slots).reshape(B, C, Pc * S)
    if P == 0:  # an empty pool: every chunk slot is padding, read as zeros
        zeros = cache_k.new_zeros(B, C, Pc * S, Hkv, D)
        pos = cache_pos.new_zeros(B, C, Pc * S, A, dtype=torch.long)
        return zeros, zeros.clone(), pos, valid
    k = cache_k.reshape(P * S, Hkv, D)[flat]
    v = cache_v.reshape(P * S, Hkv, D)[flat]
    pos = cache_pos.reshape(P * S, A)[flat].long()
    if chunk_shift is not None:
        pos = pos + chunk_shift.long().unsqueeze(2)
    return k, v, pos, valid


def routed_chunk_mask(routed: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``routed [B, T, H, k]`` chunk ids (``-1`` = none) -> ``[B, T, H, C]`` bool selection."""
    B, T, H, _ = routed.shape
    sel = torch.zeros(B, T, H, num_chunks + 1, dtype=torch.bool, device=routed.device)
    idx = torch.where(routed >= 0, routed.long(), num_chunks)  # -1 goes to a dropped column
    sel.scatter_(-1, idx, True)
    return sel[..., :num_chunks]


def moc_dense_mask(routed, chunk_valid_slots, mand_valid, N, Lm, tile_size, causal, has_new):
    """The routing as a dense ``[B, Hq, N, L]`` mask over the reference's key order
    (mandatory slots, then every chunk's ``Lc`` slots, then the ``N`` new keys)."""
    B, T, Hq, _ = routed.shape
    C, Lc = chunk_valid_slots.shape[1:]
    dev = routed.device
    tile = torch.arange(N, device=dev) // tile_size
    sel = routed_chunk_mask(routed, C)[:, tile]  # [B, N, Hq, C]
    m_chunk = sel.permute(0, 2, 1, 3).repeat_interleave(Lc, dim=-1)
    m_chunk = m_chunk & chunk_valid_slots.reshape(B, 1, 1, C * Lc)
    if mand_valid is None:
        mand_valid = torch.ones(B, Lm, dtype=torch.bool, device=dev)
    parts = [mand_valid[:, None, None, :].expand(B, Hq, N, Lm), m_chunk]
    if has_new:
        new = torch.ones(N, N, dtype=torch.bool, device=dev)
        parts.append((new.tril() if causal else new).expand(B, Hq, N, N))
    return torch.cat(parts, dim=-1)


def moc_attention_reference(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                            table: RopeTable, *, chunk_pages, routed, k_new=None, v_new=None,
                            causal=False, page_shift=None, chunk_shift=None, scale=None,
                            tile_size=128):
    """Dense masked MoC attention (plain formula); shapes as :func:`lol_kernels.moc_attention`.

    Computes in ``q.dtype`` (RoPE in fp32, fp64 for fp64 inputs), softmax in fp32 (fp64).
    Returns ``out [B, N, Hq, D]`` in ``q.dtype`` and ``lse [B, Hq, N]``; rows that see no key
    give zeros and ``-inf``.
    """
    B, N, Hq, D = q.shape
    dt = q.dtype
    scale = D**-0.5 if scale is None else scale
    mk, mv, mpos, mvalid = gather_keys(cache_k, cache_v, cache_pos, page_len, page_table,
                                       page_shift)
    ck, cv, cpos, cvalid = gather_chunks(cache_k, cache_v, cache_pos, page_len, chunk_pages,
                                         chunk_shift)
    C, Lc = cvalid.shape[1:]
    Hkv = cache_k.shape[2]
    ks = [mk, ck.reshape(B, C * Lc, Hkv, D)]
    vs = [mv, cv.reshape(B, C * Lc, Hkv, D)]
    ps = [mpos, cpos.reshape(B, C * Lc, cache_pos.shape[-1])]
    if k_new is not None:
        ks.append(k_new)
        vs.append(v_new)
        ps.append(q_pos.long())
    k, v, kpos = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ps, 1)
    mask = moc_dense_mask(routed, cvalid, mvalid, N, mk.shape[1], tile_size, causal,
                          k_new is not None)
    p, lse = masked_softmax(rotated_scores(q, q_pos, k, kpos, table, scale), mask)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), v.repeat_interleave(Hq // Hkv, dim=2).to(dt))
    return out.to(dt), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Merge two partial softmax results over disjoint key sets.

    ``out_* [B, N, H, D]`` (normalized within their part), ``lse_* [B, H, N]`` fp32/fp64
    (``-inf`` = the part saw no key). Returns the merged ``out`` (fp32/fp64) and ``lse``.
    """
    ct = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype),
                             compute_dtype(out_a.dtype))
    lse_a, lse_b = lse_a.to(ct), lse_b.to(ct)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    wa = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)  # exp(-inf) = 0 for empty parts
    wb = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return wa * out_a.to(ct) + wb * out_b.to(ct), lse
