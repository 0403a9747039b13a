"""Hostile-but-realistic inputs of the ops and the cache, shared by each op folder's
``test_reliability.py``: every empty dimension of every op and backend reachable on the CPU
(run in a forked child, so a regression that kills the process fails one case instead of the
session), positions the kernels cannot represent in int32, bad ``scale`` values, a page listed
twice, the inputs of the autograd checks, and the checks the op folders' tests share."""

import math
import multiprocessing
import traceback

import pytest
import torch

import lol_kernels as lk
from lol_kernels.attention import paged_attention_reference
from lol_kernels.moc import moc_attention_reference, moc_route_reference
from lol_kernels.rope import RopeTable

D, S, A, TILE = 16, 16, 3, 16
SIZES = dict(B=2, N=5, H=2, Hkv=1, Nk=5, M=3, P=6, C=2, Pc=1, k=2, T=2)


def table_for(H: int) -> RopeTable:
    """A jittered table with ``H`` rows (``H = 0`` cut from a one-head table)."""
    t = lk.rope_frequencies(D, max(H, 1), jitter_sigma=0.5, seed=3)
    return t if H else RopeTable.from_tensors(t.freqs[:0], t.pair_axis)


def paged_inputs(z: dict, with_new: bool = True, moc: bool = False):
    B, N, H, M, P, Hkv = z["B"], z["N"], z["H"], z["M"], z["P"], z["Hkv"]
    x = dict(q=torch.randn(B, N, H, D), q_pos=torch.randint(0, 50, (B, N, A)),
             cache_k=torch.randn(P, z.get("S", S), Hkv, D),
             cache_v=torch.randn(P, z.get("S", S), Hkv, D),
             cache_pos=torch.randint(0, 50, (P, z.get("S", S), A)),
             page_len=torch.full((P,), z.get("S", S), dtype=torch.int32))
    pages = torch.randperm(P)
    mand = min(M, P // 2) if moc else min(M, P)
    pt = torch.full((B, M), -1, dtype=torch.int32)
    pt[:, :mand] = pages[:mand].int()
    x["page_table"], x["table"] = pt, table_for(H)
    x["page_shift"] = torch.randint(-3, 4, (B, M, A))
    if with_new:
        x["k_new"], x["v_new"] = torch.randn(B, N, Hkv, D), torch.randn(B, N, Hkv, D)
    if moc:
        C, Pc, k = z["C"], z["Pc"], z["k"]
        cp = torch.full((B, C, Pc), -1, dtype=torch.int32)
        rest = pages[mand:]
        n = min(C * Pc, rest.numel())
        cp.view(B, C * Pc)[:, :n] = rest[:n].int()
        T = math.ceil(N / TILE)
        routed = torch.full((B, T, H, k), -1, dtype=torch.int32)
        if C:
            routed[..., : min(k, C)] = torch.arange(min(k, C), dtype=torch.int32)
        x.update(chunk_pages=cp, routed=routed, chunk_shift=torch.randint(-3, 4, (B, C, A)),
                 tile_size=TILE)
    return x


def attention_want(q, ref_fn, x):
    """The fp64 reference of an attention call, or for an empty ``q`` the empty outputs."""
    if q.numel() == 0:
        B, N, H, _ = q.shape
        return q.new_zeros(q.shape), torch.zeros(B, H, N)
    return ref_fn(**{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                         else t) for n, t in x.items()})


def run_paged(z, backend, with_new=True):
    x = paged_inputs(z, with_new)
    return lk.paged_attention(**x, backend=backend), \
        attention_want(x["q"], paged_attention_reference, x)


def run_moc(z, backend):
    x = paged_inputs(z, moc=True)
    return lk.moc_attention(**x, backend=backend), \
        attention_want(x["q"], moc_attention_reference, x)


