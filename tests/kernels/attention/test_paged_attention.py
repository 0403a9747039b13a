"""paged_attention (torch backend) against an independent dense float64 formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lol_kernels as lk
from lol_kernels.attention import paged_attention_reference
from tests.support import assert_close_rule, max_err
from tests.support.paged_cases import call, make_case


def rotate_complex(x, pos, freqs, pair_axis):
    """Independent RoPE: channel pairs as complex numbers times exp(i * pos * omega)."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # [N, H, D/2]
    ang = pos.double()[:, pair_axis].unsqueeze(1) * freqs  # [N, H, D/2]
    return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


def dense_formula(q, q_pos, ck, cv, cpos, plen, table_ids, tab, k_new, v_new, causal, shift,
                  scale):
    """Softmax of rotated scores, one batch row and one head at a time, in float64."""
    B, N, Hq, D = q.shape
    g = Hq // ck.shape[2]
    out = torch.zeros(B, N, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        keys, vals, kpos, is_new = [], [], [], []
        for m, pid in enumerate(table_ids[b].tolist()):
            if pid < 0:
                continue
            for s in range(int(plen[pid])):
                p = cpos[pid, s].clone()
                if shift is not None:
                    p = p + shift[b, m]
                keys.append(ck[pid, s])
                vals.append(cv[pid, s])
                kpos.append(p)
                is_new.append(-1)
        if k_new is not None:
            for j in range(N):
                keys.append(k_new[b, j])
                vals.append(v_new[b, j])
                kpos.append(q_pos[b, j])
                is_new.append(j)
        if not keys:
            continue
        K, V, KP = torch.stack(keys), torch.stack(vals), torch.stack(kpos)
        qr = rotate_complex(q[b], q_pos[b], tab.freqs, tab.pair_axis)
        kr = rotate_complex(K.repeat_interleave(g, dim=1), KP, tab.freqs, tab.pair_axis)
        for h in range(Hq):
            s = (qr[:, h] @ kr[:, h].T) * scale  # [N, Nk]
            if causal:
                new = torch.tensor(is_new)
                s = s.masked_fill((new[None, :] > torch.arange(N)[:, None]), float("-inf"))
            lse[b, h] = torch.logsumexp(s, dim=-1)
            out[b, :, h] = torch.softmax(s, dim=-1) @ V[:, h // g].double()
    return out, lse


def formula(c, causal, scale=None):
    D = c["q"].shape[-1]
    return dense_formula(c["q"], c["q_pos"], c["cache_k"], c["cache_v"], c["cache_pos"],
                         c["page_len"], c["page_table"], c["table"], c["k_new"], c["v_new"],
                         causal, c["page_shift"], D**-0.5 if scale is None else scale)


SHAPES = {
    "Nq7-gqa6/2-D64": dict(N=7, Hq=6, Hkv=2, D=64),
    "Nq13-gqa12/4-D128": dict(N=13, Hq=12, Hkv=4, D=128, S=32, P=6, M=4),
    "Nq1-mha-D64": dict(N=1, Hq=3, Hkv=3, D=64),
    "no-new": dict(with_new=False, shift=False),
    "no-shift-no-empty": dict(shift=False, empty=False, jitter_sigma=0.0),
}


CASES = [(s, c) for s in SHAPES for c in (False, True) if not (c and s == "no-new")]


@pytest.mark.parametrize("shape,causal", CASES,
                         ids=[f"{s}-{'causal' if c else 'block'}" for s, c in CASES])
def test_float64_matches_dense_formula(shape, causal):
    c = make_case(**SHAPES[shape])
    want_o, want_l = formula(c, causal)
    for fn in (lk.paged_attention, paged_attention_reference):
        o, lse = call(c, fn=fn, causal=causal)
        assert o.dtype == torch.float64
        assert max_err(o, want_o) < 1e-10
        assert max_err(lse, want_l) < 1e-5  # the public op returns fp32 lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
def test_low_precision_rule(dtype, causal):
    """CPU fast path in low precision vs float64 within 2x the plain reference's error."""
    c64 = make_case(N=19, Hq=4, Hkv=2, D=64, S=16, P=8, M=6)
    c = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in c64.items()}
    ref64_o, ref64_l = call({k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                             for k, v in c.items()}, fn=paged_attention_reference, causal=causal)
    low_o, low_l = call(c, fn=paged_attention_reference, causal=causal)
    o, lse = call(c, causal=causal)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close_rule(o, low_o, ref64_o)
    assert_close_rule(lse, low_l, ref64_l, what="lse")


def test_rows_without_keys():
    c = make_case(B=2, with_new=False, shift=False)
    c["page_table"][1] = -1  # batch row 1 sees nothing
    o, lse = call(c)
    assert torch.all(o[1] == 0) and torch.all(lse[1] == float("-inf"))
    want_o, want_l = formula(c, False)
    assert max_err(o[0], want_o[0]) < 1e-10 and max_err(lse, want_l) < 1e-5


def test_empty_table_new_keys_only():
    c = make_case(B=1, M=3)
    c["page_table"][:] = -1
    o, _ = call(c, causal=True)
    want_o, _ = formula(c, True)
    assert max_err(o, want_o) < 1e-10


def test_custom_scale():
    c = make_case()
    o, lse = call(c, scale=0.3)
    want_o, want_l = formula(c, False, scale=0.3)
    assert max_err(o, want_o) < 1e-10 and max_err(lse, want_l) < 1e-5


def test_torch_compile_fullgraph():
    c = make_case(dtype=torch.float32)

    def f(q, k_new):
        out, lse = lk.paged_attention(q, c["q_pos"], c["cache_k"], c["cache_v"], c["cache_pos"],
                                      c["page_len"], c["page_table"], c["table"], k_new=k_new,
                                      v_new=c["v_new"], page_shift=c["page_shift"])
        return out.sum(-1), lse

    got = torch.compile(f, fullgraph=True, backend="eager")(c["q"], c["k_new"])
    want = f(c["q"], c["k_new"])
    assert max_err(got[0], want[0]) < 1e-5 and max_err(got[1], want[1]) < 1e-5


def test_opcheck():
    c = make_case(dtype=torch.float32)
    t = c["table"]
    args = (c["q"], c["q_pos"], c["cache_k"], c["cache_v"], c["cache_pos"], c["page_len"],
            c["page_table"], t.freqs, t.pair_axis, c["k_new"], c["v_new"], False,
            c["page_shift"], 0.125, "torch")
    torch.library.opcheck(torch.ops.lol.paged_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 9), g=st.sampled_from([1, 2, 3]),
       Hkv=st.integers(1, 2), D=st.sampled_from([16, 32, 48]), S=st.sampled_from([16, 32]),
       M=st.integers(0, 4), causal=st.booleans(), new=st.booleans(), shift=st.booleans(),
       jitter_sigma=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**16))
