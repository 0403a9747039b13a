"""Causal Wan2.1 transformer that attends a paged sink + window KV cache (gpt-fast style).

The math is diffusers' ``WanTransformer3DModel`` (Wan2.1 T2V) with two changes for streaming:

* **per-frame timesteps**: ``timestep [B, F]`` gives each latent frame its own modulation table
  ``[B, F, 6, dim]``, broadcast over that frame's tokens (diffusers' single timestep per sample
  is the case of equal timesteps);
* **self-attention through** :func:`lol_kernels.paged_attention`: queries and keys are
  un-rotated after the full-width q/k RMSNorm; RoPE is applied inside the op at read time, so
  the cache stores un-rotated keys and a position policy only changes integer positions.

Parameter names follow the original Wan / Self-Forcing / LongLive layout (``self_attn.q``,
``norm3``, ``ffn.0``, ``head.head``, ...); :mod:`lol_model.model.weights` also loads diffusers
names.

Precision: activations stay in the parameters' dtype; LayerNorms, RMSNorms, modulation and the
residual updates with their gates are computed in fp32 (fp64 for an fp64 model), as diffusers
does. The timestep sinusoid is computed in float64, as Wan / Self-Forcing / LongLive.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import lol_kernels as lk
from lol_kernels.cache import CacheRead, FrameBlock, PagedKVCache, write_frames

from .config import ModelConfig


@dataclass
class TextKV:
    """Cross-attention keys and values of one prompt for every layer (computed once per prompt).

    Attributes:
        k, v: ``num_layers`` tensors ``[B, L, H, D]`` in the model dtype (``k`` after the
            full-width RMSNorm). ``B`` may be 1 to share one prompt across a batch.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


@dataclass
class StepInputs:
    """The tensors one cached forward reads besides ``x``, the timesteps and the text K/V, all on
    the model's device, of one shape for the whole stream (a page table is padded to the
    cache's ``max_read_pages``), so that a compiled step never recompiles and a captured one
    copies them into fixed buffers (:mod:`lol_model.streaming.forward`).

    Attributes:
        q_pos: ``[B, F * Nf, 3]`` int32 positions of the block's tokens.
        page_table: ``[B, M]`` int32; page_shift: ``[B, M, 3]`` int32 (zeros for none).
        chunk_pages, chunk_shift, chunk_valid, chunk_fids: routed reads only: ``[B, C, ppf]``
            int32, ``[B, C, 3]`` int32, ``[B, C]`` bool and ``[C]`` int64, the frame slot of each
            chunk's summary (0 for padding, masked by ``chunk_valid``).
        slots, fids: write pass only: ``[B, n]`` int64 flat slots of the written tokens (the
            last ``n`` of the block) and ``[F']`` int64 frame slots of the written frames.
    """

    q_pos: torch.Tensor
    page_table: torch.Tensor
    page_shift: torch.Tensor
    chunk_pages: torch.Tensor | None = None
    chunk_shift: torch.Tensor | None = None
    chunk_valid: torch.Tensor | None = None
    chunk_fids: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    fids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


def cache_pools(cache: PagedKVCache) -> tuple:
    """``(k, v, pos, page_len, summary)`` of ``cache``: the tensors a cached forward reads and
    (write pass) writes in place; ``k, v, summary`` are per-layer lists."""
    return cache.k, cache.v, cache.pos, cache.page_len, cache.summary


