"""The forwards of a block: eager, compiled whole, or captured once and replayed as CUDA graphs.

A block is ``steps`` denoising forwards against one cache read, then the write pass
(:mod:`lol_model.streaming.sampling`). Every cached forward splits into host work, once per read
(:meth:`~lol_model.model.CausalWanModel.prepare`: checks, the read's tensors, a few
small host -> device copies), and a tensors-only step
(:meth:`~lol_model.model.CausalWanModel.step`) that reads no value on the host and
sees the same shapes for the whole stream: page tables are padded to the cache's
``max_read_pages``, absent page shifts are zeros, the cache's pools are written in place.
:class:`BlockForward` runs that step

* eagerly (the default);
* compiled (``compile="inductor"``, ``"aot_eager"``, ...): ``torch.compile(fullgraph=True)`` of
  two functions, one for the denoising forwards and one for the write pass, so neither
  recompiles the other and a stream compiles exactly two graphs;
* replayed (``cuda_graphs=True``): each of the two (compiled or not) is captured on its first
  call, after a warm-up on a side stream (compilation, Triton autotuning); later calls copy
  their inputs into the captured static buffers (:class:`Captured`) and replay. The cache's
  pools are read and written where they are, so they must keep their addresses (a
  ``growing`` cache cannot be captured).

A recache (at a prompt switch) runs eagerly: one pass per switch with a frame count of its own.

Example::

    fwd = BlockForward(model, compile="inductor")
    x0 = denoise_block(fwd, shape, text_kv, cache, read, sigmas, gen, dtype=dt, device=dev)
    blk = write_block(fwd, x0, text_kv, cache, read)
"""

from __future__ import annotations

import torch

from ..model.transformer import StepInputs, cache_pools
from .interfaces import StreamModel

#: warm-up runs before a CUDA graph is captured (compilation, autotuning, lazy workspaces)
WARMUP = 2


def denoise_forward(model, x, timestep, text_k, text_v, pools, inputs, opts):
    """One denoising forward: :meth:`CausalWanModel.step` (the compiled/captured function)."""
    return model.step(x, timestep, text_k, text_v, pools, inputs, **opts)


def write_forward(model, x, timestep, text_k, text_v, pools, inputs, opts):
    """The write pass: the same step under a name of its own, so that its compiled code (the
    ``slots`` are set) is cached apart from :func:`denoise_forward`'s."""
    return model.step(x, timestep, text_k, text_v, pools, inputs, **opts)


