"""Fused Triton backward of ``rope_attention`` against float64 autograd.

The kernels run in the interpreter on a CPU-only machine (test_paged_attention_triton.py says
why the variable is set here), fp32 and fp16 (the interpreter's bf16 products are wrong,
docs/design.md §8): ``dq, dk, dv`` from NaN-poisoned buffers must satisfy the parity rule of
docs/design.md §5 against autograd through the reference formulas in float64, with the error
of the same autograd in the input dtype as the yardstick. GQA 12/4 and 12/12 with jitter (so
every query head of a group rotates a key differently), causal and not, odd lengths with
``N != Nk``, the forward's own ``out``/``lse``, ``grad_lse``, empty dimensions. The sm_90
compile of the backward kernels (no spills) closes the file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first @triton.jit decoration

import pytest

import lol_kernels as lk
from lol_kernels.attention import rope_attention_triton_backward as tb
from lol_kernels.attention.attention_triton import rope_attention_triton
from lol_kernels.common import aot
from lol_kernels.common.triton_utils import is_interpreted
from tests.support import assert_close_rule
from tests.support.triton_grad_cases import make_case, reference_grads

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_run_here():
    assert torch.cuda.is_available() or is_interpreted(tb.rope_attn_bwd_dq)


def kernel_grads(c, dtype, causal, *, use_out=True, use_lse=True, forward="triton",
                 config=None, scale=None):
    """The fused backward on NaN-poisoned buffers, after the forward ``forward``."""
    d = {n: (x.to(DEV, dtype) if x.is_floating_point() and n not in ("grad_lse",) else
             x.to(DEV)) for n, x in c.items() if isinstance(x, torch.Tensor)}
    q, k, v, qp, kp = (d[n] for n in ("q", "k", "v", "q_pos", "k_pos"))
    if forward == "triton":
        out, lse = rope_attention_triton(q, k, v, qp, kp, c["table"], causal=causal,
                                         scale=scale)
    else:
        out, lse = lk.rope_attention(q, k, v, qp, kp, c["table"], causal=causal, scale=scale,
                                     backend="torch", return_lse=True)
    bufs = dict(dq=torch.full_like(q, float("nan")), dk=torch.full_like(k, float("nan")),
                dv=torch.full_like(v, float("nan")))
    got = tb.rope_attention_backward_triton(
        d["grad_out"] if use_out else None, d["grad_lse"].float() if use_lse else None, q, k,
        v, qp, kp, c["table"], out, lse, causal=causal, scale=scale, config=config, **bufs)
    for g, (name, buf) in zip(got, bufs.items()):
        assert g is buf, name
    return [g.cpu() for g in got]


def check(c, dtype, causal, **kw):
    use = {n: kw[n] for n in ("use_out", "use_lse", "scale") if n in kw}
    got = kernel_grads(c, dtype, causal, **kw)
    ref64 = reference_grads(c, torch.float64, causal, **use)
    ref_lo = reference_grads(c, dtype, causal, **use)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), got, ref_lo, ref64):
        assert a.dtype == dtype and a.shape == hi.shape, name
        assert_close_rule(a, lo, hi, name)


HEADS = [(12, 4, 1, 37, 29), (12, 12, 1, 19, 45)]  # Hq, Hkv, B, N, Nk (N > Nk and N < Nk)
HEAD_IDS = ["Hq12-Hkv4-N37-Nk29", "Hq12-Hkv12-N19-Nk45"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv,B,N,Nk", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grads_match_float64_autograd(dtype, hq, hkv, B, N, Nk, causal):
    """GQA 12/4 and MHA 12/12 with jitter, odd lengths, both incoming gradients, after the
    Triton forward (its fp16 ``out`` and fp32 ``lse`` feed ``delta`` and ``p``)."""
    check(make_case(B=B, N=N, Nk=Nk, Hq=hq, Hkv=hkv), dtype, causal)


@pytest.mark.parametrize("use_out,use_lse", [(True, False), (False, True)],
                         ids=["grad_out-only", "grad_lse-only"])
def test_one_incoming_gradient(use_out, use_lse):
    """``grad_lse = None`` (the usual training loss) and ``grad_out = None`` (dv = 0); the
    incoming gradients are strided views (as autograd may hand them over)."""
    c = make_case(B=2, N=21, Nk=26, Hq=6, Hkv=2)
    c["grad_out"] = c["grad_out"].transpose(1, 2).contiguous().transpose(1, 2)
    c["grad_lse"] = c["grad_lse"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not c["grad_out"].is_contiguous() and not c["grad_lse"].is_contiguous()
    check(c, torch.float32, True, use_out=use_out, use_lse=use_lse, forward="torch")


@pytest.mark.parametrize("config,causal", [({"BLOCK_M": 16, "BLOCK_N": 32}, True),
                                           ({"BLOCK_M": 64, "BLOCK_N": 16}, True),
                                           ({"BLOCK_M": 16, "BLOCK_N": 16}, False)],
                         ids=["M16-N32-causal", "M64-N16-causal", "M16-N16-full"])
def test_other_tiles(config, causal):
    """Several query and key tiles per program, tiles wider than the other side, the causal
    diagonal crossing tiles of both kernels (masked and unmasked loops)."""
    c = make_case(B=1, N=53, Nk=50, Hq=4, Hkv=2)
    check(c, torch.float16, causal, config=config, forward="torch")


@pytest.mark.parametrize("D,scale", [(64, None), (128, 0.3)], ids=["D64", "D128-scale0.3"])
def test_head_dims(D, scale):
    c = make_case(B=1, N=17, Nk=23, Hq=2, Hkv=1, D=D)
    check(c, torch.float16, True, forward="torch", scale=scale)


@pytest.mark.parametrize("base", [172_800, -1000], ids=["t172800", "negative"])
def test_large_and_negative_positions(base):
    """Queries and keys near t = 172,800 latent frames (12 h), or at negative positions: the
    exact fixed-point phases keep the gradients at float64-reference accuracy (a float32
    ``pos * omega`` would not)."""
    check(make_case(B=1, N=20, Nk=24, Hq=4, Hkv=2, base=base), torch.float32, False,
          forward="torch")


@pytest.mark.parametrize("N,Nk", [(9, 0), (0, 7)], ids=["Nk0", "N0"])
def test_empty_dimensions_give_zero_gradients(N, Nk):
    c = make_case(B=2, N=N, Nk=Nk, Hq=4, Hkv=2)
    got = kernel_grads(c, torch.float32, True, forward="torch")
    for g, x in zip(got, (c["q"], c["k"], c["v"])):
        assert g.shape == x.shape and not bool(g.abs().sum())


def test_no_incoming_gradient_gives_zeros():
    c = make_case(B=1, N=9, Nk=11, Hq=4, Hkv=2)
    got = kernel_grads(c, torch.float32, False, use_out=False, use_lse=False, forward="torch")
    assert all(not bool(g.abs().sum()) for g in got)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autograd_runs_the_fused_backward(monkeypatch, causal):
    """``rope_attention(backend="triton").backward()`` goes through the fused Triton backward
    (counted) and meets the parity rule; the torch backend never calls it."""
    calls = []
    real = tb.rope_attention_backward_triton

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tb, "rope_attention_backward_triton", counted)
    c = make_case(B=1, N=21, Nk=26, Hq=6, Hkv=2)
    ref64 = reference_grads(c, torch.float64, causal)
    ref_lo = reference_grads(c, torch.float16, causal)
    got = {}
    for backend in ("triton", "torch"):
        xs = [c[n].to(DEV, torch.float16).requires_grad_() for n in "qkv"]
        out, lse = lk.rope_attention(*xs, c["q_pos"].to(DEV), c["k_pos"].to(DEV), c["table"],
                                     causal=causal, backend=backend, return_lse=True)
        torch.autograd.backward([out, lse], [c["grad_out"].to(DEV, torch.float16),
                                             c["grad_lse"].to(DEV)])
        got[backend] = [x.grad.cpu() for x in xs]
        assert len(calls) == 1, backend  # once, by the Triton backend only
    for name, a, lo, hi in zip(("dq", "dk", "dv"), got["triton"], ref_lo, ref64):
        assert_close_rule(a, lo, hi, name)


def test_backward_op_fake_matches():
    """The backward is a custom op of its own (``torch.compile`` traces its fake, not the
    Triton launch): opcheck's schema, fake and autograd-registration checks pass."""
    from lol_kernels.attention import rope_attention_op
    c = make_case(B=1, N=9, Nk=11, Hq=4, Hkv=2)
    t = c["table"]
    q, k, v = (c[n].to(DEV) for n in "qkv")
    out, lse = rope_attention_triton(q, k, v, c["q_pos"].to(DEV), c["k_pos"].to(DEV), t)
    args = (c["grad_out"].to(DEV), c["grad_lse"].to(DEV), q, k, v, c["q_pos"].to(DEV),
            c["k_pos"].to(DEV), t.freqs.to(DEV), t.pair_axis.to(DEV), out, lse, True,
            q.shape[-1] ** -0.5, "triton", list(t.axes))
    torch.library.opcheck(rope_attention_op._rope_attention_backward_op, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_traces_triton_forward_and_backward():
    """``torch.compile(fullgraph=True)`` of a training step on the Triton backend: the forward
    and the backward custom ops are traced through their fakes (no graph break) and the
    compiled gradients equal the eager ones."""
    c = make_case(B=1, N=19, Nk=23, Hq=4, Hkv=2)
    qp, kp = c["q_pos"].to(DEV), c["k_pos"].to(DEV)

    def loss(q, k, v):
        out = lk.rope_attention(q, k, v, qp, kp, c["table"], causal=True, backend="triton")
        return (out.float() * c["grad_out"].to(DEV)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (loss, compiled):
        xs = [c[n].to(DEV, torch.float16).requires_grad_() for n in "qkv"]
        grads.append(torch.autograd.grad(fn(*xs), xs))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bad_inputs_name_the_argument():
    c = make_case(B=1, N=5, Nk=6, Hq=4, Hkv=2)
    q, k, v, qp, kp, t = (c[n] for n in ("q", "k", "v", "q_pos", "k_pos", "table"))
    out, lse = torch.zeros_like(q), torch.zeros(1, 4, 5)
    with pytest.raises(ValueError, match="q must be fp16/bf16/fp32"):
        tb.rope_attention_backward_triton(None, lse, q.double(), k, v, qp, kp, t, out, lse)
    with pytest.raises(ValueError, match="lse must have shape"):
        tb.rope_attention_backward_triton(None, lse, q, k, v, qp, kp, t, out, lse[:, :2])
    with pytest.raises(TypeError, match="v must have dtype"):
        tb.rope_attention_backward_triton(None, lse, q, k, v.half(), qp, kp, t, out, lse)
    q256 = torch.randn(1, 5, 4, 256)  # fp32 at D = 256: no config fits (the forward refuses)
    with pytest.raises(ValueError, match="no backward config fits"):
        tb.rope_attention_backward_triton(None, lse, q256, q256[:, :, :2], q256[:, :, :2], qp,
                                          qp, lk.rope_frequencies(256, 4), None, lse)
    k3 = torch.randn(1, 6, 3, q.shape[-1])  # Hq = 4 is not a multiple of Hkv = 3
    with pytest.raises(ValueError, match="k must be"):
        tb.rope_attention_backward_triton(None, lse, q, k3, k3, qp, kp, t, out, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_autotuner_offers_the_listed_configs(dtype):
    """The autotuners' pruning keeps :func:`backward_configs` of the launch's dtype and head
    dim (what the sm_90 compile checks), something for every supported input but fp32 at
    D = 256 (refused)."""
    for tuned, kind in ((tb.rope_attn_bwd_dq_tuned, "dq"), (tb.rope_attn_bwd_dkdv_tuned, "dkdv")):
        for D in (16, 32, 64, 128, 256):
            kept = tuned.early_config_prune(tuned.configs,
                                            {"Q": torch.empty(1, dtype=dtype), "HEAD_DIM": D})
            got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                   for c in kept]
            assert sorted(got) == sorted(tb.backward_configs(kind, dtype, D)), (kind, D)
            assert bool(got) == tb.backward_launchable(dtype, D) == (
                dtype != torch.float32 or D < 256), (kind, D)


# --------------------------------------------------------------------- sm_90 compile
AOT = pytest.mark.skipif(not os.path.exists(aot.tool("cuobjdump")),
                         reason="triton wheel without the NVIDIA backend binaries")


@AOT
def test_backward_compiles_for_sm90_without_spills():
    """Every config the autotuner may pick for each backward kernel, bf16 at D = 128 and fp16
    at D = 64 (GQA 3, causal; also benchmarks/kernel_report.py): HGMMA products, no stack or
    local memory, no calls, registers reported. CI runs it under Triton 3.6 and 3.9."""
    from lol_kernels.attention.rope_attention_aot import backward_static_rows

    rows = backward_static_rows(configs="offered", pairs=(("bf16", 128), ("fp16", 64)))
    assert len(rows) == 10
    assert {r["kernel"] for r in rows} == {"rope_attn_bwd_dq", "rope_attn_bwd_dkdv",
                                           "rope_attn_bwd_preprocess"}
    for r in rows:
        name = f"{r['kernel']}[{r['dtype']}-D{r['head_dim']}-{r['config']}]"
        assert 0 < r["registers"] <= 255, name
        assert r["stack_B"] == r["local_B"] == r["spills"] == 0, (name, r)
        assert r["calls"] == 0, name
        assert r["shared_B"] <= 232448, name
        if r["kernel"] != "rope_attn_bwd_preprocess":
            assert r["hgmma"] > 0, name
