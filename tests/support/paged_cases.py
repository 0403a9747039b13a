"""Inputs of ``paged_attention`` for the torch-path tests: a pool with partial pages, a
shuffled page table with a -1 entry, page shifts and new keys (:func:`make_case`), and one call
of the op (or its reference) on them (:func:`call`)."""

import torch

import lol_kernels as lk


def make_case(B=2, N=7, Hq=6, Hkv=2, D=64, S=16, P=9, M=5, with_new=True, shift=True,
              empty=True, jitter_sigma=0.5, dtype=torch.float64, pos_hi=60):
    tab = lk.rope_frequencies(D, Hq, jitter_sigma=jitter_sigma, seed=1)
    ck = torch.randn(P, S, Hkv, D, dtype=dtype)
    cv = torch.randn(P, S, Hkv, D, dtype=dtype)
    cpos = torch.randint(0, pos_hi, (P, S, 3))
    plen = torch.randint(1, S + 1, (P,))
    table = torch.stack([torch.randperm(P)[:M] for _ in range(B)]).to(torch.int32)  # shuffled
    if empty:
        table[0, 1] = -1
    q = torch.randn(B, N, Hq, D, dtype=dtype)
    q_pos = torch.randint(0, pos_hi, (B, N, 3))
    kn = torch.randn(B, N, Hkv, D, dtype=dtype) if with_new else None
    vn = torch.randn(B, N, Hkv, D, dtype=dtype) if with_new else None
    sh = torch.randint(-9, 9, (B, M, 3)) if shift else None
    return dict(q=q, q_pos=q_pos, cache_k=ck, cache_v=cv, cache_pos=cpos, page_len=plen,
                page_table=table, table=tab, k_new=kn, v_new=vn, page_shift=sh)


def call(c, fn=lk.paged_attention, **kw):
    return fn(c["q"], c["q_pos"], c["cache_k"], c["cache_v"], c["cache_pos"], c["page_len"],
              c["page_table"], c["table"], k_new=c["k_new"], v_new=c["v_new"],
              page_shift=c["page_shift"], **kw)
