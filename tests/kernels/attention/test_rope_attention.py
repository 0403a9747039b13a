"""Dense ``lk.rope_attention`` (both backends) against float64.

Triton runs in the interpreter on a CPU-only machine (see test_paged_attention_triton.py for
why the variable is set here). The drop-in test shows ``rope -> SDPA`` in a model can be
replaced by one ``rope_attention`` call.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first @triton.jit decoration

import pytest
import torch.nn.functional as F

import lol_kernels as lk
from lol_kernels.attention import attention_triton as tk
from lol_kernels.attention import rope_attention_op
from lol_kernels.rope import apply_rope_torch, rope_naive_fp32
from lol_kernels.rope.reference import compute_dtype
from lol_kernels.rope.rope_triton import apply_rope_triton
from tests.support import assert_close_rule, max_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
A = 3


def dense_reference(q, k, v, q_pos, k_pos, table, causal=False, scale=None):
    """Plain formula in q.dtype (RoPE in fp32/fp64, softmax fp32/fp64): keys expanded to the
    query heads first, so each is rotated with its reading head's frequencies."""
    B, N, Hq, D = q.shape
    dt, ct = q.dtype, compute_dtype(q.dtype)
    g = Hq // k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qr = apply_rope_torch(q, q_pos, table)
    kr = apply_rope_torch(k.repeat_interleave(g, dim=2), k_pos, table)
    s = torch.einsum("bqhd,bkhd->bhqk", qr, kr).to(ct) * scale
    if causal:
        vis = torch.ones(N, k.shape[1], dtype=torch.bool).tril()
        s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), v.repeat_interleave(g, dim=2))
    return out, lse


def make_dense(B=2, N=40, Nk=57, Hq=4, Hkv=2, D=64, sigma=0.8, base=0):
    table = lk.rope_frequencies(D, Hq, jitter_sigma=sigma, seed=int(torch.randint(0, 999, ())))

    def pos(n):
        p = torch.randint(0, 16, (B, n, A))
        p[..., 0] += base
        return p

    return (torch.randn(B, N, Hq, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D),
            pos(N), pos(Nk), table)


def _check(fn, case, dtype, causal, **kw):
    q, k, v, qp, kp, table = case
    ref64, lse64 = dense_reference(q.double(), k.double(), v.double(), qp, kp, table, causal)
    lo = [t.to(dtype) for t in (q, k, v)]
    ref_lo, lse_lo = dense_reference(*lo, qp, kp, table, causal)
    out, lse = fn(*[t.to(DEV) for t in lo], qp.to(DEV), kp.to(DEV), table, causal=causal, **kw)
    assert_close_rule(out.cpu(), ref_lo, ref64, "out")
    assert_close_rule(lse.cpu(), lse_lo, lse64, "lse")
    return out.cpu()