def run_dense(z, backend):
    B, N, H, Nk, Hkv = z["B"], z["N"], z["H"], z["Nk"], z["Hkv"]
    q, k, v = torch.randn(B, N, H, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D)
    qp, kp = torch.randint(0, 50, (B, N, A)), torch.randint(0, 50, (B, Nk, A))
    tab = table_for(H)
    got = lk.rope_attention(q, k, v, qp, kp, tab, backend=backend, return_lse=True)
    # the same attention as a paged call with an empty cache and the keys as the new block
    pool = torch.zeros(0, S, Hkv, D)
    x = dict(q=q, q_pos=qp, cache_k=pool, cache_v=pool, cache_pos=torch.zeros(0, S, A).int(),
             page_len=torch.zeros(0).int(), page_table=torch.zeros(B, 0).int(), table=tab,
             k_new=k, v_new=v)
    if Nk == 0:  # no key: zeros and -inf
        return got, (q.new_zeros(q.shape), torch.full((B, H, N), float("-inf")))
    return got, attention_want(q, paged_attention_reference, x)


def run_rope(z, backend):
    B, N, H = z["B"], z["N"], z["H"]
    x, pos = torch.randn(B, N, H, D), torch.randint(0, 50, (B, N, A))
    return (lk.apply_rope(x, pos, table_for(H), backend=backend),), \
        (lk.apply_rope(x, pos, table_for(H), backend="torch"),)


def run_route(z, backend):
    B, T, H, C = z["B"], z["T"], z["H"], z["C"]
    qm, cm = torch.randn(B, T, H, D), torch.randn(B, C, H, D)
    return (lk.moc_route(qm, cm, 2, backend=backend),), (moc_route_reference(qm, cm, 2),)


def run_route_tiles(z, backend):
    B, N, H, C = z["B"], z["N"], z["H"], z["C"]
    q, cm = torch.randn(B, N, H, D), torch.randn(B, C, z.get("Hc", 1), D)
    idx = lk.moc_route_tiles(q, cm, 2, tile_size=TILE, backend=backend)
    qm = lk.moc.tile_means(q, TILE)
    return (idx,), (moc_route_reference(qm, cm.expand(-1, -1, H, -1), 2),)


def run_tile_means(z, backend):
    B, N, H = z["B"], z["N"], z["H"]
    q = torch.randn(B, N, H, D)
    T = math.ceil(N / TILE)
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, T * TILE - N)).view(B, T, TILE, H, D)
    cnt = torch.clamp(N - torch.arange(T) * TILE, max=TILE).view(1, T, 1, 1)
    return (lk.moc.tile_means(q, TILE),), (qp.sum(2) / cnt,)


def run_cache(z, backend):
    """Attention over a fresh (empty) cache: an M = 0 read; or a routed slow-fast read with no
    slow frames (C = 0 chunks)."""
    kw = dict(num_layers=1, num_kv_heads=1, head_dim=D, frame_tokens=8, page_size=S,
              sink_frames=1, window_frames=2, block_frames=1, batch_size=z["B"])
    H, N = z["H"], 8
    if z["what"] == "append0":
        lk.PagedKVCache(**kw).append_frames(torch.zeros(z["B"], 0, A, dtype=torch.int32))
    c = lk.cache.SlowFastCache(**kw, slow_frames=2, routed=True) if z["what"] == "slow" else \
        lk.PagedKVCache(**kw)
    rd = c.read(1)
    q, kn, vn = torch.randn(z["B"], N, H, D), torch.randn(z["B"], N, 1, D), torch.randn(
        z["B"], N, 1, D)
    qp = torch.zeros(z["B"], N, A, dtype=torch.int32)
    args = (q, qp, c.k[0], c.v[0], c.pos, c.page_len, rd.page_table, table_for(H))
    kws = dict(k_new=kn, v_new=vn, page_shift=rd.page_shift)
    ref = paged_attention_reference(*args, **kws)
    if z["what"] == "slow":
        idx = lk.moc_route_tiles(q, rd.chunk_mean(c, 0), 2, tile_size=TILE,
                                 chunk_valid=rd.chunk_valid)
        got = lk.moc_attention(*args, **kws, chunk_pages=rd.chunk_pages, routed=idx,
                               chunk_shift=rd.chunk_shift, tile_size=TILE, backend=backend)
    else:
        got = lk.paged_attention(*args, **kws, backend=backend)
    return got, ref


