"""The whole block step compiles and captures.

* A stream of 22 blocks (evictions from block 4, a soft prompt switch with its recache at block
  8, a position-policy change at block 11, a hard cut with KV Flush and RoPE Cut at block 14)
  runs its forwards under ``torch.compile(fullgraph=True)``: two graphs, no graph break, no
  recompile after the first block (``error_on_recompile``), the same latents as eager.
* The CUDA-graph path (``--cuda-graphs``) keeps its static buffers and the cache's pools at
  fixed addresses: its bookkeeping runs here with an eager stand-in of the capture; the real
  capture runs when CUDA is present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lol_model.streaming.forward import BlockForward, Captured, capture_eager
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream

SCHEDULE = "a fox in snow[8b] | a cat on a roof[6b] | a dog on a beach[#]"
POLICY_AT = 11  # block at which the stream's read policy changes

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def run(blocks: int, *, cache: str = "longlive", compile=None, policy=None, forward=None,
        device="cpu", **kw):
    """The clean latents of ``blocks`` blocks of the tiny model on :data:`SCHEDULE`; the read
    policy switches to ``policy`` at :data:`POLICY_AT`. ``forward(model)`` replaces the
    stream's :class:`BlockForward`. Returns ``(latents, stream)``."""
    s = StreamSettings(prompt=SCHEDULE, blocks=blocks, cache=cache, decode=False,
                       compile=compile, device=device, **kw)
    st = new_stream(s)
    if forward is not None:
        st.forward = forward(st.model)
    outs = []
    for b in range(blocks):
        if b == POLICY_AT and policy is not None:
            st.cache_cfg = dataclasses.replace(st.cache_cfg, policy=policy)
        outs.append(advance(st))
    return outs, st


def assert_same(a, b, atol=0.0):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x - y).abs().max().item() <= atol, f"block {i + 1}"


# ------------------------------------------------------------------------------ whole-step compile
@pytest.mark.parametrize(("cache", "blocks", "policy"), [
    ("longlive", 22, "relativistic"),  # LongLive recache at the soft switch
    ("sink-window", 22, "relativistic"),  # block-causal recache
    ("moc", 16, None),  # routed slow memory: MoC router + moc_attention in the graph
])
def test_block_step_compiles_whole_without_recompiles(cache, blocks, policy):
    want, _ = run(blocks, cache=cache, policy=policy)
    torch._dynamo.reset()
    counters.clear()
    s = StreamSettings(prompt=SCHEDULE, blocks=blocks, cache=cache, decode=False,
                       compile="aot_eager")
    st = new_stream(s)
    got = [advance(st)]  # warm-up: the denoising graph and the write graph
    assert counters["stats"]["unique_graphs"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in range(1, blocks):
            if b == POLICY_AT and policy is not None:
                st.cache_cfg = dataclasses.replace(st.cache_cfg, policy=policy)
            got.append(advance(st))
    c = st.cache  # frames left the window (evicted, or promoted to slow memory)
    assert c.frames_written > c.sink_frames + c.window_frames + c.block_frames
    assert st.segment == 2  # both prompt switches happened
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
    assert_same(got, want)


@pytest.mark.slow
def test_block_step_inductor():
    """One inductor run (the C++ code it generates, not only the traced graph)."""
    want, _ = run(4)
    torch._dynamo.reset()
    got, _ = run(4, compile="inductor")
    assert not counters["graph_break"]
    assert_same(got, want, atol=1e-4)


# ------------------------------------------------------------------------------ CUDA graphs
def test_captured_step_bookkeeping_on_cpu():
    """The ``--cuda-graphs`` path with an eager stand-in of the capture: two captures (denoise,
    write), static buffers and pools at fixed addresses, the same latents as eager."""
    blocks = 16
    want, _ = run(blocks)
    seen = {}

    def forward(model):
        fwd = BlockForward(model, cuda_graphs=True, capture=capture_eager)
        seen["fwd"] = fwd
        return fwd

    got, st = run(blocks, forward=forward)
    assert_same(got, want)
    fns = seen["fwd"].fns
    assert all(isinstance(f, Captured) and len(f.graphs) == 1 for f in fns.values())
    g = next(iter(fns["write"].graphs.values()))
    ptrs = {n: t.data_ptr() for n, t in g["buffers"].items()}
    assert {"x", "timestep", "inputs.slots", "inputs.fids", "inputs.page_table"} <= set(ptrs)
    advance(st)  # one more block: the same buffers, refilled in place
    assert {n: t.data_ptr() for n, t in g["buffers"].items()} == ptrs
    assert g["pools"] == Captured.addresses((st.cache.k, st.cache.v, st.cache.pos,
                                             st.cache.page_len, st.cache.summary))
    other = new_stream(dataclasses.replace(st.settings, prompt="x"))
    with pytest.raises(ValueError, match="pools moved"):
        seen["fwd"](torch.randn(st.latent_shape), torch.zeros(1, 3), st.text_kv, other.cache,
                    other.cache.read(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [None, "inductor"])
def test_cuda_graphs_on_gpu(compile):
    want, _ = run(8, device="cuda")
    got, st = run(8, device="cuda", cuda_graphs=True, compile=compile)
    assert_same(got, want, atol=1e-3)
    assert all(len(f.graphs) == 1 for f in st.forward.fns.values())
