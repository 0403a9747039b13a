"""Head-parallel (Ulysses) streaming over ``torch.distributed``: nccl on CUDA, gloo on CPU.

Layout over ``w`` ranks (``w`` = ``ulysses_degree``, the process group's size):

* **sequence-parallel layers**: every layer but the self-attention core runs on this rank's
  share of every frame: tokens ``[r Nf/w, (r+1) Nf/w)`` of each frame (``Nf`` tokens per
  frame), so ``x`` is ``[B, F, Nf/w, dim]`` and the per-frame modulation ``[B, F, 6, dim]``
  broadcasts unchanged. ``Nf`` must be divisible by ``w``: anything else is refused with a
  ``ValueError`` (padding would need masked pad keys in every attention and the cache).
* **self-attention**: one ``all_to_all_single`` turns ``q, k, v [B, N/w, H, D]`` (stacked)
  into ``[B, N, H/w, D]`` of heads ``[r H/w, (r+1) H/w)``, tokens back in frame-major order;
  the paged attention runs on those heads; a second ``all_to_all_single`` turns the output
  back into ``[B, N/w, H, D]``.
* **the cache** of each rank holds its ``H/w`` heads of every layer, and its RoPE table is
  exactly those rows of the single-process table (jitter included,
  :meth:`lol_kernels.rope.RopeTable.heads`). No KV traffic ever crosses ranks; MoC routing
  scores each rank's own heads against their own chunk summaries (routing is per head).
* **cross-attention**: sequence-parallel queries over the full text K/V, which every rank
  computes once per prompt. The text K/V is small (``L`` = 512 tokens against ``N`` = 4680
  per block at 832x480) and fixed per prompt, so this needs no communication at all, whereas
  head-splitting it would cost two more all-to-alls per layer for the same FLOPs.
* **output**: the head runs on each rank's tokens; one ``all_gather`` gives every rank the
  whole block (every rank keeps the same latents, noise and cache bookkeeping).

The world size must divide the head count (12 for Wan-1.3B, 40 for Wan-14B). Parameters are
named after diffusers' ``ContextParallelConfig(ulysses_degree=...)``; there is no ring degree.

Faults: every rank keeps a heartbeat and its collective count in the rendezvous store
(:mod:`lol_model.parallel.liveness`). A collective that fails (a peer closed its sockets: at
once; a peer hung: after ``timeout_s``) raises :class:`~lol_model.errors.RankFailure` naming the
rank that died, failed, is stopped or fell behind, e.g. ``rank 2 of 4 died (its process 812 is
gone); rank 0 of 4 saw all_to_all fail: Connection reset by peer``. ``lol generate --nproc``
names a rank killed by a signal from its exit code. With nccl a hung collective is ended by its
watchdog instead (the launcher, torchrun or ``--nproc``, then names the rank that went first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lol_kernels.cache import PagedKVCache, SlowFastCache

from ..errors import RankFailure
from ..model.transformer import CausalWanModel, cache_arguments, cache_pools
from . import liveness

DEFAULT_TIMEOUT_S = 300.0  # a hung rank is named after this; a dead one at once


def check_degree(num_heads: int, world: int) -> None:
    """``ValueError`` unless ``world`` (``ulysses_degree``) divides ``num_heads``."""
    if not isinstance(world, int) or world < 1 or num_heads % world:
        raise ValueError(f"ulysses_degree (the world size) must be a positive divisor of the "
                         f"model's {num_heads} heads, got {world!r}")


def head_split(num_heads: int, world: int) -> list[list[int]]:
    """``[[start, stop], ...]``: the heads each rank holds."""
    check_degree(num_heads, world)
    n = num_heads // world
    return [[r * n, (r + 1) * n] for r in range(world)]


def _short(e: Exception) -> str:
    """gloo's first line without its source location: "Connection closed by peer ..." """
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0]


def checked(what: str, rank: int, world: int, fn, *args, **kwargs):
    live = liveness.current()
    if live is not None:
        live.enter(what)
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/nccl: a dead peer closes its socket or times out
        culprit = live.diagnose(what) if live is not None else None
        if culprit:
            raise RankFailure(f"{culprit}; rank {rank} of {world} saw {what} fail: "
                              f"{_short(e)}") from None
        raise RankFailure(f"rank {rank} of {world}: {what} failed (another rank died, failed or "
                          f"timed out): {_short(e)}") from None


