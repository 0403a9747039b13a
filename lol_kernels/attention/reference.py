"""The plain reference of ``paged_attention``: formulas only, no state, float64-capable.

Reads the paged pool the same way as every backend (:func:`gather_keys`): one gather of the
valid slots of the page-table entries (in table order, ``page_shift`` added to the stored
positions), then RoPE on the gathered un-rotated keys with the frequencies of the query head
that reads them (:func:`rotate_keys`), then the rotated scores (:func:`rotated_scores`) and a
masked softmax (:func:`masked_softmax`). :func:`paged_attention_reference` is the formula in the
input dtype with an fp32 softmax; run on float64 inputs it is the ground truth of every kernel
test, run on fp16 it is the "same-dtype PyTorch reference" of the error rule (docs/design.md
§5). The fast CPU path is :mod:`.attention_cpu`.
"""

from __future__ import annotations

import torch

from ..rope.reference import compute_dtype, rope_cos_sin, rotate_pairs
from ..rope.table import RopeTable


def gather_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift):
    """Gather the valid slots of every page-table entry, in table order.

    Args:
        cache_k, cache_v: ``[P, S, Hkv, D]`` pools. cache_pos: ``[P, S, A]`` int.
        page_len: ``[P]`` filled slots per page. page_table: ``[B, M]`` page ids, -1 = empty.
        page_shift: ``[B, M, A]`` int or ``None``, added to the positions of that entry.

    Returns:
        ``k, v [B, L, Hkv, D]``, ``pos [B, L, A]`` int64 and ``valid [B, L]`` bool (``None``
        when every batch row has the same number ``L`` of valid slots, so no padding exists).
    """
    P, S, Hkv, D = cache_k.shape
    idx, _, pos, valid = gather_index(cache_pos, page_len, page_table, page_shift)
    k = cache_k.reshape(P * S, Hkv, D)[idx]
    v = cache_v.reshape(P * S, Hkv, D)[idx]
    return k, v, pos, valid


def page_fill(page_len: torch.Tensor) -> torch.Tensor:
    """``page_len`` as int64, looked up at clamped page ids (``-1`` -> 0); an empty pool gets
    one empty page so that its all ``-1`` tables index something."""
    return page_len.long() if page_len.numel() else page_len.new_zeros(1, dtype=torch.long)


def gather_index(cache_pos, page_len, page_table, page_shift):
    """Where the keys of :func:`gather_keys` come from, in table order.

    Returns the flat slot index ``idx [B, L]`` into ``[P * S]`` of the valid slots, the
    page-table entry ``entry [B, L]`` (int64, in ``[0, M)``) each slot was read through, their
    positions ``pos [B, L, A]`` (int64, ``page_shift`` of that entry added) and the padding mask
    ``valid [B, L]`` (``None`` when no row is padded; padding points at slot 0 of entry
    ``order // S`` and is masked out).
    """
    P, S, A = cache_pos.shape
    B, M = page_table.shape
    pt = page_table.long()
    ent_ok = pt >= 0
    ids = pt.clamp(min=0)
    slots = torch.arange(S, device=pt.device)
    fill = page_fill(page_len)[ids]  # [B, M]
    ok = (ent_ok.unsqueeze(-1) & (slots < fill.unsqueeze(-1))).reshape(B, M * S)
    flat = (ids.unsqueeze(-1) * S + slots).reshape(B, M * S)
    counts = ok.sum(dim=1)
    L = int(counts.max().item()) if B else 0
    if bool((counts == L).all()):
        idx = flat[ok].view(B, L)
        entry = torch.arange(M, device=pt.device).repeat_interleave(S).expand(B, -1)[ok].view(B, L)
        valid = None
    else:  # pad rows with fewer valid slots; padding points at slot 0 and is masked out
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :L]
        valid = torch.gather(ok, 1, order)
        idx = torch.where(valid, torch.gather(flat, 1, order), 0)
        entry = order // S
    pos = cache_pos.reshape(P * S, A)[idx].long()
    if page_shift is not None:
        pos = pos + torch.gather(page_shift.long(), 1, entry.unsqueeze(-1).expand(-1, -1, A))
    return idx, entry, pos, valid


def keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, k_new, v_new,
                  causal, page_shift):
    """All keys a block sees (cache then new) with positions and a ``[B, N, Nk]`` mask."""
    k, v, kpos, valid = gather_keys(cache_k, cache_v, cache_pos, page_len, page_table, page_shift)
    B, N = q.shape[:2]
    L = k.shape[1]
    mask = None
    if valid is not None:
        mask = valid.unsqueeze(1).expand(B, N, L)
    if k_new is not None:
        k = torch.cat([k, k_new], dim=1)
        v = torch.cat([v, v_new], dim=1)
        kpos = torch.cat([kpos, q_pos.long()], dim=1)
        if causal or mask is not None:
            new = torch.ones(N, N, dtype=torch.bool, device=q.device)
            if causal:
                new = new.tril()
            old = mask if mask is not None else torch.ones(B, N, L, dtype=torch.bool,
                                                           device=q.device)
            mask = torch.cat([old, new.expand(B, N, N)], dim=2)
    return k, v, kpos, mask


def rotate_keys(k, kpos, table: RopeTable, Hq: int, dtype):
    """Rotate ``k [B, L, Hkv, D]`` per reading query head; returns ``[B, L, Hq, D]``."""
    Hkv = k.shape[2]
    g = Hq // Hkv
    if table.heads_share_freqs(g):  # no jitter inside a GQA group: rotate once per KV head
        sub = RopeTable(table.freqs[::g], table.pair_axis, table.axes)
        cos, sin = rope_cos_sin(kpos, sub, dtype)
        return rotate_pairs(k.to(dtype), cos, sin).repeat_interleave(g, dim=2)
    cos, sin = rope_cos_sin(kpos, table, dtype)
    return rotate_pairs(k.to(dtype).repeat_interleave(g, dim=2), cos, sin)


def rotated_scores(q, q_pos, k, kpos, table: RopeTable, scale: float) -> torch.Tensor:
    """Scaled scores of RoPE'd queries and keys, ``[B, Hq, N, Nk]`` in the compute dtype.

    ``q [B, N, Hq, D]`` at ``q_pos [B, N, A]``; ``k [B, Nk, Hkv, D]`` at ``kpos [B, Nk, A]``
    (GQA: key head ``h // (Hq // Hkv)``). RoPE in fp32 (fp64 for fp64) then back to q's dtype,
    as a model would; the product in q's dtype, scaled in fp32 (fp64).
    """
    dt, ct = q.dtype, compute_dtype(q.dtype)
    table = table.to(q.device)
    cos, sin = rope_cos_sin(q_pos, table, ct)
    qr = rotate_pairs(q.to(ct), cos, sin).to(dt)
    kr = rotate_keys(k, kpos, table, q.shape[2], ct).to(dt)
    return torch.einsum("bqhd,bkhd->bhqk", qr, kr).to(ct) * scale


def masked_softmax(s: torch.Tensor, mask: torch.Tensor | None):
    """Softmax over the last dim of ``s`` where ``mask`` (broadcastable bool, ``None`` = all
    visible) is true. Returns ``p`` like ``s`` and ``lse = log sum exp`` of the visible scores;
    a row with no visible score gets ``p = 0`` and ``lse = -inf``."""
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = torch.isfinite(lse).unsqueeze(-1)
    return torch.where(seen, torch.exp(s - lse.unsqueeze(-1)), 0.0), lse


def paged_attention_reference(q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table,
                              table: RopeTable, *, k_new=None, v_new=None, causal=False,
                              page_shift=None, scale=None):
    """Plain-formula paged attention; shapes as :func:`lol_kernels.paged_attention`.

    Computes in ``q.dtype`` (RoPE in fp32 or fp64, then cast back, as a model would), softmax in
    fp32 (fp64 for fp64 inputs). Returns ``out [B, N, Hq, D]`` in ``q.dtype`` and
    ``lse [B, Hq, N]`` in fp32 (fp64 for fp64 inputs); rows that see no key give 0 and -inf.
    """
    Hq, D = q.shape[2:]
    dt = q.dtype
    scale = D**-0.5 if scale is None else scale
    k, v, kpos, mask = keys_and_mask(q, q_pos, cache_k, cache_v, cache_pos, page_len,
                                     page_table, k_new, v_new, causal, page_shift)
    s = rotated_scores(q, q_pos, k, kpos, table, scale)
    p, lse = masked_softmax(s, None if mask is None else mask.unsqueeze(1))
    vv = v.repeat_interleave(Hq // k.shape[2], dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), vv.to(dt))
    return out.to(dt), lse
