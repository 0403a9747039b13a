"""moc_attention: torch path and Triton kernel (interpreter) against dense masked float64
attention; equivalence with paged_attention; validation; the custom op."""

import os

import torch

if not torch.cuda.is_available():  # read when @triton.jit decorates: before any kernel import
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import lol_kernels as lk
from lol_kernels.attention import paged_attention_reference
from lol_kernels.moc.moc_attention_cpu import moc_attention_torch
from lol_kernels.moc.moc_attention_op import moc_attention, tile_means
from lol_kernels.moc.reference import moc_attention_reference
from tests.support import assert_close_rule, max_err
from tests.support.moc_cases import make_case, split


def _triton_ok():
    try:
        from lol_kernels.common.triton_utils import is_interpreted
        from lol_kernels.moc.moc_attention_triton import moc_attn_fwd
    except Exception:
        return False
    return is_interpreted(moc_attn_fwd) or torch.cuda.is_available()


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="Triton interpreter/GPU unavailable")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def per_route_formula(x, opts):
    """Independent construction: for each (tile, head), paged_attention_reference over the
    mandatory pages plus the pages of its routed chunks (chunk shifts as page shifts)."""
    pos, kw = split(x, opts, torch.float64)
    q, q_pos, ck, cv, cpos, plen, pt, tab = pos
    B, N, Hq, D = q.shape
    tile, A = opts["tile_size"], q_pos.shape[-1]
    Pc = kw["chunk_pages"].shape[2]
    out = torch.zeros(B, N, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, N), float("-inf"), dtype=torch.float64)
    ps = kw["page_shift"] if kw["page_shift"] is not None else torch.zeros(*pt.shape, A,
                                                                            dtype=torch.int32)
    cs = kw["chunk_shift"]
    for t in range(kw["routed"].shape[1]):
        q0, q1 = t * tile, min(N, (t + 1) * tile)
        for h in range(Hq):
            table, shift = [pt], [ps]
            for b_c in kw["routed"][:, t, h].unbind(1):  # one routed slot for every row
                c = b_c.long().clamp(min=0)
                pages = kw["chunk_pages"][torch.arange(B), c]  # [B, Pc]
                table.append(torch.where((b_c >= 0)[:, None], pages, -1))
                sh = cs[torch.arange(B), c] if cs is not None else torch.zeros(B, A, dtype=int)
                shift.append(sh[:, None, :].expand(B, Pc, A).int())
            sub_tab = lk.RopeTable(tab.freqs[h:h + 1], tab.pair_axis, tab.axes)
            kn = kw["k_new"]
            o, l_ = paged_attention_reference(
                q[:, :, h:h + 1], q_pos, ck, cv, cpos, plen, torch.cat(table, 1), sub_tab,
                k_new=kn, v_new=kw["v_new"], causal=kw["causal"],
                page_shift=torch.cat(shift, 1))
            out[:, q0:q1, h] = o[:, q0:q1, 0]
            lse[:, h, q0:q1] = l_[:, 0, q0:q1]
    return out, lse


@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
def test_reference_equals_per_route_paged_formula(causal):
    x, opts = make_case(B=2, N=21, Hq=3, Hkv=1, causal=causal, tile=16)
    pos, kw = split(x, opts, torch.float64)
    out, lse = moc_attention_reference(*pos, **kw)
    ref_o, ref_l = per_route_formula(x, opts)
    assert max_err(out, ref_o) < 1e-12
    assert max_err(lse, ref_l) < 1e-12
    assert torch.isfinite(lse).all()