@pytest.mark.parametrize("shape", [(40, 57, False), (45, 45, True), (30, 50, True)],
                         ids=["Nq40-Nk57", "Nq45-Nk45-causal", "Nq30-Nk50-causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_parity(dtype, shape):
    """Kernel (NaN-poisoned outputs) vs float64; causal is top-left aligned like SDPA."""
    N, Nk, causal = shape
    case = make_dense(N=N, Nk=Nk)
    B, Hq, D = 2, 4, 64
    out = torch.full((B, N, Hq, D), float("nan"), dtype=dtype, device=DEV)
    lse = torch.full((B, Hq, N), float("nan"), device=DEV)
    _check(tk.rope_attention_triton, case, dtype, causal, out=out, lse=lse)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_parity_split_kv(causal):
    """Dense keys cut in 3 split-KV parts (only the block's-own-keys loops run here)."""
    case = make_dense(B=1, N=45, Nk=45, Hq=2, Hkv=1, D=32)
    out = torch.full((1, 45, 2, 32), float("nan"), dtype=torch.float32, device=DEV)
    _check(tk.rope_attention_triton, case, torch.float32, causal, out=out,
           config={"num_splits": 3})


def test_triton_parity_d128_no_jitter():
    _check(tk.rope_attention_triton, make_dense(B=1, N=33, Nk=48, D=128, sigma=0.0),
           torch.float16, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_torch_backend_parity(dtype, causal):
    _check(rope_attention_op.rope_attention_torch, make_dense(N=30, Nk=50), dtype, causal)


@pytest.mark.parametrize("gqa", [False, True], ids=["MHA-jitter", "GQA-nojitter"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_drop_in_for_rope_then_sdpa(backend, gqa):
    """A model's ``apply_rope(q), apply_rope(k) -> scaled_dot_product_attention`` and one
    ``rope_attention`` call agree (both within the §5 rule of the float64 result)."""
    Hkv = 2 if gqa else 4
    q, k, v, qp, kp, table = make_dense(B=1, N=36, Nk=36, Hkv=Hkv, sigma=0.0 if gqa else 0.8)
    dt = torch.float16
    qh, kh, vh = (t.to(dt).to(DEV) for t in (q, k, v))
    ktable = lk.RopeTable(table.freqs[:: 4 // Hkv], table.pair_axis, table.axes)
    for causal in (False, True):
        qr = lk.apply_rope(qh, qp.to(DEV), table, backend="torch")
        kr = lk.apply_rope(kh, kp.to(DEV), ktable, backend="torch")
        sdpa = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2),
                                              vh.transpose(1, 2), is_causal=causal,
                                              enable_gqa=gqa).transpose(1, 2)
        ours = lk.rope_attention(qh, kh, vh, qp.to(DEV), kp.to(DEV), table, causal=causal,
                                 backend=backend)
        ref64, _ = dense_reference(q.double(), k.double(), v.double(), qp, kp, table, causal)
        assert_close_rule(ours.cpu(), sdpa.cpu(), ref64, f"rope_attention causal={causal}")
        assert max_err(ours.cpu(), sdpa.cpu()) < 1e-2


def test_shift_invariance_and_naive_fp32_fails():
    """Shifting all positions by 2^24 - 7 changes the kernel output < 1e-3 relative; the usual
    fp32 ``pos * omega`` RoPE followed by attention changes by more (the bound can fail)."""
    q, k, v, qp, kp, table = make_dense(B=1, N=32, Nk=40, D=64, sigma=0.5)
    shift = 2**24 - 7
    qp2, kp2 = qp.clone(), kp.clone()
    qp2[..., 0] += shift
    kp2[..., 0] += shift
    o1 = tk.rope_attention_triton(q.to(DEV), k.to(DEV), v.to(DEV), qp.to(DEV), kp.to(DEV),
                                  table)[0].cpu()
    o2 = tk.rope_attention_triton(q.to(DEV), k.to(DEV), v.to(DEV), qp2.to(DEV), kp2.to(DEV),
                                  table)[0].cpu()
    assert max_err(o1, o2) / o1.abs().max().item() < 1e-3

    def naive(qp_, kp_):
        qr = rope_naive_fp32(q, qp_, table)
        kr = rope_naive_fp32(k.repeat_interleave(2, dim=2), kp_, table)
        return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2),
                                              v.repeat_interleave(2, dim=2).transpose(1, 2))
    n1, n2 = naive(qp, kp), naive(qp2, kp2)
    assert max_err(n1, n2) / n1.abs().max().item() > 1e-3


def test_public_op_triton_equals_kernel():
    q, k, v, qp, kp, table = (t.to(DEV) if isinstance(t, torch.Tensor) else t
                              for t in make_dense(B=1, N=20, Nk=24))
    out, lse = lk.rope_attention(q, k, v, qp, kp, table, backend="triton", return_lse=True)
    o2, l2 = tk.rope_attention_triton(q, k, v, qp, kp, table)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # dense, not contiguous
    o3, _ = tk.rope_attention_triton(qt, k, v, qp, kp, table)
    assert o3.is_contiguous() and torch.equal(o3, o2)  # contiguous, as the fake promises


def test_custom_op_fake_and_schema():
    """``lol::rope_attention`` has a fake implementation (torch.compile traces it)."""
    q, k, v, qp, kp, table = make_dense(B=1, N=8, Nk=12)
    torch.library.opcheck(rope_attention_op._rope_attention_op,
                          (q, k, v, qp, kp, table.freqs, table.pair_axis, True, 0.125, "torch"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_rope_attention():
    """The custom op traces in one graph (fake implementation) and gives the eager result."""
    q, k, v, qp, kp, table = make_dense(B=1, N=8, Nk=12)

    def fn(q, k, v):
        return lk.rope_attention(q, k, v, qp, kp, table, causal=True, backend="torch")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda a: a.update(k=a["k"][:, :, :1].repeat(1, 1, 3, 1)), ValueError, "multiple"),
    (lambda a: a.update(v=a["v"][:, :-1]), ValueError, "v must have shape"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k must have q's dtype"),
    (lambda a: a.update(k_pos=a["k_pos"].float()), TypeError, "k_pos"),
    (lambda a: a.update(k_pos=a["k_pos"][:, :, :2]), ValueError, "k_pos must have shape"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend"),
], ids=["heads", "v-shape", "dtype", "pos-dtype", "pos-axes", "scale", "backend"])
def test_validation(bad, exc, msg):
    q, k, v, qp, kp, table = make_dense(B=1, N=8, Nk=12)
    a = dict(q=q, k=k, v=v, q_pos=qp, k_pos=kp, table=table, scale=None, backend="torch")
    bad(a)
    with pytest.raises(exc, match=msg):
        lk.rope_attention(a["q"], a["k"], a["v"], a["q_pos"], a["k_pos"], a["table"],
                          scale=a["scale"], backend=a["backend"])


def test_unsupported_head_dim_and_fp64_take_the_torch_path():
    """D = 48 (not a power of two) and fp64 with backend="triton" give the torch path's result
    exactly (the dispatcher routes them); the Triton wrappers called directly refuse them."""
    for D, dt in ((48, torch.float16), (64, torch.float64)):
        q, k, v, qp, kp, table = make_dense(B=1, N=9, Nk=12, D=D)
        q, k, v = (t.to(dt) for t in (q, k, v))
        o, lse = lk.rope_attention(q, k, v, qp, kp, table, causal=True, backend="triton",
                                   return_lse=True)
        ref, ref_lse = rope_attention_op.rope_attention_torch(q, k, v, qp, kp, table, causal=True)
        assert torch.equal(o, ref) and torch.equal(lse, ref_lse)
        y = lk.apply_rope(q, qp, table, backend="triton")
        assert torch.equal(y, apply_rope_torch(q, qp, table))
        with pytest.raises(ValueError, match="q must be fp16/bf16/fp32"):
            tk.rope_attention_triton(q, k, v, qp, kp, table, causal=True)
        with pytest.raises(ValueError, match="x must be fp16/bf16/fp32"):
            apply_rope_triton(q, qp, table)