def frame_timesteps(t, batch_size: int, num_frames: int, device,
                    name: str = "timestep") -> torch.Tensor:
    """``t`` (a scalar, ``[B]`` or ``[B, F]``) as ``[B, F]`` on ``device`` (dtype kept);
    ``ValueError`` naming ``name`` for another shape."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch_size)
    if t.dim() == 1 and t.shape[0] == batch_size:
        t = t[:, None].expand(batch_size, num_frames)
    if tuple(t.shape) != (batch_size, num_frames):
        raise ValueError(f"{name} must have shape [B={batch_size}, F={num_frames}] (or [B] or "
                         f"a scalar), got {list(t.shape)}")
    return t


def default_page_size(frame_tokens: int) -> int:
    """256 slots (the Triton tile), or the next power of two >= 16 for tiny frames."""
    return 256 if frame_tokens >= 256 else max(16, 1 << (frame_tokens - 1).bit_length())


def cache_arguments(cfg: ModelConfig, *, num_kv_heads: int, frame_tokens: int,
                    page_size: int | None, dtype: torch.dtype, device) -> dict:
    """The constructor arguments a cache of a model with ``cfg`` takes from the model: layers,
    ``num_kv_heads`` heads (all, or one rank's share), head_dim, 3 RoPE axes, and the page size
    (default: :func:`default_page_size`)."""
    return dict(num_layers=cfg.num_layers, num_kv_heads=num_kv_heads, head_dim=cfg.head_dim,
                num_axes=3, frame_tokens=frame_tokens,
                page_size=default_page_size(frame_tokens) if page_size is None else page_size,
                dtype=dtype, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and modulation run in fp32, or fp64 for an fp64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x, ct, eps, weight=None, bias=None):
    """LayerNorm over the last dim computed in ``ct`` (result stays in ``ct``)."""
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    return F.layer_norm(x.to(ct), (x.shape[-1],), w, b, eps)


def timestep_sinusoid(t: torch.Tensor, dim: int, ct: torch.dtype) -> torch.Tensor:
    """Sinusoidal timestep embedding as Wan / Self-Forcing / LongLive compute it.

    ``[cos(t_n * omega_i), sin(t_n * omega_i)]`` with ``omega_i = 10000 ** (-i / (dim / 2))``,
    ``i < dim / 2``, all in float64 (``t`` cast to float64 first), then cast to ``ct``.

    Args:
        t: timesteps ``[N]`` of any dtype.
        dim: embedding width (even).
        ct: dtype of the result.

    Returns:
        ``[N, dim]`` in ``ct`` (cos half first, then sin).
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    # MPS has no float64: the same formula in float32 there
    wide = torch.float32 if t.device.type == "mps" else torch.float64
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=wide, device=t.device).div(half))
    ang = torch.outer(t.to(wide), omega)
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(ct)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together), computed in fp32/fp64."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        ct = compute_dtype(x.dtype)
        return F.rms_norm(x.to(ct), (x.shape[-1],), self.weight.to(ct), self.eps).to(x.dtype)


class AffineLayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in fp32/fp64, output in the input dtype (Wan's ``norm3``)."""

    def forward(self, x):
        return layer_norm(x, compute_dtype(x.dtype), self.eps, self.weight, self.bias).to(x.dtype)


class Attention(nn.Module):
    """Projections of a Wan attention layer: ``q, k, v, o`` and full-width ``norm_q, norm_k``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def kv(self, x):
        """Un-rotated normed keys and values ``[B, N, H, D]`` of ``x [B, N, dim]``."""
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def query(self, x):
        return self.heads(self.norm_q(self.q(x)))


class SelfAttention(Attention):
    def forward(self, x, attend):
        """``x [B, N, dim]``; ``attend(q, k, v) -> [B, N, H, D]`` (un-rotated q, k)."""
        k, v = self.kv(x)
        return self.o(attend(self.query(x), k, v).flatten(-2))


class CrossAttention(Attention):
    def forward(self, x, k, v):
        """``x [B, N, dim]`` attends the text's ``k, v [B or 1, L, H, D]`` (no RoPE, no mask)."""
        q = self.query(x).transpose(1, 2)
        k, v = (t.expand(q.shape[0], -1, -1, -1).transpose(1, 2) for t in (k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = AffineLayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e0, text_k, text_v, attend):
        """``x [B, F, Nf, dim]`` (model dtype), ``e0 [B, F, 6, dim]`` (fp32/fp64)."""
        dt, ct, (B, Fr, Nf, C) = x.dtype, e0.dtype, x.shape
        mod = (self.modulation.to(ct).unsqueeze(0) + e0).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        h = (layer_norm(x, ct, self.eps) * (1 + scale1) + shift1).to(dt)
        y = self.self_attn(h.view(B, Fr * Nf, C), attend).view(B, Fr, Nf, C)
        x = (x.to(ct) + y.to(ct) * gate1).to(dt)
        h = self.norm3(x).view(B, Fr * Nf, C)
        x = x + self.cross_attn(h, text_k, text_v).view(B, Fr, Nf, C)
        h = (layer_norm(x, ct, self.eps) * (1 + scale2) + shift2).to(dt)
        return (x.to(ct) + self.ffn(h).to(ct) * gate2).to(dt)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.patch_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """``x [B, F, Nf, dim]``, ``e [B, F, dim]`` (time embedding, fp32/fp64)."""
        ct = e.dtype
        shift, scale = (self.modulation.to(ct).unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((layer_norm(x, ct, self.eps) * (1 + scale) + shift).to(x.dtype))


class CausalWanModel(nn.Module):
    """Wan2.1 transformer for block-causal streaming over a :class:`PagedKVCache`.

    Life of a block (the generator's loop)::

        text_kv = model.encode_text(context)                  # once per prompt
        read = cache.read(F)                                   # any policy: read(F, policy=...)
        pred = model(x_t, t, text_kv, cache, read)             # each denoising step
        blk = cache.append_frames(lk.token_positions(read.q_t, gh, gw, B))
        model(x0, torch.zeros(B, F), text_kv, cache, read, write=blk)   # write the clean K/V
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, cfg.patch_size, cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d),
                                            nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(),
                                            nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.configure_rope()

    # ------------------------------------------------------------------ setup
    def configure_rope(self, *, jitter_sigma: float = 0.0, jitter_axes=(0,), seed: int = 0):
        """Set :attr:`rope_table` (``lk.rope_frequencies``; LoL multi-head jitter if sigma > 0)."""
        with torch.device("cpu"):  # a small host table, even when the model is built on meta
            self.rope_table = lk.rope_frequencies(self.cfg.head_dim, self.cfg.num_heads,
                                                  theta=self.cfg.rope_theta,
                                                  jitter_sigma=jitter_sigma,
                                                  jitter_axes=jitter_axes, seed=seed)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(gh, gw)`` of a latent frame of ``height x width``."""
        _, ph, pw = self.cfg.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent height x width {height}x{width} must be divisible by the "
                             f"patch {ph}x{pw}")
        return height // ph, width // pw

    def new_cache(self, *, frame_tokens: int, page_size: int | None = None, dtype=None,
                  device=None, cache_cls=PagedKVCache, **cache_kwargs) -> PagedKVCache:
        """A ``cache_cls`` with this model's layers, heads and head_dim (the model's dtype and
        device by default); ``cache_kwargs`` (``sink_frames``, ``window_frames``,
        ``block_frames``, ``batch_size``, ``slow_frames``, ...) go to the cache unchanged.
        ``page_size`` defaults to the power of two covering a frame, in [16, 256]."""
        return cache_cls(**cache_arguments(self.cfg, num_kv_heads=self.cfg.num_heads,
                                           frame_tokens=frame_tokens, page_size=page_size,
                                           dtype=dtype or self.dtype,
                                           device=device or self.device), **cache_kwargs)

    def encode_text(self, context: torch.Tensor) -> TextKV:
        """Text embedding and every layer's cross-attention K/V of ``context [B, L, text_dim]``
        (umT5 output, zero-padded to ``cfg.text_len`` as Wan does; every token is attended)."""
        if not isinstance(context, torch.Tensor) or context.dim() != 3 \
                or context.shape[-1] != self.cfg.text_dim:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context)
            raise ValueError(f"context must be a tensor [B, L, text_dim={self.cfg.text_dim}], "
                             f"got {got}")
        ctx = self.text_embedding(context.to(self.device, self.dtype))
        kv = [blk.cross_attn.kv(ctx) for blk in self.blocks]
        return TextKV([k for k, _ in kv], [v for _, v in kv])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text_kv: TextKV,
                cache: PagedKVCache, read: CacheRead, *, write: FrameBlock | None = None,
                causal_within_block: bool = False, backend: str = "auto",
                moc_topk: int = 4, moc_tile_size: int = 128) -> torch.Tensor:
        """Flow prediction (``noise - x0``) of a block of latent frames.

        Args:
            x: ``[B, Cz, F, H, W]`` latents of the block, ``Cz`` latent channels (any float dtype).
            timestep: ``[B, F]`` (or ``[B]`` / scalar, broadcast) float in ``[0, 1000]``.
            text_kv: from :meth:`encode_text`.
            cache, read: the paged cache and a :class:`~lol_kernels.cache.CacheRead` of it
                (``cache.read(F, ...)``, any position policy); the block's queries sit at
                ``lk.token_positions(read.q_t, H // ph, W // pw, B)``. A routed read
                (``read.routed``: slow-fast memory with MoC) attends its page table plus, per
                tile of ``moc_tile_size`` queries and per head, the ``moc_topk`` chunks chosen
                by the MoC router (:func:`lol_kernels.moc_attention`).
            write: when given (the clean write pass at ``t = 0``), each layer writes its
                un-rotated normed ``k`` and ``v`` into ``cache`` at these frames. It may name
                fewer frames than ``x`` has: the K/V of the *last* ``len(write.frames)`` frames
                are written, the earlier ones are only attended (LongLive recache).
            causal_within_block: token-causal attention among the block's own tokens (default:
                every token of the block sees the whole block).
            backend: of :func:`lol_kernels.paged_attention`.

        Returns:
            ``[B, Cz_out, F, H, W]`` in ``x.dtype``.

        The host work (:meth:`prepare`) and the tensors-only :meth:`step` (what
        :mod:`lol_model.streaming.forward` compiles and captures) are also callable apart.
        """
        inputs = self.prepare(x, text_kv, cache, read, write=write)
        return self.step(x, timestep, text_kv.k, text_kv.v, cache_pools(cache), inputs,
                         causal_within_block=causal_within_block, backend=backend,
                         moc_topk=moc_topk, moc_tile_size=moc_tile_size)

    def prepare(self, x: torch.Tensor, text_kv: TextKV, cache: PagedKVCache, read: CacheRead,
                *, write: FrameBlock | None = None) -> StepInputs:
        """Check a cached forward's arguments (as :meth:`forward`) and gather the tensors it
        reads into :class:`StepInputs`: host work, once per read (a few small host -> device
        copies), never inside :meth:`step`."""
        B, Fr, gh, gw = self._check_input(x, text_kv)
        if read.q_t.numel() != Fr:
            raise ValueError(f"read must have one q_t per frame of x ({Fr}), got "
                             f"{read.q_t.numel()}")
        if cache.frame_tokens != gh * gw or cache.batch_size != B:
            raise ValueError(f"cache holds frames of {cache.frame_tokens} tokens for batch "
                             f"{cache.batch_size}; x has {gh * gw} tokens per frame, batch {B}")
        if cache.dtype != self.dtype:
            raise TypeError(f"cache dtype {cache.dtype} must be the model's dtype {self.dtype} "
                            f"(new_cache(dtype=None) picks it)")
        if write is not None:
            cache.check_block(write)  # a FrameBlock of this cache, before reading its frames
        if write is not None and not 1 <= len(write.frames) <= Fr:
            raise ValueError(f"write must name 1..{Fr} frames (the last frames of x), got "
                             f"{len(write.frames)}")
        dev = self.device
        pt = read.page_table.to(dev)
        zeros = partial(torch.zeros, dtype=torch.int32, device=dev)
        inputs = StepInputs(
            lk.token_positions(read.q_t, gh, gw, B).to(dev), pt,
            read.page_shift.to(dev) if read.page_shift is not None else zeros(*pt.shape, 3))
        if read.routed:
            C = read.chunk_pages.shape[1]
            fids = torch.zeros(C, dtype=torch.int64)
            fids[: len(read.chunk_ids)] = torch.tensor(read.chunk_ids, dtype=torch.int64)
            inputs.chunk_pages, inputs.chunk_valid = read.chunk_pages.to(dev), \
                read.chunk_valid.to(dev)
            inputs.chunk_shift = read.chunk_shift.to(dev) if read.chunk_shift is not None \
                else zeros(B, C, 3)
            inputs.chunk_fids = fids.to(dev)
        if write is not None:
            inputs.slots, inputs.fids = write.slots.to(dev), write.fids.to(dev)
        return inputs

    def step(self, x: torch.Tensor, timestep: torch.Tensor, text_k: list, text_v: list,
             pools: tuple, inputs: StepInputs, *, causal_within_block: bool = False,
             backend: str = "auto", moc_topk: int = 4, moc_tile_size: int = 128,
             shard=None) -> torch.Tensor:
        """The cached forward on tensors only (no check, no host sync): what ``torch.compile``
        traces whole and a CUDA graph captures. Arguments as :meth:`forward`, with
        ``text_k, text_v`` the :class:`TextKV` lists, ``pools`` :func:`cache_pools` and
        ``inputs`` from :meth:`prepare`; with ``inputs.slots`` each layer writes the un-rotated
        K/V of the last ``slots.shape[1]`` tokens into the pools.

        ``shard`` (head parallelism, :class:`lol_model.parallel.ulysses.TokenShard`): the layers run
        on this rank's tokens of every frame, each attention exchanges ``q, k, v`` for all
        tokens of this rank's heads (``shard.to_heads``) and back (``shard.to_tokens``), the
        pools hold those heads and ``shard.rope_table`` is their RoPE table."""
        k_pools, v_pools, cache_pos, page_len, summaries = pools
        inp = inputs
        nw = 0 if inp.slots is None else inp.slots.shape[1]  # written: the last nw tokens
        rope = self.rope_table if shard is None else shard.rope_table

        def attend(layer, q, k, v):
            if shard is not None:  # [B, N/w, H, D] -> [B, N, H/w, D]
                q, k, v = shard.to_heads(q, k, v)
            args = (q, inp.q_pos, k_pools[layer], v_pools[layer], cache_pos, page_len,
                    inp.page_table, rope)
            kw = dict(k_new=k, v_new=v, causal=causal_within_block, page_shift=inp.page_shift,
                      backend=backend)
            if inp.chunk_pages is not None:
                summ = summaries[layer].index_select(0, inp.chunk_fids).transpose(0, 1)
                cm = torch.where(inp.chunk_valid[:, :, None, None], summ, 0.0)
                idx = lk.moc_route_tiles(q, cm, moc_topk, tile_size=moc_tile_size,
                                         chunk_valid=inp.chunk_valid)
                out, _ = lk.moc_attention(*args, chunk_pages=inp.chunk_pages, routed=idx,
                                          chunk_shift=inp.chunk_shift, tile_size=moc_tile_size,
                                          **kw)
            else:
                out, _ = lk.paged_attention(*args, **kw)
            if nw:
                write_frames(k_pools[layer], v_pools[layer], summaries[layer], inp.slots,
                             inp.fids, k[:, -nw:], v[:, -nw:])
            return out if shard is None else shard.to_tokens(out)

        return self._run(x, timestep, text_k, text_v, attend, shard)

    def forward_full(self, x: torch.Tensor, timestep: torch.Tensor, text_kv: TextKV, *,
                     frame_t=None, block_frames=None,
                     causal_within_block: bool = False) -> torch.Tensor:
        """One forward over a whole clip with dense attention and no cache (the reference that
        streaming must equal). Frames sit at temporal positions ``frame_t [F]`` (default
        ``0..F-1``); with ``block_frames`` (an int or a list of block lengths summing to F)
        a frame sees the frames of its own and earlier blocks only (block-causal), and with
        ``causal_within_block`` a token sees only the tokens of its block up to itself."""
        B, Fr, gh, gw = self._check_input(x, text_kv)
        frame_t = torch.arange(Fr) if frame_t is None else torch.as_tensor(frame_t)
        pos = lk.token_positions(frame_t, gh, gw, B).to(self.device)
        sizes = [Fr] if block_frames is None else [block_frames] * (Fr // block_frames) \
            if isinstance(block_frames, int) else list(block_frames)
        if sum(sizes) != Fr:
            raise ValueError(f"block_frames must split the {Fr} frames, got {block_frames}")
        bid = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        bid = bid.repeat_interleave(gh * gw)  # block of every token
        mask = bid[:, None] > bid[None, :]
        same = bid[:, None] == bid[None, :]
        mask |= same.tril() if causal_within_block else same
        mask = mask.to(self.device)

        def attend(layer, q, k, v):
            q, k = (lk.apply_rope(t, pos, self.rope_table, backend="torch") for t in (q, k))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=mask)
            return out.transpose(1, 2)

        return self._run(x, timestep, text_kv.k, text_kv.v, attend)

    def forward_attend(self, x: torch.Tensor, timestep: torch.Tensor, text_kv: TextKV,
                       attend) -> torch.Tensor:
        """One forward of ``x [B, Cz, F, H, W]`` at ``timestep [B, F]`` (or ``[B]`` / scalar)
        whose self-attention is the caller's ``attend(layer, q, k, v) -> [B, N, H, D]``, with
        ``q, k, v [B, N, H, D]`` un-rotated (after the q/k RMSNorm) and ``N = F * gh * gw``
        tokens, frame-major then row-major. The seam :mod:`lol_model.training` builds teacher and
        diffusion forcing on; differentiable. Returns ``[B, Cz_out, F, H, W]`` in ``x.dtype``."""
        self._check_input(x, text_kv)
        return self._run(x, timestep, text_kv.k, text_kv.v, attend)

    # ------------------------------------------------------------------ internals
    def _check_input(self, x, text_kv):
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor [B, Cz, F, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        B, C, Fr, H, W = x.shape
        if C != self.cfg.in_channels:
            raise ValueError(f"x must have in_channels={self.cfg.in_channels} channels, got {C}")
        if self.cfg.patch_size[0] != 1:
            raise ValueError("the causal model needs patch_size[0] == 1 (one frame per step)")
        if not isinstance(text_kv, TextKV) or len(text_kv.k) != self.cfg.num_layers:
            raise ValueError("text_kv must be a TextKV from encode_text with one K/V per layer")
        if text_kv.batch_size not in (1, B):
            raise ValueError(f"text_kv has batch {text_kv.batch_size}; x has batch {B}")
        return (B, Fr, *self.grid(H, W))

    def _run(self, x, timestep, text_k, text_v, attend, shard=None):
        dt, (B, _, Fr, H, W) = self.dtype, x.shape
        ct = compute_dtype(dt)
        gh, gw = self.grid(H, W)
        # [B, dim, F, gh, gw] -> [B, F, gh*gw, dim]: tokens row-major within a frame
        h = self.patch_embedding(x.to(self.device, dt)).flatten(3).permute(0, 2, 3, 1).contiguous()
        t = frame_timesteps(timestep, B, Fr, self.device).reshape(-1)
        s = timestep_sinusoid(t, self.cfg.freq_dim, ct)
        e = self.time_embedding(s.to(self.time_embedding[0].weight.dtype))
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype))
        e, e0 = e.to(ct).view(B, Fr, -1), e0.to(ct).view(B, Fr, 6, -1)
        if shard is not None:  # this rank's tokens of every frame: [B, F, gh*gw / w, dim]
            h = shard.split(h)
        for i, block in enumerate(self.blocks):
            h = block(h, e0, text_k[i], text_v[i], partial(attend, i))
        out = self.head(h, e)  # [B, F, gh*gw, C_out * pt * ph * pw]
        if shard is not None:
            out = shard.gather(out)
        pt, ph, pw = self.cfg.patch_size
        out = out.view(B, Fr, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, -1, Fr * pt, gh * ph, gw * pw).to(x.dtype)
