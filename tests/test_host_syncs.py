"""No host sync on the hot path (issue 13): every op call and a cache write read no tensor value
on the host, so a block step can be compiled whole and captured as a CUDA graph.

There is no GPU here, so :class:`SyncCounter` counts what *would* block the host on one:

* dispatched ops that read a value or size the host must know (``_local_scalar_dense``: every
  ``.item()``, ``int(t)``, ``bool(t)``, tensor-valued ``if``; ``is_nonzero``, ``equal``,
  ``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave``
  without ``output_size``);
* conversions done in Python that on a GPU copy device -> host (``.tolist()``, ``.cpu()``,
  ``.numpy()``; the CPU runs them without any dispatched op, so they are patched);
* tensors built from Python data (``torch.tensor(list)``: ``lift_fresh``), a blocking
  host -> device copy on a GPU.

Only calls made by ``lol_kernels``/``lol_model`` count: the Triton interpreter, which stands in
for the GPU here, reads its arguments on the host by design. The custom ops' bodies are entered
(the mode sees inside them), so a Triton launch is counted from the public call to the kernel.

Value checks run when asked (``validate=True`` or ``LOL_VALIDATE=1``); the last tests show
that they still refuse bad data, and that the cache checks what it creates.
"""

from __future__ import annotations

import collections
import math
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lol_kernels as lk
from lol_kernels.attention import triton_available
from lol_kernels.cache import SlowFastCache

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
            aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default, aten.masked_select.default,
            aten.repeat_interleave.Tensor}
H2D_OPS = {aten.lift_fresh.default}
OURS = ("lol_kernels", "lol_model")


def caller() -> str | None:
    """``module:line`` of the innermost frame of our packages, if the call came from one
    (``None`` when the nearest non-torch frame is the Triton interpreter or a test)."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod.startswith(OURS):
            return f"{mod}:{f.f_lineno}"
        if not (mod.startswith("torch") or mod == __name__ or mod.startswith("contextlib")):
            return None
        f = f.f_back
    return None


class SyncCounter(TorchDispatchMode):
    """Count would-be host syncs (module doc) made by our code while active; ``.events`` maps
    ``"kind op @ module:line"`` to its count, ``.total`` sums them."""

    PATCHED = ("tolist", "cpu", "numpy")

    def __init__(self, *, enter_ops: bool = True):
        super().__init__()
        self.events = collections.Counter()
        self.enter_ops = enter_ops
        self._saved = {}
        self._depth = 0  # nesting: a custom op's body re-enters the mode
        self._opaque = 0  # > 0 while a custom op runs unobserved

    @property
    def total(self) -> int:
        return sum(self.events.values())

    def note(self, what: str):
        where = None if self._opaque else caller()
        if where is not None:
            self.events[f"{what} @ {where}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lol" and self.enter_ops:  # its Python body, with the mode on
            opdef = torch._library.custom_ops.OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        if func.namespace == "lol":  # one opaque call
            self._opaque += 1
            try:
                return func(*args, **kwargs)
            finally:
                self._opaque -= 1
        if func in SYNC_OPS and not (func is aten.repeat_interleave.Tensor
                                     and kwargs.get("output_size") is not None):
            self.note(f"sync {func}")
        elif func in H2D_OPS:
            self.note(f"h2d {func}")
        elif func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.note("sync boolean-mask index")
        return func(*args, **kwargs)

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            for name in self.PATCHED:
                orig = self._saved[name] = getattr(torch.Tensor, name)

                def patched(t, *a, _orig=orig, _name=name, **kw):
                    self.note(f"d2h Tensor.{_name}")
                    return _orig(t, *a, **kw)
                setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            for name, orig in self._saved.items():
                setattr(torch.Tensor, name, orig)
            self._saved = {}
        return out


def count_syncs(fn, *args, enter_ops: bool = True, **kwargs):
    """``(result, counter)`` of one call of ``fn`` under a :class:`SyncCounter`."""
    with SyncCounter(enter_ops=enter_ops) as c:
        out = fn(*args, **kwargs)
    return out, c


# ------------------------------------------------------------------------------ inputs
D, A, S, TILE = 16, 3, 16, 16


def paged_case(B=2, N=20, Hq=4, Hkv=2, P=10, M=4, C=3, Pc=1, k=2, seed=0):
    """Inputs of paged and MoC attention as the cache builds them (disjoint pages, shifts)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randperm(P, generator=g).int()
    pt = torch.full((B, M), -1, dtype=torch.int32)
    pt[:, :M - 1] = pages[:M - 1]
    cp = pages[M - 1 : M - 1 + C * Pc].view(1, C, Pc).expand(B, -1, -1).contiguous()
    x = dict(q=torch.randn(B, N, Hq, D, generator=g),
             q_pos=torch.randint(0, 40, (B, N, A), generator=g, dtype=torch.int32),
             cache_k=torch.randn(P, S, Hkv, D, generator=g),
             cache_v=torch.randn(P, S, Hkv, D, generator=g),
             cache_pos=torch.randint(0, 40, (P, S, A), generator=g, dtype=torch.int32),
             page_len=torch.randint(1, S + 1, (P,), generator=g, dtype=torch.int32),
             page_table=pt, table=lk.rope_frequencies(D, Hq, jitter_sigma=0.5),
             page_shift=torch.randint(-3, 4, (B, M, A), generator=g, dtype=torch.int32),
             k_new=torch.randn(B, N, Hkv, D, generator=g),
             v_new=torch.randn(B, N, Hkv, D, generator=g))
    T = math.ceil(N / TILE)
    routed = torch.stack([torch.randperm(C, generator=g)[:k].sort().values
                          for _ in range(B * T * Hq)]).view(B, T, Hq, k).int()
    moc = dict(chunk_pages=cp, routed=routed, tile_size=TILE,
               chunk_shift=torch.randint(-3, 4, (B, C, A), generator=g, dtype=torch.int32))
    return x, moc


