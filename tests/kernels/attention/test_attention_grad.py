"""Gradients of rope_attention and paged_attention (torch-path backward, every backend).

* ``gradcheck`` in float64 on small awkward shapes: jitter, GQA, causal and not, page shifts,
  a partly filled page and an empty table entry;
* gradients (through ``out`` and ``lse``) against autograd through the float64 reference;
* the cached pools are constants; torch.compile (aot_eager, fullgraph) traces forward and
  backward; torch.func transforms are refused with a clear message;
* rope_attention's fused CPU backward (fp16/bf16/fp32): the FA 2x rule against autograd
  through torch RoPE + SDPA in the same dtype (GQA 12/4 and 12/12, jitter or not, causal or
  not, odd N != Nk), its lse gradient, agreement with the einsum recompute, no ``[N, Nk]``
  allocation, zero gradients for rows that see no key.
"""

import pytest
import torch
import torch.nn.functional as F

import lol_kernels as lk
from lol_kernels.attention import backward as backward_module
from lol_kernels.attention import paged_attention_reference
from lol_kernels.attention.backward import (
    attention_backward,
    causal_mask,
    rope_attention_backward_torch,
)
from lol_kernels.attention.reference import masked_softmax, rotated_scores
from lol_kernels.rope import RopeTable
from lol_kernels.rope.reference import rope_cos_sin, rotate_pairs
from tests.support import assert_close_rule
from tests.support.grad_cases import (
    HEAD_IDS,
    HEADS,
    A,
    D,
    check_compile_traces,
    check_paged_gradcheck,
    check_paged_grads_match_reference,
    check_torch_func_refused,
    dense_inputs,
    paged_inputs,
    paged_step,
    weighted_loss,
)


def dense_reference(q, k, v, qp, kp, tab, causal):
    """rope_attention from the reference's formulas (rotated scores, masked softmax), in the
    inputs' dtype: float64 inputs give the ground truth."""
    Nk, Hkv = k.shape[1], k.shape[2]
    s = rotated_scores(q, qp, k, kp, tab, D**-0.5)
    mask = torch.ones(q.shape[1], Nk, dtype=torch.bool).tril() if causal else None
    p, lse = masked_softmax(s, mask)
    vv = v.repeat_interleave(q.shape[2] // Hkv, dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


# --------------------------------------------------------------------------- rope_attention
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEAD_IDS)
def test_dense_gradcheck(hq, hkv, causal):
    q, k, v, qp, kp, tab = dense_inputs(hq, hkv)

    def fn(q, k, v):
        return lk.rope_attention(q, k, v, qp, kp, tab, causal=causal, backend="torch")

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(),
                                         v.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_gradcheck_slow_mode_tiny(causal):
    """The full (slow-mode) Jacobian on a tiny GQA shape; the tests above use fast mode."""
    q, k, v, qp, kp, tab = dense_inputs(2, 1, B=1, N=3, Nk=4)

    def fn(q, k, v):
        return lk.rope_attention(q, k, v, qp, kp, tab, causal=causal, backend="torch")

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(),
                                         v.requires_grad_()))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-4)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEAD_IDS)
def test_dense_grads_match_reference(hq, hkv, causal, dtype, tol):
    q, k, v, qp, kp, tab = dense_inputs(hq, hkv, dtype)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = lk.rope_attention(*xs, qp, kp, tab, causal=causal, backend="torch",
                                 return_lse=True)
    got = torch.autograd.grad(weighted_loss(out, lse), xs)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(weighted_loss(*dense_reference(*refs, qp, kp, tab, causal)), refs)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype, name
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < tol, f"d{name}: relative error {err:.2e}"