OPS = {  # op -> (runner, empty dims, backends)
    "apply_rope": (run_rope, ("B", "N", "H"), ("torch", "triton")),
    "paged_attention": (run_paged, ("B", "N", "H", "Hkv", "M", "P", "S"), ("torch", "triton")),
    "paged_attention/no_k_new": (lambda z, b: run_paged(z, b, with_new=False),
                                 ("B", "N", "H", "M", "P", "S"), ("torch", "triton")),
    "rope_attention": (run_dense, ("B", "N", "H", "Hkv", "Nk"), ("torch", "triton")),
    "moc_attention": (run_moc, ("B", "N", "H", "Hkv", "M", "P", "C", "Pc", "k"),
                      ("torch", "triton")),
    "moc_route": (run_route, ("B", "T", "H", "C"), ("torch", "cpp")),
    "moc_route_tiles": (run_route_tiles, ("B", "N", "H", "C", "Hc"), ("torch", "cpp")),
    "tile_means": (run_tile_means, ("B", "N", "H"), ("torch",)),
    "cache": (run_cache, ("fresh", "slow", "append0"), ("torch", "triton")),
}
#: (op, empty dim) -> the argument a ValueError must name (no answer exists)
NO_ANSWER = {("cache", "append0"): "pos", ("paged_attention", "Hkv"): "cache_k",
             ("rope_attention", "Hkv"): "k", ("moc_attention", "Hkv"): "cache_k",
             ("moc_route_tiles", "Hc"): "chunk_mean"}
EMPTY_CASES = [(op, dim, be) for op, (_, dims, bes) in OPS.items() for dim in dims for be in bes]


def child_body(send, fn, *args):
    torch.set_num_threads(1)  # no OpenMP region in a forked child (it may hang after a fork)
    try:
        send.send(("ok", fn(*args)))
    except Exception as e:  # reported to the parent, which asserts on it
        send.send(("raised", type(e).__name__, str(e) + "\n" + traceback.format_exc()))


def in_child(fn, *args):
    """``fn(*args)`` in a child process; returns ``("ok", value)`` or ``("raised", type, msg)``,
    or ``("died", exitcode)`` when the child is killed (a SIGFPE in a kernel).

    The child runs single-threaded: OpenMP may hang in a child forked after the parent ran a
    parallel region."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child_body, args=(send, fn, *args))
    p.start()
    send.close()  # the child holds the only writer: a dead child reads as EOF at once
    try:
        got = recv.recv() if recv.poll(300) else None
    except EOFError:
        got = None
    p.join(10)
    return got if got is not None else ("died", p.exitcode)


def check_empty(op, dim, backend):
    """Runs in the child: the op's outputs and their agreement with the reference."""
    runner = OPS[op][0]
    z = dict(SIZES, what=dim)
    if dim in z or dim == "Hc":
        z[dim] = 0
    got, ref = runner(z, backend)
    errs = []
    for g, r in zip(got, ref, strict=True):
        g, r = g.double(), r.double()
        same_inf = torch.isinf(g) & torch.isinf(r) & (g.sign() == r.sign())
        errs.append(float(torch.where(same_inf, 0.0, (g - r).abs()).max()) if g.numel() else 0.0)
    return {"shapes": [tuple(t.shape) for t in got], "ref_shapes": [tuple(t.shape) for t in ref],
            "err": max(errs)}


def empty_cases(*ops: str) -> list[tuple[str, str, str]]:
    """``(op, empty dimension, backend)`` of every empty-dimension case of ``ops``."""
    return [case for case in EMPTY_CASES if case[0] in ops]


def check_every_empty_dimension(op, dim, backend):
    """``op`` with ``dim = 0`` on ``backend`` gives the reference's empty (or -inf) result, or
    a ``ValueError`` naming the argument where no answer exists; it never kills the process."""
    if backend == "cpp" and lk.moc.extension_error() is not None:
        pytest.skip("C++ extension not built")
    got = in_child(check_empty, op, dim, backend)
    assert got[0] != "died", f"{op} with {dim} = 0 killed the process (exit {got[1]})"
    if (op, dim) in NO_ANSWER:
        assert got[0] == "raised" and got[1] == "ValueError", got
        assert NO_ANSWER[op, dim] in got[2].splitlines()[0], got[2]
        return
    assert got[0] == "ok", f"{op} with {dim} = 0 raised {got[1]}: {got[2]}"
    rep = got[1]
    assert rep["shapes"] == rep["ref_shapes"]
    assert rep["err"] < 1e-4, rep