def op_calls(backend: str):
    """``name -> zero-argument call`` of every hot-path op on ``backend``."""
    x, moc = paged_case()
    q, kv = x["q"], x["k_new"]
    chunk_mean = torch.randn(2, moc["chunk_pages"].shape[1], 2, D)
    return {
        "paged_attention": lambda: lk.paged_attention(**x, backend=backend),
        "moc_attention": lambda: lk.moc_attention(**x, **moc, backend=backend),
        "rope_attention": lambda: lk.rope_attention(q, kv, x["v_new"], x["q_pos"], x["q_pos"],
                                                    x["table"], causal=True, backend=backend),
        "apply_rope": lambda: lk.apply_rope(q, x["q_pos"], x["table"], backend=backend),
        "moc_route_tiles": lambda: lk.moc_route_tiles(q, chunk_mean, 2, tile_size=TILE),
    }


OPS = list(op_calls("torch"))


def triton_here() -> bool:
    return triton_available() and not torch.cuda.is_available()


# ------------------------------------------------------------------------------ the counts
@pytest.mark.parametrize("op", OPS)
def test_op_makes_no_host_sync_torch_backend(op):
    """The public call (checks, table, dispatch) up to the CPU path's body: 0 syncs."""
    fn = op_calls("torch")[op]
    fn()  # first call: imports, memoized tables
    _, c = count_syncs(fn, enter_ops=False)
    assert c.total == 0, dict(c.events)


@pytest.mark.skipif(not triton_here(), reason="needs Triton (interpreter on a CPU machine)")
@pytest.mark.parametrize("op", OPS)
def test_op_makes_no_host_sync_triton_backend(op):
    """What a GPU runs, from the public call through the launcher to the kernel: 0 syncs."""
    fn = op_calls("triton")[op]
    fn()
    _, c = count_syncs(fn)
    assert c.total == 0, dict(c.events)