def test_gqa_dk_unrotates_each_query_head_with_its_own_frequencies():
    """dk of a GQA group is the sum over its query heads of dk un-rotated per head: the same
    grads as MHA with each KV head repeated for its query heads, summed back."""
    q, k, v, qp, kp, tab = dense_inputs(4, 2)
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = lk.rope_attention(q, kg, vg, qp, kp, tab, backend="torch")
    dk, dv = torch.autograd.grad(weighted_loss(out, out.new_zeros(1)), (kg, vg))
    km = k.repeat_interleave(2, dim=2).requires_grad_()
    vm = v.repeat_interleave(2, dim=2).requires_grad_()
    out_m = lk.rope_attention(q, km, vm, qp, kp, tab, backend="torch")
    dkm, dvm = torch.autograd.grad(weighted_loss(out_m, out_m.new_zeros(1)), (km, vm))
    torch.testing.assert_close(dk, dkm.unflatten(2, (2, 2)).sum(3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv, dvm.unflatten(2, (2, 2)).sum(3), rtol=1e-10, atol=1e-12)
    # the per-head un-rotation matters: un-rotating with the group's first head differs
    q2 = lk.rope_frequencies(D, 4, jitter_sigma=0.0)
    out_s = lk.rope_attention(q, kg, vg, qp, kp, q2, backend="torch")
    dks = torch.autograd.grad(weighted_loss(out_s, out_s.new_zeros(1)), kg)[0]
    assert (dks - dk).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_dense_triton_backend_uses_the_torch_backward(dtype):
    """Triton forward (fp32: the kernel, under the interpreter on a CPU; fp64 runs the torch
    path, docs/design.md §3), torch backward: the same recompute for every backend."""
    q, k, v, qp, kp, tab = dense_inputs(4, 2, dtype, B=1, N=16, Nk=16)
    grads = []
    for backend in ("torch", "triton", "auto"):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = lk.rope_attention(*xs, qp, kp, tab, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), xs))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n,nk", [(0, 5), (5, 0), (0, 0)], ids=["N0", "Nk0", "both0"])
def test_dense_empty_dimensions_give_zero_gradients(n, nk):
    q, k, v, qp, kp, tab = dense_inputs(4, 2, B=1, N=n, Nk=nk)
    xs = [t.requires_grad_() for t in (q, k, v)]
    out, lse = lk.rope_attention(*xs, qp, kp, tab, causal=True, backend="torch",
                                 return_lse=True)
    grads = torch.autograd.grad(weighted_loss(out, lse), xs)
    for x, g in zip(xs, grads):
        assert g.shape == x.shape and not bool(g.abs().sum())


def test_positions_and_table_get_no_gradient():
    q, k, v, qp, kp, tab = dense_inputs(4, 2)
    freqs = tab.freqs.clone().requires_grad_()
    t = RopeTable.from_tensors(freqs, tab.pair_axis, tab.axes)
    q.requires_grad_()
    lk.rope_attention(q, k, v, qp, kp, t, backend="torch").sum().backward()
    assert q.grad is not None and freqs.grad is None


# -------------------------------------------------------------------------- paged_attention
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEAD_IDS)
def test_paged_gradcheck(hq, hkv, causal):
    check_paged_gradcheck("paged_attention", paged_inputs(hq, hkv), causal)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-4)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("shift", [True, False], ids=["shift", "noshift"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEAD_IDS)
def test_paged_grads_match_reference(hq, hkv, causal, shift, dtype, tol):
    x = paged_inputs(hq, hkv, dtype)
    if not shift:
        x["page_shift"] = None
    check_paged_grads_match_reference("paged_attention", paged_attention_reference, x, causal,
                                      dtype, tol)


def test_paged_without_new_keys_grads_q_only():
    x = paged_inputs(4, 2)
    del x["k_new"], x["v_new"]
    q = x.pop("q").requires_grad_()
    ref_q = q.detach().clone().requires_grad_()
    out, lse = lk.paged_attention(q, **x, backend="torch")
    got = torch.autograd.grad(weighted_loss(out, lse), q)[0]
    want = torch.autograd.grad(weighted_loss(*paged_attention_reference(ref_q, **x)), ref_q)[0]
    assert (got - want).abs().max() / want.abs().max() < 1e-7


def test_paged_pools_are_constants():
    """The cached pools get no gradient even when they require one (documented)."""
    x = paged_inputs(4, 2)
    x["cache_k"].requires_grad_()
    x["cache_v"].requires_grad_()
    x["q"].requires_grad_()
    out, _ = lk.paged_attention(**x, backend="torch")
    out.sum().backward()
    assert x["q"].grad is not None
    assert x["cache_k"].grad is None and x["cache_v"].grad is None
    out, _ = lk.paged_attention(**x, backend="torch")
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out.sum(), x["cache_k"])
    out, _ = lk.paged_attention(**x, backend="torch")
    assert torch.autograd.grad(out.sum(), x["cache_k"], allow_unused=True) == (None,)


