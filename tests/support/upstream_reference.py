"""Float64 reference of how LongLive 1.0 and Self-Forcing stream, driven by our model's weights.

Test support, not the package: an independent re-implementation, written from a reading of the
upstream code (LongLive 1.0 at commit 9b2102b, Self-Forcing at HEAD), of
``CausalWanSelfAttention.forward``'s KV-cache branch, ``causal_rope_apply``,
``sinusoidal_embedding_1d``, ``CausalWanModel._forward_inference`` /
``_apply_cache_updates``, ``pipeline/causal_inference.py`` (the block loop) and
``pipeline/interactive_causal_inference.py`` (``_recache_after_switch``). It reuses the weights of
a :class:`lol_model.model.CausalWanModel` (cast to float64) but does its own attention (plain
softmax, float64), its own RoPE (complex multiply over the (t, h, w) split, frequencies as
upstream's ``rope_params``, no jitter) and its own time embedding (float64 sinusoid).

Cache semantics, at token level, per layer (``fs`` = tokens per frame, ``S`` = ``sink_size``,
``L`` = ``local_attn_size``, both in frames):

* one buffer ``k, v [B, L * fs, H, D]`` holding keys **rotated at their absolute frame index
  when written**, and two pointers ``global_end`` (tokens generated so far) and ``local_end``
  (filled slots); ``L = -1`` is the global cache (LongLive: as many frames as the video;
  Self-Forcing: 32760 tokens = 21 frames, past which upstream fails);
* every forward (each denoising step and the clean pass) writes its block: if it extends the
  stream (``current_end > global_end``) and does not fit, the oldest ``evict`` non-sink tokens
  are dropped by shifting slots ``[S + evict, local_end)`` to ``S`` (roll), then the block is
  written at ``[local_end', local_end' + new)``; a forward that does not extend the stream
  (``is_recompute``: ``current_end <= global_end`` and ``current_start > 0``) rewrites its slots
  but never the sink slots ``[0, S)`` (LongLive only) and leaves the pointers alone;
* attention (LongLive): the sink slots plus the newest ``max_attention - S`` frames up to
  ``local_end'``; Self-Forcing: the newest ``max_attention`` frames (sink or not). Every query of
  the block sees every key (the block mask is not used on the KV-cache path).
* ``max_attention`` is ``L`` frames (``21`` for ``L = -1``). Upstream hard-codes it in tokens as
  ``L * 1560`` (``32760``), i.e. for Wan's 480x832 frames; here it counts frames, which is what
  it means at that resolution (with tiny test frames upstream's literal 1560 never binds).

So LongLive's ``sink_size=3, local_attn_size=12`` attends 3 sink + 6 cached + 3 new frames, and
Self-Forcing's ``local_attn_size=9`` attends 6 cached + 3 new.

Prompt switch (LongLive interactive, ``cur`` = first frame of the next block): without
``global_sink`` the K/V buffers are zeroed (pointers kept). Then the last ``n = min(L, cur)``
clean frames (all ``cur`` for ``L = -1``) run one forward at ``t = context_noise = 0`` under the
new prompt, starting at frame ``cur - n``: its writes land in slots ``[0, n)``; with
``cur > L`` and ``global_sink`` the first ``S`` frames' K/V are discarded (sink slots protected,
the old sink stays), without ``global_sink`` they overwrite the sink slots; with ``cur <= L``
nothing is protected (``current_start == 0``): the sink frames are recomputed either way.

Sampler: ``x = noise``; per step ``x0 = x - sigma * flow``, re-noised with fresh noise to the next
sigma; then a clean pass at ``t = 0``. The caller injects the sigmas and the generator so both
sides draw the same noise in the same order as :func:`lol_model.streaming.sampling.denoise_block`.
Upstream's own sigmas come from a float32 scheduler table (2e-8 off at t = 833.33, exact at the
other three); the timesteps the model sees are the same float32 values on both sides. Precision
is float64 throughout (upstream's ``WanRMSNorm`` would compute in float32 via ``x.float()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lol_model.streaming.sampling import randn

SELF_FORCING_GLOBAL_FRAMES = 21  # 32760 tokens / 1560 tokens per Wan frame


def rope_freqs(head_dim: int, *, theta: float = 10000.0, max_frames: int = 1024) -> list:
    """Upstream's ``rope_params`` per axis: ``[max_frames, pairs_a]`` complex128 for (t, h, w)."""
    hw = 2 * (head_dim // 6)
    out = []
    for dim in (head_dim - 2 * hw, hw, hw):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(max_frames, dtype=torch.float64), omega)
        out.append(torch.polar(torch.ones_like(ang), ang))
    return out