CASES = {
    "N37-gqa2-D16": dict(N=37, Hq=4, Hkv=2, D=16),
    "N5-mha-D32-k3": dict(N=5, Hq=2, Hkv=2, D=32, k=3, C=4),
    "N50-gqa3-tile32-S32": dict(N=50, Hq=6, Hkv=2, tile=32, Pc=1, C=7, S=32),
    "N19-noshift-nonew": dict(N=19, Hq=2, Hkv=1, shifts=False, new=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_torch_path_matches_float64(case, causal, dtype):
    x, opts = make_case(causal=causal, **CASES[case])
    ref64, lse64 = moc_attention_reference(*split(x, opts, torch.float64)[0],
                                           **split(x, opts, torch.float64)[1])
    pos, kw = split(x, opts, dtype)
    ref_lo, lse_lo = moc_attention_reference(*pos, **kw)
    out, lse = moc_attention(*pos, **kw, backend="torch")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rule(out, ref_lo, ref64)
    assert_close_rule(lse, lse_lo, lse64, what="lse")


TRITON_CASES = [(c, causal) for c in ("N37-gqa2-D16", "N50-gqa3-tile32-S32", "N19-noshift-nonew")
                for causal in (False, True) if not (causal and c == "N19-noshift-nonew")]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case,causal", TRITON_CASES,
                         ids=[f"{c}-{'causal' if k else 'block'}" for c, k in TRITON_CASES])
def test_triton_matches_float64(case, causal, dtype):
    x, opts = make_case(causal=causal, **CASES[case])
    p64, k64 = split(x, opts, torch.float64)
    ref64, lse64 = moc_attention_reference(*p64, **k64)
    pos, kw = split(x, opts, dtype)
    ref_lo, lse_lo = moc_attention_reference(*pos, **kw)
    from lol_kernels.moc.moc_attention_triton import moc_attention_triton
    dpos, dkw = split(x, opts, dtype, DEV)
    out = torch.full_like(dpos[0], float("nan"))
    lse = torch.full(ref_lo.shape[:1] + (ref_lo.shape[2], ref_lo.shape[1]), float("nan"),
                     device=DEV)
    moc_attention_triton(*dpos, **dkw, out=out, lse=lse)
    assert_close_rule(out.cpu(), ref_lo, ref64)
    assert_close_rule(lse.cpu(), lse_lo, lse64, what="lse")


@needs_triton
def test_triton_backend_odd_head_dim_takes_torch_path():
    """D = 24 is not a tl.arange extent: backend="triton" answers through the torch path (the
    dispatcher routes it); the Triton wrapper called directly refuses it."""
    from lol_kernels.moc.moc_attention_triton import moc_attention_triton
    x, opts = make_case(N=20, Hq=2, Hkv=1, D=24)
    pos, kw = split(x, opts)
    out, lse = moc_attention(*pos, **kw, backend="triton")
    assert torch.equal(out, moc_attention_torch(*pos, **kw)[0])
    ref, ref_lse = moc_attention_reference(*split(x, opts, torch.float64)[0],
                                           **split(x, opts, torch.float64)[1])
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    with pytest.raises(ValueError, match="q must be fp16/bf16/fp32"):
        moc_attention_triton(*pos, **kw)


def _everything(x, opts):
    """The routing that selects every chunk, and the equivalent paged_attention inputs."""
    B, C, Pc = x["chunk_pages"].shape
    T = x["routed"].shape[1]
    Hq = x["q"].shape[2]
    routed = torch.arange(C, dtype=torch.int32).expand(B, T, Hq, C).contiguous()
    table = torch.cat([x["page_table"], x["chunk_pages"].reshape(B, C * Pc)], 1)
    shift = torch.cat([x["page_shift"], x["chunk_shift"].repeat_interleave(Pc, 1)], 1)
    return routed, table, shift


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_select_everything_equals_paged_attention(backend):
    x, opts = make_case(N=37, Hq=4, Hkv=2, C=4, causal=True)
    routed, table, shift = _everything(x, opts)
    pos, kw = split({**x, "routed": routed}, opts, device=DEV if backend == "triton" else "cpu")
    out, lse = moc_attention(*pos, **kw, backend=backend)
    pos[6] = table.to(pos[0].device)
    ref, ref_lse = lk.paged_attention(*pos, k_new=kw["k_new"], v_new=kw["v_new"],
                                      causal=kw["causal"], page_shift=shift.to(pos[0].device),
                                      backend=backend)
    assert max_err(out.cpu(), ref.cpu()) < 1e-5
    assert max_err(lse.cpu(), ref_lse.cpu()) < 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_no_routable_chunks(backend):
    """C = 0 (an empty slow memory): routed is all -1 and the result is the mandatory part."""
    x, opts = make_case(N=20, Hq=2, Hkv=1, C=3)
    x["chunk_pages"] = x["chunk_pages"][:, :0]
    x["chunk_shift"] = x["chunk_shift"][:, :0]
    x["routed"] = torch.full_like(x["routed"], -1)
    dev = DEV if backend == "triton" else "cpu"
    pos, kw = split(x, opts, device=dev)
    out, lse = moc_attention(*pos, **kw, backend=backend)
    ref, ref_lse = lk.paged_attention(*pos, k_new=kw["k_new"], v_new=kw["v_new"],
                                      page_shift=kw["page_shift"], backend="torch")
    assert max_err(out.cpu(), ref.cpu()) < 1e-5 and max_err(lse.cpu(), ref_lse.cpu()) < 1e-5


def test_select_nothing_equals_mandatory_only():
    x, opts = make_case(N=20, causal=False)
    pos, kw = split({**x, "routed": torch.full_like(x["routed"], -1)}, opts)
    out, lse = moc_attention(*pos, **kw, backend="torch")
    ref, ref_lse = lk.paged_attention(*pos, k_new=kw["k_new"], v_new=kw["v_new"],
                                      page_shift=kw["page_shift"], backend="torch")
    assert max_err(out, ref) < 1e-6 and max_err(lse, ref_lse) < 1e-6


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rows_that_see_no_key(backend):
    """No mandatory page, no new keys, and one head routed nowhere: zeros and lse = -inf."""
    x, opts = make_case(N=16, Hq=2, Hkv=1, new=False, shifts=False, empty=False)
    x["page_table"][:] = -1
    x["routed"][:, :, 1] = -1
    pos, kw = split(x, opts, device=DEV if backend == "triton" else "cpu")
    out, lse = moc_attention(*pos, **kw, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, 1]).all()
    assert torch.isfinite(lse[:, 0]).all() and not torch.isnan(out).any()