def test_property_random_shapes(B, N, g, Hkv, D, S, M, causal, new, shift, jitter_sigma, seed):
    torch.manual_seed(seed)
    causal = causal and new
    c = make_case(B=B, N=N, Hq=g * Hkv, Hkv=Hkv, D=D, S=S, P=max(M, 1) + 2, M=M,
                  with_new=new, shift=shift, empty=M > 1, jitter_sigma=jitter_sigma)
    o, lse = call(c, causal=causal)
    want_o, want_l = formula(c, causal)
    assert max_err(o, want_o) < 1e-10 and max_err(lse, want_l) < 1e-5


# ---------------------------------------------------------------- bad inputs
def _bad(mut, exc, needle):
    c = make_case(dtype=torch.float32)
    kw = {}
    mut(c, kw)
    with pytest.raises(exc, match=needle):  # value checks run when asked (validate=True)
        call(c, validate=True, **kw)


BAD = {
    "q-rank": (lambda c, kw: c.update(q=c["q"][0]), ValueError, "q must have 4 dimensions"),
    "q-int": (lambda c, kw: c.update(q=c["q"].long()), TypeError, "q must be a floating"),
    "qpos-float": (lambda c, kw: c.update(q_pos=c["q_pos"].float()), TypeError, "q_pos must be an integer"),
    "qpos-shape": (lambda c, kw: c.update(q_pos=c["q_pos"][:, :3]), ValueError, "q_pos must have shape"),
    "gqa": (lambda c, kw: c.update(q=torch.randn(2, 7, 5, 64)), ValueError, "multiple of cache_k heads"),
    "cache-dtype": (lambda c, kw: c.update(cache_k=c["cache_k"].half()), TypeError, "cache_k must have q's dtype"),
    "cache-v-shape": (lambda c, kw: c.update(cache_v=c["cache_v"][:, :8]), ValueError, "cache_v must have shape"),
    "head-dim": (lambda c, kw: c.update(cache_k=torch.randn(9, 16, 2, 32)), ValueError, "head dim"),
    "cache-pos-float": (lambda c, kw: c.update(cache_pos=c["cache_pos"].float()), TypeError, "cache_pos must be an integer"),
    "page-len-shape": (lambda c, kw: c.update(page_len=c["page_len"][:3]), ValueError, "page_len must have shape"),
    "page-len-range": (lambda c, kw: c["page_len"].__setitem__(0, 17), ValueError, "page_len must be in"),
    "page-id-high": (lambda c, kw: c["page_table"].__setitem__((0, 0), 9), ValueError, "page_table holds page ids"),
    "page-id-low": (lambda c, kw: c["page_table"].__setitem__((0, 0), -2), ValueError, "page_table holds page ids"),
    "page-table-float": (lambda c, kw: c.update(page_table=c["page_table"].float()), TypeError, "page_table must be an integer"),
    "page-table-batch": (lambda c, kw: c.update(page_table=c["page_table"][:1]), ValueError, "page_table must have shape"),
    "shift-shape": (lambda c, kw: c.update(page_shift=c["page_shift"][:, :2]), ValueError, "page_shift must have shape"),
    "new-alone": (lambda c, kw: c.update(v_new=None), ValueError, "k_new and v_new"),
    "new-shape": (lambda c, kw: c.update(k_new=c["k_new"][:, :3]), ValueError, "k_new must have shape"),
    "causal-no-new": (lambda c, kw: (c.update(k_new=None, v_new=None), kw.update(causal=True)), ValueError, "causal=True needs"),
    "causal-type": (lambda c, kw: kw.update(causal=1), TypeError, "causal must be a bool"),
    "table-heads": (lambda c, kw: c.update(table=lk.rope_frequencies(64, 4)), ValueError, "table must have one row per head"),
    "position-too-large": (lambda c, kw: c["q_pos"].__setitem__((0, 0, 0), 2**31), ValueError, "q_pos must hold positions"),
    "scale": (lambda c, kw: kw.update(scale=-1.0), ValueError, "scale must be a positive"),
    "backend": (lambda c, kw: kw.update(backend="cuda"), ValueError, "backend must be one of"),
    "device": (lambda c, kw: c.update(page_len=c["page_len"].to("meta")), ValueError, "page_len must be on"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_rejects(case):
    _bad(*BAD[case])
