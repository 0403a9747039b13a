"""Arguments of the ``lol::`` custom ops on permuted (dense, non-contiguous) inputs, and the
check that each op's fake implementation promises the layouts the real one returns
(:func:`check_fake_strides`): compiled code never miscompiles a permuted input."""

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lol_kernels as lk

D, A, S = 16, 3, 16


def permuted(*shape):
    """A dense, non-contiguous ``[B, N, H, D]`` tensor (head-major in memory)."""
    B, N, H, Dd = shape
    return torch.randn(B, H, N, Dd).transpose(1, 2)


def op_args():
    B, N, H, Hkv, P = 2, 20, 4, 2, 8
    table = lk.rope_frequencies(D, H, jitter_sigma=0.5)
    q, k, v = permuted(B, N, H, D), permuted(B, N, Hkv, D), permuted(B, N, Hkv, D)
    pos = torch.randint(0, 30, (B, N, A), dtype=torch.int32)
    pool = dict(cache_k=torch.randn(P, S, Hkv, D), cache_v=torch.randn(P, S, Hkv, D),
                cache_pos=torch.randint(0, 30, (P, S, A), dtype=torch.int32),
                page_len=torch.full((P,), S, dtype=torch.int32),
                page_table=torch.tensor([[0, 1, -1], [2, 3, -1]], dtype=torch.int32))
    axes = list(table.axes)
    T = math.ceil(N / 16)
    paged = (q, pos, *pool.values(), table.freqs, table.pair_axis, k, v, False, None, 0.25,
             "torch", axes)
    moc = (q, pos, *pool.values(), table.freqs, table.pair_axis,
           torch.tensor([[[4], [5]], [[6], [7]]], dtype=torch.int32),
           torch.zeros(B, T, H, 1, dtype=torch.int32), k, v, False, None, None, 0.25, 16,
           "torch", axes)
    return {
        "paged_attention": paged,
        "moc_attention": moc,
        "rope_attention": (q, k, v, pos, pos, table.freqs, table.pair_axis, True, 0.25, "torch",
                           axes),
        "apply_rope": (q, pos, table.freqs, table.pair_axis, "torch", axes),
    }


def check_fake_strides(op):
    """The real and the fake call of ``op`` on a permuted ``q``: same shapes and dtypes, and
    the same strides, contiguous ones (a fake of ``empty_like(q)`` would keep q's)."""
    args = op_args()[op]
    fn = getattr(torch.ops.lol, op).default
    real = fn(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = fn(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = (x if isinstance(x, tuple) else (x,) for x in (real, fake))
    for r, f in zip(real, fake, strict=True):
        assert r.shape == f.shape and r.dtype == f.dtype
        assert r.stride() == f.stride() and r.is_contiguous()
