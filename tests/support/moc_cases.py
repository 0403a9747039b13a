"""Inputs of ``moc_attention``: a random pool, mandatory pages, chunks and a routing with -1
holes (:func:`make_case`), and the op's positional and keyword arguments from them
(:func:`split`)."""

import math

import torch

import lol_kernels as lk


def make_case(*, B=2, N=37, Hq=4, Hkv=2, D=16, S=16, M=3, C=5, Pc=2, k=2, tile=16,
              dtype=torch.float32, causal=False, new=True, shifts=True, empty=True, sigma=0.5):
    """Random pool, mandatory pages, chunks and a random routing with -1 holes.

    Pages are drawn without replacement so mandatory and chunk pages are disjoint; partial
    pages (page_len < S), empty entries and -1 routing entries appear when ``empty``."""
    A = 3
    P = B * (M + C * Pc) + 3
    tab = lk.rope_frequencies(D, Hq, axes=(D - 8, 4, 4) if D > 8 else None,
                              jitter_sigma=sigma, seed=int(torch.randint(0, 100, ())))
    x = dict(
        q=torch.randn(B, N, Hq, D), q_pos=torch.randint(0, 60, (B, N, A), dtype=torch.int32),
        cache_k=torch.randn(P, S, Hkv, D), cache_v=torch.randn(P, S, Hkv, D),
        cache_pos=torch.randint(0, 60, (P, S, A), dtype=torch.int32),
        page_len=torch.randint(1 if not empty else 0, S + 1, (P,), dtype=torch.int32))
    x["page_len"][0] = S
    perm = torch.randperm(P)
    pt = torch.stack([perm[b * (M + C * Pc):b * (M + C * Pc) + M] for b in range(B)]).int()
    cp = torch.stack([perm[b * (M + C * Pc) + M:(b + 1) * (M + C * Pc)] for b in range(B)])
    cp = cp.view(B, C, Pc).int()
    T = math.ceil(N / tile)
    routed = torch.stack([torch.randperm(C)[:k] for _ in range(B * T * Hq)]).view(B, T, Hq, k)
    routed = routed.int()
    if empty:
        pt[0, -1] = -1
        cp[-1, 0, -1] = -1
        routed[0, 0, 0, -1] = -1
        routed[-1, -1, -1, :] = -1
    x.update(page_table=pt, chunk_pages=cp, routed=routed)
    if new:
        x.update(k_new=torch.randn(B, N, Hkv, D), v_new=torch.randn(B, N, Hkv, D))
    if shifts:
        x.update(page_shift=torch.randint(-5, 6, (B, M, A), dtype=torch.int32),
                 chunk_shift=torch.randint(-5, 6, (B, C, A), dtype=torch.int32))
    x = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in x.items()}
    return x, dict(table=tab, causal=causal and new, tile_size=tile)


def split(x, opts, dtype=None, device="cpu"):
    """Positional and keyword arguments of moc_attention, floats cast to ``dtype``."""
    f = {n: (t.to(device, dtype or t.dtype) if t.is_floating_point() else t.to(device))
         for n, t in x.items()}
    pos = [f["q"], f["q_pos"], f["cache_k"], f["cache_v"], f["cache_pos"], f["page_len"],
           f["page_table"], opts["table"]]
    kw = {n: f.get(n) for n in ("chunk_pages", "routed", "k_new", "v_new", "page_shift",
                                "chunk_shift")}
    kw.update(causal=opts["causal"], tile_size=opts["tile_size"])
    return pos, kw