# ------------------------------------------------------------------ torch.compile, torch.func
def dense_step(q, k, v, qp, kp, tab):
    return lk.rope_attention(q, k, v, qp, kp, tab, causal=True, backend="torch",
                             return_lse=True)


@pytest.mark.parametrize("op", ["rope_attention", "paged_attention"])
def test_compile_traces_forward_and_backward(op):
    torch._dynamo.reset()
    if op == "rope_attention":
        q, k, v, qp, kp, tab = dense_inputs(4, 2, torch.float32)
        step, rest = dense_step, (qp, kp, tab)
    else:
        x = paged_inputs(4, 2, torch.float32)
        q, k, v = (x.pop(n) for n in ("q", "k_new", "v_new"))
        step, rest = paged_step, (x, op)
    check_compile_traces(step, q, k, v, *rest)


@pytest.mark.parametrize("how", ["grad", "vjp"])
@pytest.mark.parametrize("op", ["rope_attention", "paged_attention"])
def test_torch_func_is_refused_clearly(op, how):
    if op == "rope_attention":
        q, k, v, qp, kp, tab = dense_inputs(4, 2)
        fn = lambda q: lk.rope_attention(q, k, v, qp, kp, tab, backend="torch").sum()  # noqa: E731
    else:
        x = paged_inputs(4, 2)
        q = x.pop("q")
        fn = lambda q: getattr(lk, op)(q, **x, backend="torch")[0].sum()  # noqa: E731
    check_torch_func_refused(op, fn, q, how)


# ------------------------------------------------- rope_attention: the fused CPU backward
LOW = [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]
WIDE_HEADS = [(12, 4), (12, 12)]  # GQA 3 and MHA, Wan's 12 query heads
LENGTHS = [(37, 37), (37, 53), (53, 37)]  # odd; N < Nk and N > Nk (causal: top-left)


def wide_inputs(Hq, Hkv, dtype, N, Nk, jitter=True, B=2, seed=0):
    g = torch.Generator().manual_seed(seed + Hq * 100 + Hkv * 10 + N + Nk)
    q, k, v = (torch.randn(B, n, h, D, generator=g).to(dtype)
               for n, h in ((N, Hq), (Nk, Hkv), (Nk, Hkv)))
    qp = torch.randint(0, 40, (B, N, A), generator=g)
    kp = torch.randint(0, 40, (B, Nk, A), generator=g)
    return q, k, v, qp, kp, lk.rope_frequencies(D, Hq, jitter_sigma=0.6 if jitter else 0.0,
                                                seed=3)


def rotate_sdpa(q, k, v, qp, kp, tab, causal):
    """What a model does without this project: RoPE in fp32 with autograd (each query head's
    own frequencies, keys repeated per query head), back to q's dtype, then SDPA."""
    g = q.shape[2] // k.shape[2]
    cq, sq = rope_cos_sin(qp, tab, torch.float32)
    ck, sk = rope_cos_sin(kp, tab, torch.float32)
    qr = rotate_pairs(q.float(), cq, sq).to(q.dtype).transpose(1, 2)
    kr = rotate_pairs(k.float().repeat_interleave(g, dim=2), ck, sk).to(k.dtype).transpose(1, 2)
    vv = v.repeat_interleave(g, dim=2).transpose(1, 2)
    return F.scaled_dot_product_attention(qr, kr, vv, is_causal=causal).transpose(1, 2)


def plain_low(q, k, v, qp, kp, tab, causal):
    """Plain formulas in q's dtype with an fp32 softmax, returning ``out`` and ``lse``: the
    low-precision reference when the loss also reaches ``lse``."""
    s = rotated_scores(q, qp, k, kp, tab, D**-0.5)
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril() if causal else None
    p, lse = masked_softmax(s, mask)
    vv = v.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), vv), lse


