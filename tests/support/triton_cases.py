"""Inputs and checks of the Triton paged kernel: a random case with partial pages, a shuffled
page table with a -1 entry and per-entry shifts (:func:`make_case`), its tensors cast for the
device (:func:`cast_case`), one call in the op's signature (:func:`call_paged`), and the kernel
on NaN-poisoned outputs against the float64 reference by the parity rule
(:func:`run_and_check`)."""

import torch

import lol_kernels as lk
from lol_kernels.attention import attention_triton as tk
from lol_kernels.attention import paged_attention_reference
from tests.support import assert_close_rule

DEV = "cuda" if torch.cuda.is_available() else "cpu"
A = 3


def make_case(*, B=2, N=45, Hq=4, Hkv=2, D=64, S=16, P=9, M=5, dtype=torch.float16,
              sigma=0.8, new=True, shift=True, empty=True, q_base=0, k_base=0):
    """Random pool with partial pages, a shuffled page table with a -1 entry, per-entry shifts.

    Positions: time axis in ``[base, base + 64)``, height/width in ``[0, 16)``."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    table = lk.rope_frequencies(D, Hq, jitter_sigma=sigma, seed=int(torch.randint(0, 1000, ())))

    def pos(*shape, base):
        p = torch.randint(0, 16, (*shape, A), generator=g)
        p[..., 0] = torch.randint(0, 64, shape, generator=g) + base
        return p

    page_len = torch.randint(1, S + 1, (P,), generator=g)
    page_len[0] = S
    page_table = torch.stack([torch.randperm(P, generator=g)[:M] for _ in range(B)]).int()
    if empty:
        page_table[0, 1] = -1
    c = dict(
        q=torch.randn(B, N, Hq, D, generator=g), q_pos=pos(B, N, base=q_base),
        cache_k=torch.randn(P, S, Hkv, D, generator=g),
        cache_v=torch.randn(P, S, Hkv, D, generator=g),
        cache_pos=pos(P, S, base=k_base), page_len=page_len, page_table=page_table, table=table,
        k_new=torch.randn(B, N, Hkv, D, generator=g) if new else None,
        v_new=torch.randn(B, N, Hkv, D, generator=g) if new else None,
        page_shift=torch.randint(-40, 40, (B, M, A), generator=g) if shift else None)
    return c, dtype


def cast_case(c, dtype, device=DEV):
    out = {}
    for k, v in c.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def call_paged(fn, c, **kw):
    return fn(c["q"], c["q_pos"], c["cache_k"], c["cache_v"], c["cache_pos"], c["page_len"],
              c["page_table"], c["table"], k_new=c["k_new"], v_new=c["v_new"],
              page_shift=c["page_shift"], **kw)


def run_and_check(c, dtype, *, causal=False, config=None):
    """Kernel (NaN-poisoned outputs) vs float64 reference by the docs/design.md §5 rule."""
    ref64, lse64 = call_paged(paged_attention_reference, cast_case(c, torch.float64, "cpu"),
                              causal=causal)
    ref_lo, lse_lo = call_paged(paged_attention_reference, cast_case(c, dtype, "cpu"),
                                causal=causal)
    cd = cast_case(c, dtype)
    B, N, Hq, D = cd["q"].shape
    out = torch.full((B, N, Hq, D), float("nan"), dtype=dtype, device=DEV)
    lse = torch.full((B, Hq, N), float("nan"), dtype=torch.float32, device=DEV)
    o, l = call_paged(tk.paged_attention_triton, cd, causal=causal, out=out, lse=lse,
                      config=config)
    assert o is out and l is lse
    assert_close_rule(o.cpu(), ref_lo, ref64, "out")
    assert_close_rule(l.cpu(), lse_lo, lse64, "lse")
    return o.cpu(), l.cpu()