def tiny_cache(**kw):
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
              window_frames=2, block_frames=2, page_size=16) | kw
    return lk.PagedKVCache(**kw)


@pytest.mark.parametrize("cls", ["paged", "slowfast"])
def test_cache_write_makes_no_host_sync(cls):
    cache = tiny_cache() if cls == "paged" else SlowFastCache(
        num_layers=2, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
        window_frames=2, slow_frames=2, block_frames=2, page_size=16, routed=True)
    for i in range(4):
        blk = cache.append_frames(lk.token_positions(torch.arange(2) + 2 * i, 4, 5))
        k, v = torch.randn(1, 40, 2, D), torch.randn(1, 40, 2, D)
        _, c = count_syncs(cache.write, 0, blk, k, v)
        assert c.total == 0, dict(c.events)
        cache.write(1, blk, k, v)


# ------------------------------------------------------------------------------ validation mode
def bad_page(x, moc):
    x["page_table"][0, 0] = x["cache_k"].shape[0] + 5


BAD = {  # name -> (edit of the paged inputs, op, the argument the error names)
    "page-id": (bad_page, "paged_attention", "page_table holds page ids"),
    "page-twice": (lambda x, moc: x["page_table"][1].fill_(int(x["page_table"][1, 0])),
                   "paged_attention", r"page_table\[1\] lists a page twice"),
    "position": (lambda x, moc: x["q_pos"].__setitem__((0, 0, 0), 2**31 - 1), "paged_attention",
                 "q_pos must hold positions"),
    "routed-range": (lambda x, moc: moc["routed"].__setitem__((0, 0, 0, 0), 7),
                     "moc_attention", "routed holds chunk ids"),
    "chunk-shared": (lambda x, moc: moc["chunk_pages"].__setitem__((0, 0, 0),
                                                                    x["page_table"][0, 0]),
                     "moc_attention", "disjoint"),
}


@pytest.mark.parametrize("how", ["validate=True", "LOL_VALIDATE=1"])
@pytest.mark.parametrize("case", list(BAD))
def test_validation_mode_still_refuses_bad_data(case, how, monkeypatch):
    edit, op, needle = BAD[case]
    x, moc = paged_case()
    edit(x, moc)
    kw = dict(x, **moc) if op == "moc_attention" else x
    if how == "validate=True":
        kw["validate"] = True
    else:
        monkeypatch.setenv("LOL_VALIDATE", "1")
    with pytest.raises(ValueError, match=needle):
        getattr(lk, op)(**kw, backend="torch")


def test_validation_is_off_by_default_and_costs_syncs_when_on(monkeypatch):
    monkeypatch.delenv("LOL_VALIDATE", raising=False)
    x, _ = paged_case()
    lk.paged_attention(**x, backend="torch")
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", enter_ops=False)
    assert c.total == 0
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", validate=True, enter_ops=False)
    assert 0 < c.total <= 6, dict(c.events)  # one sync per checked range
    monkeypatch.setenv("LOL_VALIDATE", "0")
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", enter_ops=False)
    assert c.total == 0
    with pytest.raises(TypeError, match="validate must be a bool"):
        lk.paged_attention(**x, backend="torch", validate="yes")