def grads_of(fn, inputs, rest, dtype, wo, wl=None):
    xs = [t.to(dtype).requires_grad_() for t in inputs]
    res = fn(*xs, *rest)
    if wl is None:
        out = res[0] if isinstance(res, tuple) else res
        return torch.autograd.grad(out, xs, wo.to(out.dtype))
    out, lse = res
    return torch.autograd.grad((out.double() * wo).sum() + (lse.double() * wl).sum(), xs)


@pytest.mark.parametrize("n,nk", LENGTHS, ids=[f"N{n}-Nk{nk}" for n, nk in LENGTHS])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("jitter", [True, False], ids=["jitter", "plain"])
@pytest.mark.parametrize("hq,hkv", WIDE_HEADS, ids=[f"Hq{a}-Hkv{b}" for a, b in WIDE_HEADS])
@pytest.mark.parametrize("dtype,dname", LOW, ids=[n for _, n in LOW])
def test_low_precision_grads_follow_the_fa_rule(dtype, dname, hq, hkv, jitter, causal, n, nk):
    """fp16/bf16 gradients (fused CPU backward) against float64 autograd of the float64
    reference: error <= 2x the error of autograd through torch RoPE + SDPA in the same dtype,
    + 1e-5 (docs/design.md §5)."""
    q, k, v, qp, kp, tab = wide_inputs(hq, hkv, torch.float32, n, nk, jitter)
    wo = torch.randn(q.shape, dtype=torch.float64)
    want = grads_of(lambda *a: dense_reference(*a)[0], (q, k, v), (qp, kp, tab, causal),
                    torch.float64, wo)
    base = grads_of(rotate_sdpa, (q, k, v), (qp, kp, tab, causal), dtype, wo)
    got = grads_of(lambda *a: lk.rope_attention(*a, causal=causal, backend="torch"),
                   (q, k, v), (qp, kp, tab), dtype, wo)
    for name, a, b, w in zip("qkv", got, base, want):
        assert a.dtype == dtype and a.is_contiguous(), name
        assert_close_rule(a, b, w, what=f"d{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype,dname", LOW, ids=[n for _, n in LOW])
def test_low_precision_lse_gradient(dtype, dname, causal):
    """The lse gradient in the fused call (zero-column trick) in fp16/bf16: FA rule against
    plain formulas in the same dtype."""
    q, k, v, qp, kp, tab = wide_inputs(12, 4, torch.float32, 37, 53)
    wo = torch.randn(q.shape, dtype=torch.float64)
    wl = torch.randn(q.shape[0], 12, q.shape[1], dtype=torch.float64)
    rest = (qp, kp, tab, causal)
    want = grads_of(dense_reference, (q, k, v), rest, torch.float64, wo, wl)
    base = grads_of(plain_low, (q, k, v), rest, dtype, wo, wl)
    got = grads_of(lambda *a: lk.rope_attention(*a, causal=causal, backend="torch",
                                                return_lse=True), (q, k, v), rest[:3], dtype,
                   wo, wl)
    for name, a, b, w in zip("qkv", got, base, want):
        assert_close_rule(a, b, w, what=f"d{name}")


