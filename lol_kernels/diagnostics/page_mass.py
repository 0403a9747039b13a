"""Attention mass per page-table entry (reference path): what LoL's homogenization analysis reads.

:func:`paged_attention_page_mass` runs the same computation as
:func:`~lol_kernels.attention.reference.paged_attention_reference` (same gather, same RoPE at
read time, same masks, fp32 softmax; fp64 for fp64 inputs) but, instead of the weighted sum of
values, sums each query row's softmax probabilities over the keys of every page-table entry.
"""

from __future__ import annotations

import torch

from ..attention.paged_attention_op import validate_paged_inputs
from ..attention.reference import gather_index, keys_and_mask, masked_softmax, rotated_scores
from ..rope.reference import compute_dtype
from ..rope.table import RopeTable


def paged_attention_page_mass(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                              table: RopeTable, *, k_new=None, v_new=None, causal=False,
                              page_shift=None, scale=None) -> torch.Tensor:
    """Softmax mass each query head puts on each page-table entry.

    Arguments and their meaning are those of :func:`lol_kernels.paged_attention` (shapes:
    ``q [B, N, Hq, D]``, ``q_pos [B, N, A]``, ``cache_k/v [P, S, Hkv, D]``,
    ``cache_pos [P, S, A]``, ``page_len [P]``, ``page_table [B, M]``, ``k_new/v_new
    [B, N, Hkv, D]``, ``page_shift [B, M, A]``); the inputs are validated the same way.
    ``cache_v`` / ``v_new`` are checked but do not enter the mass.

    Returns:
        ``mass [B, Hq, N, M + 1]`` float32. ``mass[b, h, i, m]`` is the total attention
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
    B, N, Hq, _ = q.shape
    M = page_table.shape[1]
    k, _, kpos, mask = keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                     page_table, k_new, v_new, causal, page_shift)
    _, ent, _, _ = gather_index(cache_pos, page_len, page_table, None)  # key -> entry, [B, L]
    if k_new is not None:  # the block's own keys count in column M
        ent = torch.cat([ent, ent.new_full((B, N), M)], dim=1)
    # the score path of paged_attention_reference: product in q's dtype, softmax in fp32/fp64
    s = rotated_scores(q, q_pos, k, kpos, table, scale)
    p, _ = masked_softmax(s, None if mask is None else mask.unsqueeze(1))  # [B, Hq, N, Nk]
    mass = torch.zeros(B, Hq, N, M + 1, dtype=compute_dtype(q.dtype), device=q.device)
    mass.scatter_add_(3, ent[:, None, None, :].expand_as(p), p)
    return mass.float()
