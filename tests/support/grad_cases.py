"""Inputs of the gradient tests of the attention ops (torch-path backward): jittered tables,
dense and paged inputs on small awkward shapes, a loss through every output and lse, and the
checks the paged ops share: ``gradcheck``, gradients against the float64 reference,
``torch.compile`` tracing forward and backward, and torch.func refused."""

import pytest
import torch

import lol_kernels as lk
from lol_kernels.rope import RopeTable

D, S, A = 16, 4, 3
HEADS = [(4, 2), (4, 4), (4, 1)]  # (Hq, Hkv): GQA 2 and 4 groups, MHA
HEAD_IDS = [f"Hq{hq}-Hkv{hkv}" for hq, hkv in HEADS]


def jittered(Hq: int) -> RopeTable:
    """A table whose heads all differ (so a GQA group's heads rotate a key differently)."""
    t = lk.rope_frequencies(D, Hq, jitter_sigma=0.6, seed=5)
    assert not t.heads_share_freqs(2)
    return t


def dense_inputs(Hq, Hkv, dtype=torch.float64, B=2, N=5, Nk=7):
    g = torch.Generator().manual_seed(Hq * 10 + Hkv)
    q = torch.randn(B, N, Hq, D, dtype=dtype, generator=g)
    k = torch.randn(B, Nk, Hkv, D, dtype=dtype, generator=g)
    v = torch.randn(B, Nk, Hkv, D, dtype=dtype, generator=g)
    qp = torch.randint(0, 40, (B, N, A), generator=g)
    kp = torch.randint(0, 40, (B, Nk, A), generator=g)
    return q, k, v, qp, kp, jittered(Hq)


def paged_inputs(Hq, Hkv, dtype=torch.float64, B=2, N=5, P=5):
    """A pool of P pages: page 1 half filled, an empty entry, rows reading different pages
    (so the rows see different numbers of cached keys), and page shifts."""
    g = torch.Generator().manual_seed(Hq * 7 + Hkv)
    x = dict(q=torch.randn(B, N, Hq, D, dtype=dtype, generator=g),
             q_pos=torch.randint(20, 40, (B, N, A), generator=g),
             cache_k=torch.randn(P, S, Hkv, D, dtype=dtype, generator=g),
             cache_v=torch.randn(P, S, Hkv, D, dtype=dtype, generator=g),
             cache_pos=torch.randint(0, 20, (P, S, A), generator=g),
             page_len=torch.tensor([S, S // 2, S, S, 1], dtype=torch.int32),
             page_table=torch.tensor([[3, 1, -1], [0, 4, 2]], dtype=torch.int32)[:B],
             table=jittered(Hq),
             k_new=torch.randn(B, N, Hkv, D, dtype=dtype, generator=g),
             v_new=torch.randn(B, N, Hkv, D, dtype=dtype, generator=g),
             page_shift=torch.randint(-3, 4, (B, 3, A), generator=g))
    return x


def weighted_loss(out, lse, seed=0):
    # lse is fp32 for every dtype: its incoming gradient is rounded to fp32 (fp64 tol 1e-7)
    """A loss that reaches every output element and every lse (with random weights)."""
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(out.shape, dtype=torch.float64, generator=g)
    wl = torch.randn(lse.shape, dtype=torch.float64, generator=g)
    return (out.double() * wo).sum() + (torch.nan_to_num(lse.double(), neginf=0.0) * wl).sum()


def paged_step(q, kn, vn, x, op="paged_attention"):
    return getattr(lk, op)(q, **x, k_new=kn, v_new=vn, causal=True, backend="torch")


def check_compile_traces(step, q, k, v, *rest):
    """Gradients through ``step(q, k, v, *rest)`` compiled (aot_eager, fullgraph) equal the
    eager ones."""
    wo, wl = torch.randn(q.shape), torch.randn(q.shape[0], q.shape[2], q.shape[1])

    def loss(q, k, v):  # every row sees a key (causal), so lse is finite
        out, lse = step(q, k, v, *rest)
        return (out * wo).sum() + (lse * wl).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for fn in (loss, compiled):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(fn(*xs), xs)
        if fn is loss:
            want = grads
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_paged_gradcheck(op, x, causal):
    """``gradcheck`` (fast mode) of ``op``'s output through q, k_new and v_new of the paged
    inputs ``x``."""
    x = dict(x)
    q, kn, vn = (x.pop(n) for n in ("q", "k_new", "v_new"))

    def fn(q, kn, vn):
        return getattr(lk, op)(q, **x, k_new=kn, v_new=vn, causal=causal, backend="torch")[0]

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), kn.requires_grad_(),
                                         vn.requires_grad_()), fast_mode=True)


def check_paged_grads_match_reference(op, reference, x, causal, dtype, tol):
    """The gradients of q, k_new and v_new through ``op`` (in ``dtype``) against autograd
    through ``reference`` in float64, relative error below ``tol``."""
    names = ("q", "k_new", "v_new")
    got_in = {n: x[n].clone().requires_grad_() for n in names}
    out, lse = getattr(lk, op)(**{**x, **got_in}, causal=causal, backend="torch")
    got = torch.autograd.grad(weighted_loss(out, lse), list(got_in.values()))
    ref_x = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
             for n, t in x.items()}
    ref_in = {n: ref_x[n].requires_grad_() for n in names}
    ref_out, ref_lse = reference(**{**ref_x, **ref_in}, causal=causal)
    want = torch.autograd.grad(weighted_loss(ref_out, ref_lse), list(ref_in.values()))
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, name
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, f"d{name}: relative error {err:.2e}"


def check_torch_func_refused(op, fn, q, how):
    """``torch.func.grad`` or ``vjp`` (``how``) of ``fn`` at ``q`` is refused naming ``op``."""
    with pytest.raises(RuntimeError, match=f"lol::{op} does not support torch.func"):
        if how == "grad":
            torch.func.grad(fn)(q)
        else:
            torch.func.vjp(fn, q)