def rope_rotate(x: torch.Tensor, start_frame: int, grid: tuple[int, int, int], freqs) -> torch.Tensor:
    """``x [B, F*gh*gw, H, D]`` float64 rotated at frames ``start_frame..`` (``causal_rope_apply``):
    channel pairs ``(2j, 2j+1)`` as complex numbers, t pairs first, then h, then w."""
    f, gh, gw = grid
    B, N, H, D = x.shape
    ft, fh, fw = freqs
    if start_frame + f > ft.shape[0]:
        raise ValueError(f"frame {start_frame + f} is past upstream's RoPE table "
                         f"({ft.shape[0]} positions)")
    table = torch.cat([ft[start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, gh, gw, -1),
                       fh[:gh].view(1, gh, 1, -1).expand(f, gh, gw, -1),
                       fw[:gw].view(1, 1, gw, -1).expand(f, gh, gw, -1)], dim=-1)
    xc = torch.view_as_complex(x.reshape(B, N, H, D // 2, 2).contiguous())
    return torch.view_as_real(xc * table.reshape(1, N, 1, D // 2)).reshape(B, N, H, D)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``sinusoidal_embedding_1d``: ``[cos, sin](t * 10000^(-i/half))`` in float64, ``[N, dim]``."""
    half = dim // 2
    ang = torch.outer(t.to(torch.float64),
                      torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
    return torch.cat([ang.cos(), ang.sin()], dim=1)


@dataclass
class LayerKV:
    """One layer's upstream cache: rotated ``k``, ``v [B, T, H, D]``, pointers in tokens, and
    ``frame [T]`` int64, the frame index each slot holds (``-1``: empty or zeroed; bookkeeping
    for tests, upstream has none)."""

    k: torch.Tensor
    v: torch.Tensor
    frame: torch.Tensor
    global_end: int = 0
    local_end: int = 0


class UpstreamStream:
    """Upstream streaming of one video, float64, with ``model``'s weights.

    Args:
        model: a :class:`lol_model.model.CausalWanModel` (weights are copied as float64).
        grid: ``(gh, gw)`` tokens of a latent frame.
        sink_size, local_attn_size: upstream's keys, in frames (``local_attn_size=-1``: global).
        flavor: ``"longlive"`` (LongLive 1.0: sink-protected recompute, sink always attended,
            cache updates applied after all layers) or ``"self-forcing"`` (in-place writes, the
            newest ``max_attention`` tokens attended).
        total_frames: frames of the video (LongLive's global cache is this long).
        global_sink: LongLive's interactive ``global_sink``.
        max_attention_frames: override of the attention budget (frames), for negative controls.
    """

    def __init__(self, model, grid: tuple[int, int], *, sink_size: int, local_attn_size: int,
                 flavor: str = "longlive", total_frames: int | None = None,
                 global_sink: bool = True, batch_size: int = 1,
                 max_attention_frames: int | None = None):
        if flavor not in ("longlive", "self-forcing"):
            raise ValueError(f"flavor must be 'longlive' or 'self-forcing', got {flavor!r}")
        cfg = model.cfg
        self.cfg, self.flavor, self.global_sink = cfg, flavor, global_sink
        self.w = {k: v.detach().to("cpu", torch.float64) for k, v in model.state_dict().items()}
        self.gh, self.gw = grid
        self.fs = self.gh * self.gw
        self.S, self.L = sink_size, local_attn_size
        if local_attn_size == -1:
            frames = SELF_FORCING_GLOBAL_FRAMES if flavor == "self-forcing" else total_frames
            if frames is None:
                raise ValueError("LongLive's global cache needs total_frames")
        else:
            frames = local_attn_size
        self.max_att = (max_attention_frames or (SELF_FORCING_GLOBAL_FRAMES
                        if local_attn_size == -1 else local_attn_size)) * self.fs
        H, D = cfg.num_heads, cfg.head_dim
        T = frames * self.fs
        self.kv = [LayerKV(torch.zeros(batch_size, T, H, D, dtype=torch.float64),
                           torch.zeros(batch_size, T, H, D, dtype=torch.float64),
                           torch.full((T,), -1, dtype=torch.int64))
                   for _ in range(cfg.num_layers)]
        self.freqs = rope_freqs(D, theta=cfg.rope_theta)
        self.frame = 0  # current_start_frame of the next block
        self.output: list[torch.Tensor] = []  # clean latents [B, C, 1, h, w] of every frame
        # per forward: (start frame, frames, frames attended in key order), from layer 0
        self.reads: list[tuple[int, int, tuple[int, ...]]] = []

    # ------------------------------------------------------------------ weights
    def lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def rms(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * self.w[name]

    def ln(self, x, name=None):
        w = None if name is None else self.w[name + ".weight"]
        b = None if name is None else self.w[name + ".bias"]
        return F.layer_norm(x, (x.shape[-1],), w, b, self.cfg.eps)

    def encode_text(self, context: torch.Tensor):
        """Per-layer cross-attention ``(k, v) [B, text_len, H, D]`` of ``context [B, L, C_text]``
        (already zero-padded to ``text_len``, as upstream pads)."""
        ctx = context.to("cpu", torch.float64)
        ctx = self.lin(F.gelu(self.lin(ctx, "text_embedding.0"), approximate="tanh"),
                       "text_embedding.2")
        heads = (self.cfg.num_heads, self.cfg.head_dim)
        return [(self.rms(self.lin(ctx, f"blocks.{i}.cross_attn.k"),
                          f"blocks.{i}.cross_attn.norm_k.weight").unflatten(-1, heads),
                 self.lin(ctx, f"blocks.{i}.cross_attn.v").unflatten(-1, heads))
                for i in range(self.cfg.num_layers)]

    # ------------------------------------------------------------------ attention
    @staticmethod
    def attention(q, k, v):
        """Plain softmax attention, ``[B, N, H, D]`` layout, scale ``D ** -0.5``."""
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)

    def self_attention(self, layer, q, k, v, start_frame, nf, sink_recache):
        """Upstream's KV-cache branch for one layer; returns ``(out, commit)``."""
        fs, c = self.fs, self.kv[layer]
        q = rope_rotate(q, start_frame, (nf, self.gh, self.gw), self.freqs)
        k = rope_rotate(k, start_frame, (nf, self.gh, self.gw), self.freqs)
        new = q.shape[1]
        cur_start, cur_end = start_frame * fs, start_frame * fs + new
        sink, size = self.S * fs, c.k.shape[1]
        is_recompute = cur_end <= c.global_end and cur_start > 0
        tk, tv, tf = c.k.clone(), c.v.clone(), c.frame.clone()
        roll = self.L != -1 and cur_end > c.global_end and new + c.local_end > size
        if roll:
            evict = new + c.local_end - size
            rolled = c.local_end - evict - sink
            for t in (tk, tv):  # shift the kept non-sink tokens left over the evicted ones
                t[:, sink:sink + rolled] = t[:, sink + evict:sink + evict + rolled].clone()
            tf[sink:sink + rolled] = tf[sink + evict:sink + evict + rolled].clone()
            local_end = c.local_end + cur_end - c.global_end - evict
        else:
            local_end = c.local_end + cur_end - c.global_end
        local_start = local_end - new
        if local_end > size or local_start < 0:
            raise ValueError(f"upstream cache overflow: slots [{local_start}, {local_end}) of "
                             f"{size} (upstream fails here)")
        write_start = local_start
        if self.flavor == "longlive" and is_recompute and not sink_recache:
            write_start = max(local_start, sink)  # the sink is protected during recompute
        off = write_start - local_start
        if local_end > write_start:
            tk[:, write_start:local_end] = k[:, off:]
            tv[:, write_start:local_end] = v[:, off:]
            tf[write_start:local_end] = start_frame + torch.arange(off, new) // fs
        if self.flavor == "longlive" and sink > 0:
            lo = max(sink, local_end - (self.max_att - sink))
            idx = torch.cat([torch.arange(sink), torch.arange(lo, local_end)]) \
                if self.max_att > sink else torch.arange(sink)
        else:
            idx = torch.arange(max(0, local_end - self.max_att), local_end)
        out = self.attention(q, tk[:, idx], tv[:, idx])
        if layer == 0:
            seen = torch.unique_consecutive(tf[idx]).tolist()
            self.reads.append((start_frame, nf, tuple(seen)))
        keep_pointers = is_recompute and self.flavor == "longlive"
        return out, (tk, tv, tf, None if keep_pointers else (cur_end, local_end))

    # ------------------------------------------------------------------ model
    def forward(self, x: torch.Tensor, t: torch.Tensor, text, start_frame: int, *,
                sink_recache: bool = False) -> torch.Tensor:
        """Flow prediction ``[B, C, F, H, W]`` float64 of latents ``x`` at frames
        ``start_frame..``, per-frame timesteps ``t [B, F]``; updates the cache as upstream."""
        cfg, B, nf = self.cfg, x.shape[0], x.shape[2]
        pt, ph, pw = cfg.patch_size
        h = F.conv3d(x.to(torch.float64), self.w["patch_embedding.weight"],
                     self.w["patch_embedding.bias"], stride=cfg.patch_size)
        h = h.flatten(2).transpose(1, 2)  # [B, F*gh*gw, dim]
        e = self.lin(F.silu(self.lin(sinusoid(t.reshape(-1), cfg.freq_dim), "time_embedding.0")),
                     "time_embedding.2")
        e0 = self.lin(F.silu(e), "time_projection.1").view(B, nf, 6, cfg.dim)
        heads = (cfg.num_heads, cfg.head_dim)

        def frames(y):
            return y.view(B, nf, self.fs, cfg.dim)

        commits = []
        for i in range(cfg.num_layers):
            p = f"blocks.{i}."
            m = (self.w[p + "modulation"].unsqueeze(0) + e0).unsqueeze(3).unbind(2)
            y = (frames(self.ln(h)) * (1 + m[1]) + m[0]).flatten(1, 2)
            q = self.rms(self.lin(y, p + "self_attn.q"), p + "self_attn.norm_q.weight")
            k = self.rms(self.lin(y, p + "self_attn.k"), p + "self_attn.norm_k.weight")
            v = self.lin(y, p + "self_attn.v")
            a, commit = self.self_attention(i, q.unflatten(-1, heads), k.unflatten(-1, heads),
                                            v.unflatten(-1, heads), start_frame, nf,
                                            sink_recache)
            commits.append(commit)
            h = h + (frames(self.lin(a.flatten(2), p + "self_attn.o")) * m[2]).flatten(1, 2)
            y = self.ln(h, p + "norm3") if cfg.cross_attn_norm else h
            cq = self.rms(self.lin(y, p + "cross_attn.q"), p + "cross_attn.norm_q.weight")
            tk, tv = text[i]
            ca = self.attention(cq.unflatten(-1, heads), tk.expand(B, -1, -1, -1),
                                tv.expand(B, -1, -1, -1))
            h = h + self.lin(ca.flatten(2), p + "cross_attn.o")
            y = (frames(self.ln(h)) * (1 + m[4]) + m[3]).flatten(1, 2)
            y = self.lin(F.gelu(self.lin(y, p + "ffn.0"), approximate="tanh"), p + "ffn.2")
            h = h + (frames(y) * m[5]).flatten(1, 2)
        for c, (tk, tv, tf, ptr) in zip(self.kv, commits):  # _apply_cache_updates
            c.k, c.v, c.frame = tk, tv, tf
            if ptr is not None:
                c.global_end, c.local_end = ptr
        mh = (self.w["head.modulation"].unsqueeze(0) + e.view(B, nf, 1, cfg.dim)).unsqueeze(3)
        out = self.lin(frames(self.ln(h)) * (1 + mh[:, :, 1]) + mh[:, :, 0], "head.head")
        out = out.view(B, nf, self.gh, self.gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, -1, nf * pt, self.gh * ph, self.gw * pw)

    # ------------------------------------------------------------------ pipeline
    def generate_block(self, text, shape, sigmas, generator: torch.Generator) -> torch.Tensor:
        """Denoise the next block (``shape [B, C, F, H, W]``) and write its clean K/V at t = 0
        (``context_noise = 0``); returns ``x0`` float64. Noise: one draw of ``shape`` for the
        start, one per re-noise, from ``generator`` (lol_model's order)."""
        B, nf = shape[0], shape[2]
        x = randn(shape, generator, dtype=torch.float64, device="cpu")
        x0 = x
        for i, s in enumerate(sigmas):
            # upstream passes float32 timesteps; the sinusoid casts them to float64
            t = torch.full((B, nf), 1000.0 * s, dtype=torch.float32).double()
            x0 = x - s * self.forward(x, t, text, self.frame)
            if i + 1 < len(sigmas):
                sn = sigmas[i + 1]
                x = (1 - sn) * x0 + sn * randn(shape, generator, dtype=torch.float64,
                                               device="cpu")
        self.forward(x0, torch.zeros(B, nf, dtype=torch.float64), text, self.frame)
        self.output.extend(x0[:, :, f:f + 1] for f in range(nf))
        self.frame += nf
        return x0

    def recache_after_switch(self, text) -> None:
        """LongLive's ``_recache_after_switch`` under the new prompt's ``text``."""
        if not self.global_sink:
            for c in self.kv:  # buffers zeroed, pointers kept
                c.k, c.v = torch.zeros_like(c.k), torch.zeros_like(c.v)
                c.frame = torch.full_like(c.frame, -1)
        cur = self.frame
        if cur == 0:
            return
        n = cur if self.L == -1 else min(self.L, cur)
        x = torch.cat(self.output[cur - n:cur], dim=2)
        self.forward(x, torch.zeros(x.shape[0], n, dtype=torch.float64), text, cur - n,
                     sink_recache=not self.global_sink)