def test_routed_order_and_holes_do_not_matter():
    x, opts = make_case(N=33, k=3, C=6)
    pos, kw = split(x, opts)
    out, lse = moc_attention(*pos, **kw, backend="torch")
    kw["routed"] = kw["routed"].flip(-1).contiguous()
    out2, lse2 = moc_attention(*pos, **kw, backend="torch")
    assert max_err(out, out2) < 1e-6 and max_err(lse, lse2) < 1e-6


def test_custom_op_opcheck_and_compile():
    from lol_kernels.moc.moc_attention_op import _moc_attention_op
    x, opts = make_case(N=20, Hq=2, Hkv=1)
    pos, kw = split(x, opts)
    t = opts["table"]
    args = (*pos[:7], t.freqs, t.pair_axis, kw["chunk_pages"], kw["routed"], kw["k_new"],
            kw["v_new"], False, kw["page_shift"], kw["chunk_shift"], 0.25, 16, "torch")
    torch.library.opcheck(_moc_attention_op, args,
                          test_utils=("test_schema", "test_faketensor"))

    def f(q):
        return moc_attention(q, *pos[1:], **kw, backend="torch")[0]

    ref = f(pos[0])
    got = torch.compile(f, backend="eager", fullgraph=False)(pos[0])
    assert max_err(got, ref) == 0.0


def test_tile_means():
    q = torch.randn(2, 37, 3, 8)
    m = tile_means(q, 16)
    assert m.shape == (2, 3, 3, 8) and m.dtype == torch.float32
    assert torch.allclose(m[:, 0], q[:, :16].mean(1))
    assert torch.allclose(m[:, 2], q[:, 32:].mean(1))  # partial tile: its 5 real tokens only


def test_moc_route_tiles_feeds_attention():
    pytest.importorskip("lol_kernels.moc.moc_route_op")
    from lol_kernels.moc.moc_attention_op import moc_route_tiles
    x, opts = make_case(N=40, Hq=4, Hkv=2, C=6, k=2)
    cm = torch.randn(2, 6, 2, 16)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    idx = moc_route_tiles(x["q"], cm, 2, tile_size=16, chunk_valid=valid, backend="torch")
    assert idx.shape == (2, 3, 4, 2) and idx.dtype == torch.int32
    # by hand: top-2 dot products of tile means with the chunk mean of the reading KV head
    qm = tile_means(x["q"], 16)
    s = torch.einsum("bthd,bchd->bthc", qm, cm.repeat_interleave(2, dim=2))
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    want = s.topk(2, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.long(), want)
    assert (idx[1] < 4).all()
    pos, kw = split({**x, "routed": idx}, opts)
    moc_attention(*pos, **kw, backend="torch")


