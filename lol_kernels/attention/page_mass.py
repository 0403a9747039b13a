"""Attention mass per page-table entry (reference path): what LoL's homogenization analysis reads.

:func:`paged_attention_page_mass` runs the same computation as
:func:`~lol_kernels.attention.reference.paged_attention_reference` (same gather, same RoPE at
read time, same masks, fp32 softmax; fp64 for fp64 inputs) but, instead of the weighted sum of
values, sums each query row's softmax probabilities over the keys of every page-table entry.
"""

from __future__ import annotations

import torch

from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.table import RopeTable
from .op import validate_paged_inputs
from .reference import _keys_and_mask, _rotate_keys, gather_keys


def _key_entries(cache_pos, page_len, page_table) -> torch.Tensor:
    """``[B, L]`` int64: the page-table entry of each key :func:`gather_keys` returns.

    Gathers a zero position pool with ``page_shift = entry index``, so the returned "position"
    of every key is its entry (the gather's order and padding are reused, not re-derived).
    """
    P, S = cache_pos.shape[:2]
    B, M = page_table.shape
    dev = page_table.device
    zk = torch.zeros(P, S, 1, 1, device=dev)
    zpos = torch.zeros(P, S, 1, dtype=torch.int64, device=dev)
    shift = torch.arange(M, device=dev).view(1, M, 1).expand(B, M, 1)
    _, _, ent, _ = gather_keys(zk, zk, zpos, page_len, page_table, shift)
    return ent[..., 0]


def paged_attention_page_mass(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                              table: RopeTable, *, k_new=None, v_new=None, causal=False,
                              page_shift=None, scale=None) -> torch.Tensor:
    """Softmax mass each query head puts on each page-table entry.

    Arguments and their meaning are those of :func:`lol_kernels.paged_attention` (shapes:
    ``q [B, Nq, Hq, D]``, ``q_pos [B, Nq, A]``, ``cache_k/v [P, S, Hkv, D]``,
    ``cache_pos [P, S, A]``, ``page_len [P]``, ``page_table [B, M]``, ``k_new/v_new
    [B, Nq, Hkv, D]``, ``page_shift [B, M, A]``); the inputs are validated the same way.
    ``cache_v`` / ``v_new`` are checked but do not enter the mass.

    Returns:
        ``mass [B, Hq, Nq, M + 1]`` float32. ``mass[b, h, i, m]`` is the total attention
        probability of query ``i``, head ``h`` on the keys of entry ``m`` (its valid slots);
        the last column is the mass on the block's own new keys (0 without ``k_new``). Empty
        (``-1``) entries get 0. Each row sums to 1, except a row that sees no key, which is all
        zeros (the row whose ``paged_attention`` output is 0 with ``lse = -inf``). If a page
        appears in two entries, each entry gets the mass of its own copy.

    Example:
        >>> mass = paged_attention_page_mass(q, q_pos, k, v, pos, page_len, page_table, table)
        >>> sink_mass = mass[..., :3].sum(-1)  # the first 3 entries hold the sink pages
    """
    scale = validate_paged_inputs(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                                  table, k_new, v_new, causal, page_shift, scale)
    B, Nq, Hq, D = q.shape
    M = page_table.shape[1]
    dt = q.dtype
    ct = compute_dtype(dt)
    table = table.to(q.device)
    k, _, kpos, mask = _keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                      page_table, k_new, v_new, causal, page_shift)
    ent = _key_entries(cache_pos, page_len, page_table)  # [B, L]
    if k_new is not None:
        ent = torch.cat([ent, ent.new_full((B, Nq), M)], dim=1)
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt)
    kr = _rotate_keys(k, kpos, table, Hq, ct).to(dt)
    # same score path as paged_attention_reference: product in q's dtype, softmax in ct
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr).to(ct) * scale
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(torch.isfinite(lse), torch.exp(s - lse), 0.0)  # [B, Hq, Nq, Nk]
    mass = torch.zeros(B, Hq, Nq, M + 1, dtype=ct, device=q.device)
    mass.scatter_add_(3, ent[:, None, None, :].expand_as(p), p)
    return mass.float()