@pytest.mark.parametrize("use", ["out+lse", "out", "lse"])
@pytest.mark.parametrize("n,nk", LENGTHS, ids=[f"N{n}-Nk{nk}" for n, nk in LENGTHS])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", WIDE_HEADS, ids=[f"Hq{a}-Hkv{b}" for a, b in WIDE_HEADS])
def test_fused_backward_matches_the_einsum_backward(hq, hkv, causal, n, nk, use):
    """fp32: the fused CPU backward (saved out/lse, flash backward) and the recompute
    (einsum, its own scores) agree; with one output unused its gradient arrives as None."""
    q, k, v, qp, kp, tab = wide_inputs(hq, hkv, torch.float32, n, nk)
    out, lse = lk.rope_attention(q, k, v, qp, kp, tab, causal=causal, backend="torch",
                                 return_lse=True)
    do = None if use == "lse" else torch.randn(out.shape)
    dl = None if use == "out" else torch.randn(lse.shape)
    scale = D**-0.5
    fused = rope_attention_backward_torch(do, dl, q, k, v, qp, kp, tab, out, lse,
                                          causal=causal, scale=scale)
    mask = causal_mask(n, nk, q.device) if causal else None
    einsum = attention_backward(do, dl, q, qp, k, v, kp, tab, mask, scale)
    for name, a, b in zip("qkv", fused, einsum):
        assert a.shape == b.shape and a.is_contiguous(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"d{name}")
    # and through autograd: only lse (grad_out None) or only out (grad_lse None) used
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o2, l2 = lk.rope_attention(*xs, qp, kp, tab, causal=causal, backend="torch",
                               return_lse=True)
    loss = (0 if do is None else (o2 * do).sum()) + (0 if dl is None else (l2 * dl).sum())
    for name, a, b in zip("qkv", torch.autograd.grad(loss, xs), fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")


def test_einsum_backward_blocks_of_query_rows_agree(monkeypatch):
    """The recompute forms its scores a block of query rows at a time: any block size gives
    the same gradients (float64, causal, GQA, a 3-D mask)."""
    q, k, v, qp, kp, tab = wide_inputs(12, 4, torch.float64, 37, 53)
    do, dl = torch.randn(q.shape, dtype=torch.float64), torch.randn(2, 12, 37, dtype=torch.float64)
    mask = causal_mask(37, 53, q.device).expand(2, 37, 53)
    whole = attention_backward(do, dl, q, qp, k, v, kp, tab, mask, 0.3)
    monkeypatch.setattr(backward_module, "SCORE_BLOCK", 2 * 12 * 53 * 5)  # 5 rows a block
    blocks = attention_backward(do, dl, q, qp, k, v, kp, tab, mask, 0.3)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_backward_forms_no_score_matrix(dtype):
    """Memory: no op of the fused backward allocates anything near ``[B, Hq, N, Nk]`` (here
    32 MB in fp32): the rotated tensors and gradients are ``O((N + Nk) Hq D)``."""
    from torch.profiler import ProfilerActivity, profile
    B, N, Nk, Hq = 1, 2048, 2048, 2
    q, k, v, qp, kp, tab = wide_inputs(Hq, 1, dtype, N, Nk, B=B)
    out, lse = lk.rope_attention(q, k, v, qp, kp, tab, causal=True, backend="torch",
                                 return_lse=True)
    do, dl = torch.randn(out.shape).to(dtype), torch.randn(lse.shape)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rope_attention_backward_torch(do, dl, q, k, v, qp, kp, tab, out, lse, causal=True,
                                      scale=D**-0.5)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < B * Hq * N * Nk * 4 // 8, f"an op allocated {biggest} bytes"


@pytest.mark.parametrize("n,nk", [(0, 5), (5, 0), (0, 0)], ids=["N0", "Nk0", "both0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_empty_dimensions_give_zero_gradients(dtype, n, nk):
    """Rows that see no key (Nk = 0, lse = -inf) and empty blocks: zero gradients, no NaN."""
    q, k, v, qp, kp, tab = wide_inputs(12, 4, dtype, n, nk, B=1)
    xs = [t.requires_grad_() for t in (q, k, v)]
    out, lse = lk.rope_attention(*xs, qp, kp, tab, causal=True, backend="torch",
                                 return_lse=True)
    grads = torch.autograd.grad(weighted_loss(out, lse), xs)
    for x, g in zip(xs, grads):
        assert g.shape == x.shape and g.dtype == dtype and not bool(g.abs().sum())


def test_fused_backward_takes_an_expanded_incoming_gradient():
    """``out.sum().backward()`` hands in a stride-0 ``grad_out``: same gradients (fp32) as the
    float64 reference."""
    q, k, v, qp, kp, tab = wide_inputs(12, 4, torch.float32, 37, 53)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(lk.rope_attention(*xs, qp, kp, tab, backend="torch").sum(), xs)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(dense_reference(*refs, qp, kp, tab, False)[0].sum(), refs)
    for name, a, b in zip("qkv", got, want):
        assert (a.double() - b).abs().max() / b.abs().max() < 2e-5, f"d{name}"