class TokenShard:
    """One rank's view of a block: its tokens of every frame, its heads in attention.

    Args:
        group: the process group (``None``: the default group).
        frame_tokens: ``Nf``, tokens per latent frame (divisible by the group size).
        rope_table: this rank's :class:`~lol_kernels.rope.RopeTable` (its heads' rows).
    """

    def __init__(self, group, frame_tokens: int, rope_table):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if frame_tokens % self.world:
            raise ValueError(f"the {frame_tokens} tokens per latent frame must be divisible by "
                             f"ulysses_degree={self.world} (pick a size whose token grid "
                             f"splits evenly)")
        self.frame_tokens, self.n = frame_tokens, frame_tokens // self.world
        self.rope_table = rope_table

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        checked("all_to_all", self.rank, self.world, dist.all_to_all_single, out, x,
                 group=self.group)
        return out

    def split(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, F, Nf, C] -> [B, F, Nf/w, C]``: this rank's tokens of every frame."""
        return h[:, :, self.rank * self.n:(self.rank + 1) * self.n].contiguous()

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, F, Nf/w, C] -> [B, F, Nf, C]`` on every rank (all_gather)."""
        parts = [torch.empty_like(out) for _ in range(self.world)]
        checked("all_gather", self.rank, self.world, dist.all_gather, parts,
                 out.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)

    def to_heads(self, q, k, v):
        """``q, k, v [B, F * Nf/w, H, D] -> [B, F * Nf, H/w, D]`` (one all-to-all)."""
        B, Nl, H, D = q.shape
        w, n = self.world, self.n
        x = torch.stack((q, k, v)).view(3, B, Nl // n, n, w, H // w, D)
        x = self._all_to_all(x.permute(4, 0, 1, 2, 3, 5, 6).contiguous())  # [w, 3, B, F, n, h, D]
        x = x.permute(1, 2, 3, 0, 4, 5, 6).reshape(3, B, Nl * w, H // w, D)
        return x.unbind(0)

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, F * Nf, H/w, D] -> [B, F * Nf/w, H, D]`` (one all-to-all)."""
        B, N, h, D = out.shape
        w, n = self.world, self.n
        x = out.view(B, N // (n * w), w, n, h, D).permute(2, 0, 1, 3, 4, 5).contiguous()
        x = self._all_to_all(x)  # [w (head group), B, F, n, h, D]
        return x.permute(1, 2, 3, 0, 4, 5).reshape(B, N // w, w * h, D)


class HeadShardedNovelty:
    """Mixin for a :class:`~lol_kernels.cache.SlowFastCache` holding ``H / w`` heads: its
    novelty descriptors are this rank's slice of the single-process (all-heads) unit-norm
    descriptor, and similarities all-reduce the per-rank dot products, so every rank promotes
    and evicts the same frames as one process would (state dict shapes unchanged)."""

    process_group = None

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        g = self.process_group
        checked("all_reduce", dist.get_rank(g), dist.get_world_size(g), dist.all_reduce, t,
                 group=g)
        return t

    def descriptor(self, fid: int) -> torch.Tensor:
        """``[B, Lsel, Hkv * D]``: this rank's heads of the all-heads unit-norm descriptor."""
        d = torch.stack([self.summary[x][fid].flatten(1) for x in self.novelty_layers], dim=1)
        norm = self._sum(d.square().sum(-1)).sqrt().clamp_min(1e-12)  # as F.normalize
        return d / norm[..., None]

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self._sum((a * b).sum(-1)).mean())

    def redundancy(self) -> torch.Tensor:
        d = torch.stack(self._slow_desc)  # [n, B, L, HD / w]
        head = self.descriptor(self.sink[-1].fid) if self.sink else None
        prev = torch.cat([(head if head is not None else d[0]).unsqueeze(0), d[:-1]])
        r = self._sum((d * prev).sum(-1)).mean(dim=(1, 2))
        if head is None:
            r[0] = float("-inf")
        return r


def sharded_cache_class(cache_cls, process_group=None):
    """``cache_cls`` itself, or for a slow-fast cache a subclass with
    :class:`HeadShardedNovelty` over ``process_group``."""
    if not issubclass(cache_cls, SlowFastCache):
        return cache_cls
    return type("HeadSharded" + cache_cls.__name__, (HeadShardedNovelty, cache_cls),
                {"process_group": process_group})


class UlyssesModel:
    """A :class:`~lol_model.model.CausalWanModel` run head-parallel over a process group,
    called like the model (``forward``, ``prepare``, ``step``, ``new_cache``, ``encode_text``),
    so :mod:`lol_model.streaming` and :class:`~lol_model.streaming.forward.BlockForward`
    (eager) take it (:class:`~lol_model.streaming.interfaces.StreamModel`).

    Args:
        model: the full model, identical on every rank (same weights, same RoPE table).
        ulysses_degree: the number of ranks heads are split over; must equal the group's size
            when given (``None``: the group's size).
        process_group: a ``torch.distributed`` group (``None``: the default group), or
        mesh: a 1-D ``DeviceMesh`` (its group is used).

    ``ValueError`` when the degree does not divide the head count.
    """

    def __init__(self, model: CausalWanModel, *, ulysses_degree: int | None = None,
                 process_group=None, mesh=None):
        if mesh is not None:
            if process_group is not None:
                raise ValueError("give process_group or mesh, not both")
            if not hasattr(mesh, "get_group") or getattr(mesh, "ndim", None) != 1:
                raise TypeError(f"mesh must be a 1-D torch.distributed DeviceMesh (heads split "
                                f"over its one dimension), got {mesh!r}")
            process_group = mesh.get_group()
        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized (init_distributed())")
        world = dist.get_world_size(process_group)
        if ulysses_degree is not None and ulysses_degree != world:
            raise ValueError(f"ulysses_degree={ulysses_degree} must equal the process group's "
                             f"size {world}")
        check_degree(model.cfg.num_heads, world)
        self.model, self.group, self.world = model, process_group, world
        self.rank = dist.get_rank(process_group)
        self.heads = head_split(model.cfg.num_heads, world)[self.rank]
        self._rope = (None, None)

    # the model's description, unchanged
    cfg = property(lambda self: self.model.cfg)
    dtype = property(lambda self: self.model.dtype)
    device = property(lambda self: self.model.device)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return self.model.grid(height, width)

    def encode_text(self, context):
        """Every rank computes the full text K/V (cross-attention is sequence-parallel)."""
        return self.model.encode_text(context)

    @property
    def rope_table(self):
        """This rank's rows of the model's RoPE table (re-sliced when it is reconfigured)."""
        full, mine = self._rope
        if full is not self.model.rope_table:
            full = self.model.rope_table
            self._rope = (full, full.heads(*self.heads))
        return self._rope[1]

    def new_cache(self, *, frame_tokens: int, page_size: int | None = None, dtype=None,
                  device=None, cache_cls=None, **cache_kwargs):
        """As :meth:`CausalWanModel.new_cache`, with this rank's ``H / w`` heads."""
        cls = sharded_cache_class(cache_cls or PagedKVCache, self.group)
        return cls(**cache_arguments(self.model.cfg, num_kv_heads=self.cfg.num_heads // self.world,
                                     frame_tokens=frame_tokens, page_size=page_size,
                                     dtype=dtype or self.dtype, device=device or self.device),
                   **cache_kwargs)

    def shard(self, x: torch.Tensor) -> TokenShard:
        """The :class:`TokenShard` of latents ``x [B, Cz, F, H, W]``."""
        gh, gw = self.model.grid(x.shape[-2], x.shape[-1])
        return TokenShard(self.group, gh * gw, self.rope_table)

    def prepare(self, x, text_kv, cache, read, *, write=None):
        if cache.num_kv_heads != self.model.cfg.num_heads // self.world:
            raise ValueError(f"cache holds {cache.num_kv_heads} heads; this rank needs "
                             f"{self.model.cfg.num_heads // self.world} (UlyssesModel.new_cache)")
        return self.model.prepare(x, text_kv, cache, read, write=write)

    def step(self, x, timestep, text_k, text_v, pools, inputs, **opts) -> torch.Tensor:
        return self.model.step(x, timestep, text_k, text_v, pools, inputs,
                               shard=self.shard(x), **opts)

    def __call__(self, x, timestep, text_kv, cache, read, *, write=None, **opts):
        inputs = self.prepare(x, text_kv, cache, read, write=write)
        return self.step(x, timestep, text_kv.k, text_kv.v, cache_pools(cache), inputs, **opts)

    forward = __call__