def set_pos(name, value):
    def edit(x):
        x[name] = x[name].long()
        x[name].view(-1)[0] = value
    return edit


BAD_POSITIONS = {  # paged/moc input edit -> the argument the error names
    "q_pos-2^31": (set_pos("q_pos", 2**31), "q_pos"),
    "q_pos-2^32+5": (set_pos("q_pos", 2**32 + 5), "q_pos"),
    "cache_pos-2^30+1": (set_pos("cache_pos", 2**30 + 1), "cache_pos"),
    "page_shift--2^30-1": (set_pos("page_shift", -(2**30) - 1), "page_shift"),
    "cache_pos+page_shift": (lambda x: (set_pos("cache_pos", 2**30)(x),
                                        set_pos("page_shift", 2**30)(x)), "page_shift"),
    "cache_pos+chunk_shift": (lambda x: (set_pos("cache_pos", -(2**30))(x),
                                         set_pos("chunk_shift", -(2**30))(x)), "chunk_shift"),
}


BAD_SCALES = [float("inf"), float("-inf"), float("nan"), 0.0, 0, -1.0, -1e-30, True, "1.0"]


def call_op(op, **kw):
    if op == "rope_attention":
        q, k = torch.randn(2, 5, 2, D), torch.randn(2, 5, 1, D)
        p = torch.randint(0, 9, (2, 5, A))
        return lk.rope_attention(q, k, k, p, p, table_for(2), backend="torch", **kw)
    x = paged_inputs(SIZES, moc=op == "moc_attention")
    for name, edit in kw.pop("edit", {}).items():
        edit(x[name])
    z = x | kw
    return getattr(lk, op)(**z, backend="torch", validate=True)


def dup_entry(t):
    t[0, 1] = t[0, 0]


def dup_chunk_page(t):
    t[1, 1, 0] = t[1, 0, 0]


def grad_inputs(op):
    """A function of one differentiable tensor through ``op``, and that tensor."""
    if op == "apply_rope":
        x, p = torch.randn(1, 3, 2, D), torch.randint(0, 9, (1, 3, A))
        return (lambda t: lk.apply_rope(t, p, table_for(2), backend="torch").sum()), x
    if op == "rope_attention":
        k, p = torch.randn(2, 5, 1, D), torch.randint(0, 9, (2, 5, A))
        return (lambda t: lk.rope_attention(t, k, k, p, p, table_for(2), backend="torch").sum()), \
            torch.randn(2, 5, 2, D)
    x = paged_inputs(SIZES, moc=op == "moc_attention")
    q = x.pop("q")
    return (lambda t: getattr(lk, op)(t, **x, backend="torch")[0].sum()), q


# ------------------------------------------------------------------------------ shared checks
def check_refuses_bad_position(op, case):
    """``op`` with value checks on refuses the position edit ``BAD_POSITIONS[case]``."""
    edit, name = BAD_POSITIONS[case]
    x = paged_inputs(SIZES, moc=op == "moc_attention")
    edit(x)
    with pytest.raises(ValueError, match=name):  # value checks run when asked (validate=True)
        getattr(lk, op)(**x, backend="torch", validate=True)


def check_refuses_bad_scale(op, scale):
    exc = TypeError if isinstance(scale, (bool, str)) else ValueError
    with pytest.raises(exc, match="scale must be"):
        call_op(op, scale=scale)


def check_refuses_page_listed_twice(op, name, edit):
    """``op`` refuses its input ``name`` changed by ``edit`` to list a page twice."""
    with pytest.raises(ValueError, match=f"{name}\\[\\d\\] lists a page twice"):
        call_op(op, edit={name: edit})


def check_autograd_with_backward(op, how):
    """``backward`` (``how``) gives q a finite gradient; torch.func transforms are refused by
    name."""
    fn, x = grad_inputs(op)
    if how == "backward":
        fn(x.requires_grad_()).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        return
    with pytest.raises(RuntimeError, match=f"lol::{op} does not support torch.func"):
        if how == "torch.func.grad":
            torch.func.grad(fn)(x)
        else:
            torch.func.vjp(fn, x)
