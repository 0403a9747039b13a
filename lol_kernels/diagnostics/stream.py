"""Sink-collapse metrics on a generated latent stream ``[F, Cz, H, W]``.

LoL measures sink-collapse by the normalized L2 distance of each generated latent frame to the
sink frames: when the video snaps back to its beginning that distance drops sharply. The paper
reports "Sink-Collapse Max / Avg" without a public formula, so this module defines its own,
stated exactly in :func:`stream_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_CHUNK_ELEMS = 1 << 24  # float64 elements of one frame chunk: 128 MiB at most


@dataclass(frozen=True)
class StreamMetrics:
    """Result of :func:`stream_metrics` (``F`` frames; tensors float64 / int64 on the CPU).

    Attributes:
        distance: ``[F]`` normalized L2 distance ``d_f`` to the nearest sink frame (0 on sinks).
        nearest_sink: ``[F]`` int64 index of that sink frame.
        baseline: ``[F]`` ``b_f``, median ``d`` of the recent earlier non-sink frames; NaN where
            the frame is not scored (sink frames, too little history).
        score: ``[F]`` collapse intensity ``s_f`` in ``[0, 1]``; NaN where not scored.
        collapsed: frames with ``s_f >= event_threshold``.
        events: collapse events: the first frame of each run of consecutive collapsed frames.
        score_max, score_mean: max and mean of ``s_f`` over the scored frames (0.0 if none).
    """

    distance: torch.Tensor
    nearest_sink: torch.Tensor
    baseline: torch.Tensor
    score: torch.Tensor
    collapsed: list[int]
    events: list[int]
    score_max: float
    score_mean: float

    def to_dict(self) -> dict:
        """JSON-friendly summary (per-frame curves as lists; NaN written as None)."""
        def lst(t):
            return [None if v != v else round(float(v), 6) for v in t.tolist()]
        return {"distance": lst(self.distance), "score": lst(self.score),
                "collapsed": self.collapsed, "events": self.events,
                "score_max": self.score_max, "score_mean": self.score_mean}


def _check_sinks(sink_frames, F: int) -> torch.Tensor:
    s = torch.as_tensor(list(sink_frames) if not isinstance(sink_frames, torch.Tensor)
                        else sink_frames)
    if s.dim() != 1 or s.numel() == 0 or s.is_floating_point() or s.dtype == torch.bool:
        raise ValueError(f"sink_frames must be a non-empty 1-D list of int frame indices, got "
                         f"{sink_frames!r}")
    s = s.long().cpu()
    if int(s.min()) < 0 or int(s.max()) >= F:
        raise ValueError(f"sink_frames must lie in [0, {F - 1}] (F = {F} frames), got "
                         f"{s.tolist()}")
    if s.unique().numel() != s.numel():
        raise ValueError(f"sink_frames must be distinct, got {s.tolist()}")
    return s


def _check_latents(latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.dim() != 4:
        raise ValueError(f"latents must have shape [F, Cz, H, W], got {list(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating tensor, got {latents.dtype}")
    if latents.shape[0] < 2:
        raise ValueError(f"latents must hold at least 2 frames, got F = {latents.shape[0]}")
    bad = nonfinite_frames(latents)
    if bad:
        raise ValueError(f"latents hold NaN or inf in {len(bad)} of {latents.shape[0]} frames "
                         f"(first: {bad[:8]}): the stream is broken, not measurable; "
                         f"regenerate it (lol generate stops at the first non-finite block)")
    return latents


def nonfinite_frames(latents: torch.Tensor) -> list[int]:
    """Indices of the frames of ``latents [F, ...]`` holding NaN or inf, checked a chunk of
    frames at a time (no full-size mask)."""
    F = latents.shape[0]
    x = latents.reshape(F, -1)
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
    bad = [torch.isfinite(x[a : a + step]).all(dim=1).logical_not().nonzero().flatten() + a
           for a in range(0, F, step)]
    return [int(f) for f in torch.cat(bad).cpu()] if bad else []


def l2_to_sink(latents: torch.Tensor, sink_frames: Sequence[int] | torch.Tensor, *,
               eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized L2 distance of every frame to its nearest sink frame.

    ``d_f = min_s ||x_f - x_s||_2 / max(||x_s||_2, eps)``, norms over all ``C*H*W`` elements,
    computed in float64. Dividing by the sink's own norm makes ``d`` independent of the latent
    scale: ``d_f = 0`` is an exact copy of a sink frame; an unrelated frame of the same
    statistics sits near ``sqrt(2)``.

    Args:
        latents: ``[F, Cz, H, W]`` float (any dtype / device).
        sink_frames: indices of the sink frames (e.g. ``[0, 1, 2]``).

    Returns:
        ``distance [F]`` float64 and ``nearest [F]`` int64 (the argmin sink frame), on the CPU.
    """
    x = _check_latents(latents)
    F = x.shape[0]
    s = _check_sinks(sink_frames, F)
    x = x.reshape(F, -1)
    sink = x[s.to(x.device)].to(torch.float64)  # [Ns, E]
    sink_norm = sink.norm(dim=1).clamp_min(eps)
    step = max(1, _CHUNK_ELEMS // max(1, x.shape[1]))
    dist = []
    for a in range(0, F, step):
        xf = x[a : a + step].to(torch.float64)  # [n, E]
        # direct differences (not cdist's matmul form, which leaves ~1e-8 on exact copies)
        dist.append(torch.stack([(xf - sk).norm(dim=1) for sk in sink], dim=1).cpu()
                    / sink_norm.cpu())  # [n, Ns]
    d = torch.cat(dist)
    best, arg = d.min(dim=1)
    return best, s[arg]


def stream_metrics(latents: torch.Tensor, sink_frames: Sequence[int] | torch.Tensor, *,
                   window: int = 12, min_history: int = 3,
                   event_threshold: float = 0.5) -> StreamMetrics:
    """Distance to sink, collapse events and collapse score of a latent stream.

    Definitions (``n_1 < n_2 < ...`` are the non-sink frames in order):

    * ``d_f``: :func:`l2_to_sink`, the normalized L2 distance to the nearest sink frame.
    * baseline ``b_{n_k} = median(d_{n_j} : max(0, k - window) <= j < k)``: how far from the
      sink the stream has recently been; defined once ``k >= min_history`` (else not scored).
    * collapse intensity ``s_f = clip(1 - d_f / b_f, 0, 1)``: 0 when frame ``f`` is no closer to
      a sink than the recent frames, 1 when it is an exact copy of a sink frame, 0.5 when it is
      half as far as usual. Because the baseline follows the recent frames, a slow drift is not a
      collapse; only a sharp drop is.
    * a frame is *collapsed* if ``s_f >= event_threshold``; a collapse *event* is the first
      frame of each run of consecutive collapsed non-sink frames.
    * collapse score: ``score_max = max_f s_f`` and ``score_mean = mean_f s_f`` over the scored
      frames (0 if no frame is scored). Both lie in ``[0, 1]``; lower is better.

    Args:
        latents: ``[F, Cz, H, W]`` float latent frames, in generation order.
        sink_frames: indices of the sink frames kept in the cache (e.g. ``[0, 1, 2]``).
        window: frames in the trailing baseline (LongLive's cache: 12).
        min_history: earlier non-sink frames needed before a frame is scored.
        event_threshold: ``s_f`` level that marks a collapsed frame, in ``(0, 1]``.

    Returns:
        :class:`StreamMetrics`.

    Example:
        >>> m = stream_metrics(torch.randn(40, 4, 8, 8), [0, 1, 2])
        >>> m.events
        []
    """
    for name, v, lo in (("window", window, 1), ("min_history", min_history, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if min_history > window:
        raise ValueError(f"min_history must be <= window ({window}), got {min_history}")
    if not isinstance(event_threshold, (int, float)) or not 0 < event_threshold <= 1:
        raise ValueError(f"event_threshold must be in (0, 1], got {event_threshold!r}")
    d, nearest = l2_to_sink(latents, sink_frames)
    F = d.numel()
    sinks = _check_sinks(sink_frames, F)
    is_sink = torch.zeros(F, dtype=torch.bool)
    is_sink[sinks] = True
    ns = (~is_sink).nonzero().flatten()  # non-sink frames in order
    dn = d[ns]
    n = dn.numel()
    # trailing window of the `window` earlier non-sink distances (NaN-padded before the start)
    padded = torch.cat([torch.full((window,), float("nan"), dtype=torch.float64), dn])
    hist = padded.unfold(0, window, 1)[:n]  # row k = dn[k - window : k]
    base_n = hist.nanmedian(dim=1).values if n else dn
    k = torch.arange(n)
    base_n = torch.where(k >= min_history, base_n, torch.nan)
    score_n = (1 - dn / base_n.clamp_min(1e-300)).clamp(0, 1)
    score_n = torch.where(torch.isnan(base_n), torch.nan, score_n)
    baseline = torch.full((F,), float("nan"), dtype=torch.float64)
    score = torch.full((F,), float("nan"), dtype=torch.float64)
    baseline[ns] = base_n
    score[ns] = score_n

    hit = (score_n >= event_threshold) & ~torch.isnan(score_n)
    collapsed = [int(f) for f in ns[hit]]
    starts = hit & ~torch.cat([torch.zeros(1, dtype=torch.bool), hit[:-1]])
    events = [int(f) for f in ns[starts]]
    scored = score_n[~torch.isnan(score_n)]
    smax = float(scored.max()) if scored.numel() else 0.0
    smean = float(scored.mean()) if scored.numel() else 0.0
    return StreamMetrics(d, nearest, baseline, score, collapsed, events, smax, smean)
