"""The ops refuse int64 host positions that their int32 arithmetic would wrap, naming the
argument, even with ``validate=False`` (reading a CPU tensor costs no sync); values just
inside the range pass."""
import pytest
import torch

import lol_kernels as lk
from lol_kernels._checks import INT32_MAX, POS_LIMIT

BAD = [2**31, -(2**31) - 1, 2**32 + 5, 2**63 - 1]
D, H, A = 8, 2, 3


def table():
    return lk.rope_frequencies(D, H, axes=(4, 2, 2))


def pos_with(t, n=4):
    p = torch.zeros(1, n, A, dtype=torch.int64)
    p[..., 0] = t
    return p


def paged_args(q_pos=0, cache_pos=0, page_shift=None):
    P, S = 2, 4
    q = torch.randn(1, 4, H, D)
    kv = torch.randn(P, S, 1, D)
    cpos = torch.zeros(P, S, A, dtype=torch.int64)
    cpos[..., 0] = cache_pos
    shift = None if page_shift is None else torch.full((1, 2, A), page_shift, dtype=torch.int64)
    return (q, pos_with(q_pos), kv, kv.clone(), cpos, torch.full((P,), S, dtype=torch.int32),
            torch.tensor([[0, 1]], dtype=torch.int32), table()), dict(page_shift=shift)


@pytest.mark.parametrize("bad", BAD)
def test_apply_rope_refuses(bad):
    with pytest.raises(ValueError, match="pos"):
        lk.apply_rope(torch.randn(1, 4, H, D), pos_with(bad), table(), validate=False)


@pytest.mark.parametrize("good", [INT32_MAX, -INT32_MAX])
def test_apply_rope_accepts_the_edges(good):
    y = lk.apply_rope(torch.randn(1, 4, H, D), pos_with(good), table(), validate=False)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("which", ["q_pos", "k_pos"])
@pytest.mark.parametrize("bad", BAD + [POS_LIMIT + 1])
def test_rope_attention_refuses(bad, which):
    q = torch.randn(1, 4, H, D)
    pos = {"q_pos": pos_with(0), "k_pos": pos_with(0)} | {which: pos_with(bad)}
    with pytest.raises(ValueError, match=which):
        lk.rope_attention(q, q, q, pos["q_pos"], pos["k_pos"], table(), validate=False)


def test_rope_attention_accepts_the_edges():
    q = torch.randn(1, 4, H, D)
    out = lk.rope_attention(q, q, q, pos_with(POS_LIMIT), pos_with(-POS_LIMIT), table(),
                            validate=False)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


@pytest.mark.parametrize("which", ["q_pos", "cache_pos", "page_shift"])
@pytest.mark.parametrize("bad", BAD + [POS_LIMIT + 1])
def test_paged_attention_refuses(bad, which):
    args, kw = paged_args(**{which: bad})
    with pytest.raises(ValueError, match=which):
        lk.paged_attention(*args, **kw, validate=False)


def test_paged_attention_accepts_the_edges():
    args, kw = paged_args(q_pos=POS_LIMIT, cache_pos=-POS_LIMIT)
    out, lse = lk.paged_attention(*args, **kw, validate=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", BAD + [POS_LIMIT + 1])
def test_moc_attention_refuses_chunk_shift(bad):
    args, kw = paged_args()
    chunk_pages = torch.tensor([[[1]]], dtype=torch.int32)
    routed = torch.zeros(1, 1, H, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="chunk_shift"):
        lk.moc_attention(*args, chunk_pages=chunk_pages, routed=routed,
                         chunk_shift=torch.full((1, 1, A), bad, dtype=torch.int64),
                         validate=False)
    with pytest.raises(ValueError, match="q_pos"):
        lk.moc_attention(*paged_args(q_pos=bad)[0], chunk_pages=chunk_pages, routed=routed,
                         validate=False)
