"""Counting would-be host syncs: what would block the host on a GPU, counted on the CPU.

A block step can be compiled whole and captured as a CUDA graph only if no op call and no cache
write reads a tensor value on the host. There is no GPU here, so :class:`SyncCounter` counts
what *would* block the host on one:

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

Also here: the inputs of every hot-path op (:func:`paged_case`, :func:`op_calls`), and the tests
every op folder runs on its own ops (:func:`no_host_sync_tests`, :func:`check_validation_refuses`).
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


def triton_here() -> bool:
    return triton_available() and not torch.cuda.is_available()


# ------------------------------------------------------------------------------ shared tests
def no_host_sync_tests(ops: list[str]):
    """The two no-host-sync tests of ``ops``, for a test module to bind under these names:
    the torch backend up to the CPU path's body, and the Triton backend through the launcher
    to the kernel."""

    @pytest.mark.parametrize("op", ops)
    def test_op_makes_no_host_sync_torch_backend(op):
        """The public call (checks, table, dispatch) up to the CPU path's body: 0 syncs."""
        fn = op_calls("torch")[op]
        fn()  # first call: imports, memoized tables
        _, c = count_syncs(fn, enter_ops=False)
        assert c.total == 0, dict(c.events)

    @pytest.mark.skipif(not triton_here(), reason="needs Triton (interpreter on a CPU machine)")
    @pytest.mark.parametrize("op", ops)
    def test_op_makes_no_host_sync_triton_backend(op):
        """What a GPU runs, from the public call through the launcher to the kernel: 0 syncs."""
        fn = op_calls("triton")[op]
        fn()
        _, c = count_syncs(fn)
        assert c.total == 0, dict(c.events)

    return test_op_makes_no_host_sync_torch_backend, test_op_makes_no_host_sync_triton_backend


def check_validation_refuses(edit, op: str, needle: str, how: str, monkeypatch):
    """``op`` on :func:`paged_case` inputs changed by ``edit(x, moc)``, with value checks on
    (``how``: ``"validate=True"`` or ``"LOL_VALIDATE=1"``), raises a ValueError matching
    ``needle``."""
    x, moc = paged_case()
    edit(x, moc)
    kw = dict(x, **moc) if op == "moc_attention" else x
    if how == "validate=True":
        kw["validate"] = True
    else:
        monkeypatch.setenv("LOL_VALIDATE", "1")
    with pytest.raises(ValueError, match=needle):
        getattr(lk, op)(**kw, backend="torch")