def capture_cuda(run):
    """Warm ``run`` up on a side stream, then capture it into a ``torch.cuda.CUDAGraph``.

    Returns ``(replay, out)``: ``replay()`` runs the captured work again on the same buffers and
    leaves its result in ``out`` (captured, not yet run: call ``replay`` first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


def capture_eager(run):
    """The stand-in of :func:`capture_cuda` off CUDA (tests): the same static buffers and
    bookkeeping, a ``replay`` that runs ``run`` again and copies its result into ``out``."""
    out = run()

    def replay():
        out.copy_(run())

    return replay, out


class Captured:
    """``fn`` captured once per input signature and replayed from fixed input buffers.

    A call ``(model, x, timestep, text_k, text_v, pools, inputs, opts)`` flattens its tensors
    (all but the pools) by name. The first call of a signature (names, shapes, dtypes) clones
    them into static buffers and captures ``fn`` on those (``capture``: :func:`capture_cuda`,
    or :func:`capture_eager` off CUDA); every call copies its tensors into the buffers (a tensor
    that is the very one copied last time, such as the text K/V or a read shared by the
    denoising steps, is not copied again) and replays. Returns a copy of the output (the
    captured output buffer is overwritten by the next replay). The pools must be the captured
    ones at the same addresses (``ValueError`` otherwise).
    """

    def __init__(self, fn, capture):
        self.fn, self.capture = fn, capture
        self.graphs: dict[tuple, dict] = {}  # signature -> buffers, sources, pools, replay, out

    @staticmethod
    def flatten(x, timestep, text_k, text_v, inputs: StepInputs) -> dict[str, torch.Tensor]:
        """The call's tensors by name (``x``, ``timestep``, ``text_k.{i}``, ``text_v.{i}``,
        ``inputs.{field}``)."""
        flat = {"x": x, "timestep": timestep}
        flat |= {f"text_k.{i}": t for i, t in enumerate(text_k)}
        flat |= {f"text_v.{i}": t for i, t in enumerate(text_v)}
        flat |= {f"inputs.{n}": t for n, t in inputs.tensors().items()}
        return flat

    @staticmethod
    def addresses(pools) -> list[int]:
        k, v, pos, page_len, summary = pools
        return [t.data_ptr() for t in (*k, *v, pos, page_len, *summary)]

    def __call__(self, model, x, timestep, text_k, text_v, pools, inputs, opts):
        timestep = torch.as_tensor(timestep, device=x.device)
        flat = self.flatten(x, timestep, text_k, text_v, inputs)
        sig = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in flat.items())
        g = self.graphs.get(sig)
        if g is None:
            g = self.graphs[sig] = self._capture(model, flat, len(text_k), pools, inputs, opts)
        elif self.addresses(pools) != g["pools"]:
            raise ValueError("the cache's pools moved since the block step was captured (a new "
                             "or grown cache): captured steps read and write them in place")
        else:
            self.load(g, flat)
        g["replay"]()
        return g["out"].clone()

    def load(self, g: dict, flat: dict[str, torch.Tensor]) -> None:
        """Copy the call's tensors into the static buffers (skipping unchanged sources)."""
        for name, src in flat.items():
            if g["sources"].get(name) is not src:
                g["buffers"][name].copy_(src)
                g["sources"][name] = src

    def _capture(self, model, flat, layers, pools, inputs, opts) -> dict:
        buffers = {n: t.clone() for n, t in flat.items()}
        static = StepInputs(**{n: buffers.get(f"inputs.{n}") for n in
                               inputs.__dataclass_fields__})
        text_k = [buffers[f"text_k.{i}"] for i in range(layers)]
        text_v = [buffers[f"text_v.{i}"] for i in range(layers)]

        def run():
            return self.fn(model, buffers["x"], buffers["timestep"], text_k, text_v, pools,
                           static, opts)

        replay, out = self.capture(run)
        return {"buffers": buffers, "sources": dict(flat), "pools": self.addresses(pools),
                "replay": replay, "out": out}


class BlockForward:
    """Called like a :class:`~lol_model.model.CausalWanModel` on a cache (``(x,
    timestep, text_kv, cache, read, *, write=None)``); runs the step eagerly, compiled or captured
    (module doc). ``cfg`` is the model's, so the sampling functions take either.

    Args:
        model: the transformer, or its head-parallel stand-in (eager only).
        compile: a ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ``"eager"``) or
            ``None`` (no compilation).
        cuda_graphs: capture each step once and replay it (needs CUDA unless ``capture`` is
            given).
        capture: the capture function (default :func:`capture_cuda`; tests pass
            :func:`capture_eager` to run the bookkeeping on the CPU).
        **opts: keyword options of :meth:`CausalWanModel.step` (``backend``, ``moc_topk``,
            ``moc_tile_size``, ``causal_within_block``).
    """

    def __init__(self, model: StreamModel, *, compile: str | None = None,
                 cuda_graphs: bool = False, capture=None, **opts):
        self.model, self.cfg, self.opts = model, model.cfg, opts
        fns = {"denoise": denoise_forward, "write": write_forward}
        if compile:
            fns = {k: torch.compile(f, backend=compile, fullgraph=True) for k, f in fns.items()}
        if cuda_graphs:
            if capture is None and not torch.cuda.is_available():
                raise ValueError("cuda_graphs needs CUDA (a model on a CUDA device)")
            fns = {k: Captured(f, capture or capture_cuda) for k, f in fns.items()}
        self.fns = fns
        self._last = None  # (read, x shape, inputs) of the last denoising forward

    def __call__(self, x, timestep, text_kv, cache, read, *, write=None) -> torch.Tensor:
        last = self._last
        if write is None and last is not None and last[0] is read and last[1] == x.shape:
            inputs = last[2]  # the denoising steps of a block share their read
        else:
            inputs = self.model.prepare(x, text_kv, cache, read, write=write)
            self._last = (read, x.shape, inputs) if write is None else None
        fn = self.fns["denoise" if write is None else "write"]
        return fn(self.model, x, timestep, text_kv.k, text_kv.v, cache_pools(cache), inputs,
                  self.opts)