@pytest.mark.parametrize("cls", ["paged", "slowfast"])
def test_tables_the_cache_builds_pass_validation(cls):
    """What the ops no longer check on every call, the cache guarantees where it creates it."""
    kw = dict(num_layers=1, num_kv_heads=2, head_dim=D, frame_tokens=20, sink_frames=1,
              window_frames=2, block_frames=2, page_size=16)
    cache = lk.PagedKVCache(**kw) if cls == "paged" else SlowFastCache(slow_frames=3, tau=1.0,
                                                                        routed=True, **kw)
    table = lk.rope_frequencies(D, 4)
    for _ in range(8):
        rd = cache.read(2)
        q = torch.randn(1, 40, 4, D)
        pos = lk.token_positions(rd.q_t, 4, 5)
        args = (q, pos, cache.k[0], cache.v[0], cache.pos, cache.page_len, rd.page_table, table)
        if rd.routed:
            routed = torch.full((1, 3, 4, 2), -1, dtype=torch.int32)
            routed[..., : min(2, len(rd.chunk_ids))] = torch.arange(min(2, len(rd.chunk_ids)),
                                                                    dtype=torch.int32)
            lk.moc_attention(*args, chunk_pages=rd.chunk_pages, routed=routed,
                             page_shift=rd.page_shift, chunk_shift=rd.chunk_shift, tile_size=16,
                             validate=True)
        else:
            lk.paged_attention(*args, page_shift=rd.page_shift, validate=True)
        blk = cache.append_frames(lk.token_positions(rd.q_t, 4, 5))
        cache.write(0, blk, torch.randn(1, 40, 2, D), torch.randn(1, 40, 2, D))
    assert cache.frames_written == 16


# ------------------------------------------------------------------------------ caller buffers
@pytest.mark.skipif(not triton_here(), reason="needs Triton (interpreter on a CPU machine)")
@pytest.mark.parametrize(("name", "make", "exc", "needle"), [
    ("out", lambda q: torch.empty(q.shape[:-1] + (8,)), ValueError, "out must have shape"),
    ("out", lambda q: torch.empty(q.shape, dtype=torch.float16), TypeError, "out must have dtype"),
    ("out", lambda q: torch.empty(*q.shape[:-1], 2 * q.shape[-1])[..., ::2], ValueError,
     "unit stride"),
    ("lse", lambda q: torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float64),
     TypeError, "lse must have dtype"),
    ("lse", lambda q: torch.empty(q.shape[0], q.shape[1], q.shape[2]), ValueError,
     "lse must have shape"),
    ("out", lambda q: q.shape, TypeError, "out must be a torch.Tensor"),
])
def test_caller_buffers_are_checked(name, make, exc, needle):
    from lol_kernels.attention.attention_triton import paged_attention_triton

    x, _ = paged_case()
    x.pop("table")
    table = lk.rope_frequencies(D, 4, jitter_sigma=0.5)
    with pytest.raises(exc, match=needle):
        paged_attention_triton(*list(x.values())[:7], table, k_new=x["k_new"],
                               v_new=x["v_new"], **{name: make(x["q"])})


@pytest.mark.parametrize("cache", ["longlive", "moc"])
def test_model_step_makes_no_host_sync(cache):
    """A whole cached forward (all layers, the write pass included) outside the ops' bodies:
    what a CUDA graph captures around the kernels."""
    from lol_model.model.transformer import cache_pools
    from lol_model.streaming.settings import StreamSettings
    from lol_model.streaming.stream import advance, new_stream

    st = new_stream(StreamSettings(blocks=6, cache=cache, decode=False))
    for _ in range(5):
        advance(st)
    rd = st.cache_cfg.read(st.cache, 3)
    x = torch.randn(st.latent_shape)
    t = torch.full((1, 3), 500.0)
    inputs = st.model.prepare(x, st.text_kv, st.cache, rd)
    pools = cache_pools(st.cache)
    _, c = count_syncs(st.model.step, x, t, st.text_kv.k, st.text_kv.v, pools, inputs,
                       enter_ops=False)
    assert c.total == 0, dict(c.events)
    blk = st.cache.append_frames(lk.token_positions(rd.q_t, 4, 4))
    inputs = st.model.prepare(x, st.text_kv, st.cache, rd, write=blk)
    _, c = count_syncs(st.model.step, x, t * 0, st.text_kv.k, st.text_kv.v, pools, inputs,
                       enter_ops=False)
    assert c.total == 0, dict(c.events)