BAD = {
    "routed-T": (lambda x: x.update(routed=x["routed"][:, :1]), ValueError, "routed"),
    "routed-dup": (lambda x: x["routed"].__setitem__((0, 0, 0), 1), ValueError, "twice"),
    "routed-range": (lambda x: x["routed"].__setitem__((0, 0, 0, 0), 99), ValueError, "routed"),
    "routed-float": (lambda x: x.update(routed=x["routed"].float()), TypeError, "routed"),
    "chunk-page-range": (lambda x: x["chunk_pages"].__setitem__((0, 0, 0), 10**6), ValueError,
                         "chunk_pages"),
    "chunk-overlaps-mandatory": (lambda x: x["chunk_pages"].__setitem__(
        (0, 0, 0), x["page_table"][0, 0]), ValueError, "disjoint"),
    "chunk-shift-shape": (lambda x: x.update(chunk_shift=x["chunk_shift"][:, :1]), ValueError,
                          "chunk_shift"),
    "chunk-pages-batch": (lambda x: x.update(chunk_pages=x["chunk_pages"][:1]), ValueError,
                          "chunk_pages"),
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
def test_bad_inputs(bad):
    x, opts = make_case(N=20, empty=False)
    fn, exc, word = BAD[bad]
    fn(x)
    pos, kw = split(x, opts)
    with pytest.raises(exc, match=word):  # value checks run when asked (validate=True)
        moc_attention(*pos, **kw, validate=True)


@pytest.mark.parametrize("tile", [0, 8, 24, 16.0], ids=str)
def test_bad_tile_size(tile):
    x, opts = make_case(N=20)
    pos, kw = split(x, opts)
    kw["tile_size"] = tile
    with pytest.raises(ValueError, match="tile_size"):
        moc_attention(*pos, **kw)


def test_bad_backend():
    x, opts = make_case(N=20)
    pos, kw = split(x, opts)
    with pytest.raises(ValueError, match="backend"):
        moc_attention(*pos, **kw, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_path_chunks_on_consecutive_pages(dtype):
    """Chunks whose pages are consecutive in the pool are read in place (views): same result."""
    x, opts = make_case(N=40, Hq=4, Hkv=2, C=4, Pc=2, causal=True)
    B, M = x["page_table"].shape
    base = B * M  # pages [base, base + B * C * Pc) hold the chunks, consecutive per chunk
    x["page_table"] = torch.arange(B * M, dtype=torch.int32).view(B, M)
    x["chunk_pages"] = (base + torch.arange(B * 4 * 2, dtype=torch.int32)).view(B, 4, 2)
    p64, k64 = split(x, opts, torch.float64)
    ref64, lse64 = moc_attention_reference(*p64, **k64)
    pos, kw = split(x, opts, dtype)
    ref_lo, lse_lo = moc_attention_reference(*pos, **kw)
    out, lse = moc_attention_torch(*pos, **kw)
    assert_close_rule(out, ref_lo, ref64)
    assert_close_rule(lse, lse_lo, lse64, what="lse")


def test_torch_path_fast_case_no_masks():
    """Full pages, no holes: the unmasked flash branch of the CPU path."""
    x, opts = make_case(N=48, empty=False, k=2, C=4)
    x["page_len"][:] = x["cache_k"].shape[1]
    pos, kw = split(x, opts)
    out, lse = moc_attention_torch(*pos, **kw)
    ref, ref_lse = moc_attention_reference(*split(x, opts, torch.float64)[0],
                                           **split(x, opts, torch.float64)[1])
    assert max_err(out, ref) < 1e-5 and max_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["fp32", "fp64", "fp16"])
def test_torch_path_batched_groups_equal_one_call_each(monkeypatch, dtype):
    """The CPU path attends a (head, chunk) group of tiles with one call, or batches groups of
    one size into one call (from BATCH_ROWS query rows on): both match the reference."""
    from lol_kernels.moc import moc_attention_cpu

    x, opts = make_case(N=150, Hq=4, Hkv=2, C=6, Pc=2, k=3, tile=16, causal=True)
    pos, kw = split(x, opts, dtype)
    ref64, lse64 = moc_attention_reference(*split(x, opts, torch.float64)[0],
                                           **split(x, opts, torch.float64)[1])
    ref_lo, lse_lo = moc_attention_reference(*pos, **kw)
    outs = []
    for rows in (10**9, 0):  # every group on its own, then every group batched
        monkeypatch.setattr(moc_attention_cpu, "BATCH_ROWS", rows)
        out, lse = moc_attention_torch(*pos, **kw)
        assert_close_rule(out, ref_lo, ref64)
        assert_close_rule(lse, lse_lo, lse64, what="lse")
        outs.append(out)
    assert max_err(outs[0], outs[1]) < (1e-12 if dtype == torch.float64 else 1e-2)


AOT_SKIP = None
try:
    from lol_kernels.common import aot as _aot
    if not os.path.exists(_aot.tool("cuobjdump")):
        AOT_SKIP = "triton wheel without the NVIDIA backend binaries"
except Exception as e:  # triton missing
    AOT_SKIP = str(e)


@pytest.mark.skipif(AOT_SKIP is not None, reason=str(AOT_SKIP))
def test_sm90_compile_no_spills_hgmma():
    """Every autotune config at D = 64 and 128 (bf16), and the narrow config fp32 inputs keep
    at D = 64 (3xTF32 products, as the paged kernel), compiles for sm_90 (no GPU needed): no
    stack or local memory, tensor-core HGMMA, no calls. About a minute on 2 cores."""
    from lol_kernels.common.aot import sm90_report
    from lol_kernels.common.triton_attention import CONFIGS
    report = sm90_report(("bf16",), (64, 128), kernel="moc_attn_fwd", rope=False, causal=False,
                         page_size=256, offered=(("fp32", 64),))
    assert len(report) == 2 * len(CONFIGS) + sum(c[1] <= 32 for c in CONFIGS)
    for r in report:
        name = f"{r['dtype']}-D{r['head_dim']}-M{r['BLOCK_M']}-N{r['BLOCK_N']}-w{r['num_warps']}"
        assert r["stack"] == 0 and r["local"] == 0 and r["local_ldst"] == 0, f"{name} spills"
        assert r["hgmma"] > 0, f"{name} has no HGMMA"
        assert r["calls"] == 0 and r["registers"] <= 255, name
