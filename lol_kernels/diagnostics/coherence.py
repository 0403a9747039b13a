"""RoPE phase coherence: where the heads of a RoPE table re-align (LoL's sink-collapse analysis).

RoPE rotates channel pair ``i`` of head ``h`` by ``omega_{h,i} * pos``, so a query at distance
``Delta`` from a key sees that pair turned by ``omega_{h,i} * Delta``. The phase-coherence kernel

    ``C_h(Delta) = | (1/K) sum_i exp(j omega_{h,i} Delta) |``   (K pairs of the chosen axis)

is 1 at ``Delta = 0`` and, for most ``Delta``, about ``1 / sqrt(K)``. Where many frequencies
re-align at once it peaks: the far frame then "looks like" a near one to that head. LoL observed
that Wan-based models snap back to their sink frames at latent frames ~132 and ~201, where the
Wan temporal table (K = 22, ``omega_i = 10000 ** (-2 i / 44)``) has such peaks; when every head
has the same table, every head peaks at the same ``Delta`` (multi-head synchronization). Per-head
jitter of the base (``theta_h = theta (1 + sigma eps_h)``) moves each head's peaks elsewhere.

Ranges: every function takes ``min_delta < Delta <= max_delta`` (integers), matching the usual
statement "over Delta in (100, 400]".
"""

from __future__ import annotations

import math

import torch

from ..rope.table import RopeTable

# Elements of one [H, chunk, K] float64 angle block: 1 Mi * 8 B = 8 MiB (cache-friendly).
_WORK_ELEMS = 1 << 20


def axis_frequencies(table: RopeTable, axis: int = 0) -> torch.Tensor:
    """The ``[H, K]`` float64 frequencies of the pairs that ``axis`` drives (``K`` pairs)."""
    if not isinstance(table, RopeTable):
        raise TypeError(f"table must be a RopeTable, got {type(table).__name__}")
    if not isinstance(axis, int) or not 0 <= axis < table.num_axes:
        raise ValueError(f"axis must be an int in [0, {table.num_axes - 1}], got {axis!r}")
    sel = (table.pair_axis.cpu() == axis).nonzero().flatten()
    if sel.numel() == 0:
        raise ValueError(f"axis {axis} drives no channel pair of this table")
    return table.freqs.detach().cpu().to(torch.float64)[:, sel]


def phase_coherence(table: RopeTable, deltas, axis: int = 0, *,
                    chunk: int | None = None) -> torch.Tensor:
    """Per-head phase coherence ``C_h(Delta)`` of one position axis of a RoPE table.

    Args:
        table: :class:`~lol_kernels.RopeTable` (``freqs [H, D/2]``).
        deltas: ``[N]`` distances (int or float; a sequence or a 1-D tensor). Any size: they are
            processed in chunks so the work memory stays ~8 MiB per temporary whatever ``N`` is.
        axis: position axis whose pairs are summed (0 = time for Wan tables).
        chunk: force the direct path (one ``cos``/``sin`` per distance and pair) with this many
            distances per chunk. By default a run of consecutive integers (what
            :func:`predict_collapse` and :func:`synchronized_events` pass) takes the fast path:
            ``Delta = start + L u + v`` so ``exp(j w Delta) = exp(j w (start + L u)) exp(j w v)``
            and the sum over pairs is one complex matmul ``[U, K] @ [K, L]`` per head, with
            ``L ~ sqrt(N)``; other inputs take the direct path.

    Returns:
        ``[H, N]`` float64 tensor on the CPU, ``C_h(Delta) = |mean_i exp(j omega_{h,i} Delta)|``
        over the ``K`` pairs of ``axis``; values in ``[0, 1]``, 1 at ``Delta = 0``.

    Example:
        >>> t = rope_frequencies(128, 12)
        >>> phase_coherence(t, [0, 133]).shape
        torch.Size([12, 2])
    """
    w = axis_frequencies(table, axis)  # [H, K]
    d = torch.as_tensor(deltas, dtype=torch.float64).cpu()
    if d.dim() != 1:
        raise ValueError(f"deltas must be 1-D, got shape {list(d.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("deltas must be finite")
    H, K = w.shape
    if chunk is None:
        n = d.numel()
        if n >= 64 and bool((d == d.round()).all()) and bool((d.diff() == 1).all()):
            return _coherence_run(w, float(d[0]), n)
        chunk = max(1, _WORK_ELEMS // (H * K))
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    out = torch.empty(H, d.numel(), dtype=torch.float64)
    for s in range(0, d.numel(), chunk):
        # float64 angles: |omega * Delta| <= 2e5 rad keeps ~1e-11 rad absolute error
        a = w[:, None, :] * d[None, s : s + chunk, None]  # [H, n, K]
        re = torch.cos(a).mean(-1)
        im = torch.sin(a).mean(-1)
        out[:, s : s + chunk] = torch.hypot(re, im)
    return out


def _coherence_run(w: torch.Tensor, start: float, n: int) -> torch.Tensor:
    """``C_h`` at ``start, start + 1, ..., start + n - 1`` by the factorized matmul (see above)."""
    H, K = w.shape
    L = max(1, math.isqrt(n - 1) + 1)  # ceil(sqrt(n))
    U = -(-n // L)
    v = torch.arange(L, dtype=torch.float64)
    a_lo = w[:, :, None] * v  # [H, K, L]
    e_lo = torch.complex(torch.cos(a_lo), torch.sin(a_lo))
    out = torch.empty(H, U * L, dtype=torch.float64)
    rows = max(1, _WORK_ELEMS // (H * max(K, L)))
    for u0 in range(0, U, rows):
        u = torch.arange(u0, min(U, u0 + rows), dtype=torch.float64)
        a_hi = w[:, None, :] * (start + L * u)[None, :, None]  # [H, r, K], exact float64 angles
        e_hi = torch.complex(torch.cos(a_hi), torch.sin(a_hi))
        out[:, u0 * L : (u0 + u.numel()) * L] = (e_hi @ e_lo).abs().flatten(1) / K
    return out[:, :n].clamp_(max=1.0)


def _delta_range(min_delta: int, max_delta: int) -> torch.Tensor:
    for name, v in (("min_delta", min_delta), ("max_delta", max_delta)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if max_delta <= min_delta:
        raise ValueError(f"max_delta must be > min_delta, got ({min_delta}, {max_delta}]")
    return torch.arange(min_delta + 1, max_delta + 1, dtype=torch.int64)


def _check_unit(name: str, v, *, closed_low: bool = True):
    if not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0) or (not closed_low and v == 0):
        raise ValueError(f"{name} must be a number in {'[' if closed_low else '('}0, 1], got {v!r}")


def mean_coherence(table: RopeTable, deltas, axis: int = 0) -> torch.Tensor:
    """Head-averaged coherence ``mean_h C_h(Delta)``: ``[N]`` float64."""
    return phase_coherence(table, deltas, axis).mean(dim=0)


def local_maxima(values: torch.Tensor) -> torch.Tensor:
    """Indices ``i`` (interior only) with ``v[i-1] < v[i] >= v[i+1]``; a plateau counts once.

    Args:
        values: ``[N]`` real tensor. Returns ``[n]`` int64 indices in ``1..N-2``, ascending.
    """
    v = values
    if v.numel() < 3:
        return torch.zeros(0, dtype=torch.int64)
    m = (v[1:-1] > v[:-2]) & (v[1:-1] >= v[2:])
    return m.nonzero().flatten() + 1


def predict_collapse(table: RopeTable, *, threshold: float, min_delta: int, max_delta: int,
                     axis: int = 0) -> list[int]:
    """Distances where sink-collapse is predicted: peaks of the head-averaged coherence.

    Returns every integer ``Delta`` with ``min_delta < Delta <= max_delta`` where
    ``c(Delta) = mean_h C_h(Delta)`` is a local maximum (``c(Delta-1) < c(Delta) >= c(Delta+1)``,
    neighbours evaluated even just outside the range) and ``c(Delta) > threshold``.
    ``Delta`` is the distance from the sink frame, so with the sink at frame 0 it is the latent
    frame index of the predicted snap-back.

    Example (checked in the tests): the Wan table at ``sigma = 0``, ``head_dim = 128``,
    ``threshold = 0.55`` over ``(100, 400]`` gives ``[107, 133, 163, 201]``.

    Returns:
        ascending ``list[int]``.
    """
    _check_unit("threshold", threshold)
    d = _delta_range(min_delta, max_delta)
    ext = torch.cat([d[:1] - 1, d, d[-1:] + 1])  # neighbours of both ends
    c = mean_coherence(table, ext, axis)
    peaks = local_maxima(c)
    peaks = peaks[c[peaks] > threshold]
    return [int(x) for x in ext[peaks]]


def head_fraction_above(table: RopeTable, deltas, *, threshold: float,
                        axis: int = 0) -> torch.Tensor:
    """``[N]`` float64: fraction of heads whose ``C_h(Delta) > threshold``, per distance."""
    _check_unit("threshold", threshold)
    C = phase_coherence(table, deltas, axis)
    return (C > threshold).to(torch.float64).mean(dim=0)


def synchronized_events(table: RopeTable, *, threshold: float = 0.5, min_fraction: float = 1.0,
                        min_delta: int = 100, max_delta: int = 172800,
                        axis: int = 0) -> torch.Tensor:
    """Distances where (at least) ``min_fraction`` of the heads are coherent at once.

    LoL's multi-head synchronization: a distance where many heads have ``C_h > threshold``
    together, so all of them over-attend the sink frames at the same time. With identical heads
    (no jitter) every coherent distance is synchronized; jitter de-synchronizes the heads.

    Args:
        threshold: per-head coherence level, strict ``C_h(Delta) > threshold``.
        min_fraction: in ``(0, 1]``; 1.0 = every head.
        min_delta, max_delta: range ``min_delta < Delta <= max_delta`` (default: past 100 frames
            up to 12 h of latent frames, 172,800).

    Returns:
        ``[n]`` int64 tensor of the synchronized distances, ascending. Each is one distance, so
        a broad peak contributes several consecutive entries.
    """
    _check_unit("min_fraction", min_fraction, closed_low=False)
    d = _delta_range(min_delta, max_delta)
    frac = head_fraction_above(table, d, threshold=threshold, axis=axis)
    # fraction of H heads is k/H exactly; compare with a tolerance against float rounding
    return d[frac >= min_fraction - 1e-12]


def count_runs(deltas: torch.Tensor) -> int:
    """Number of runs of consecutive integers in an ascending ``[n]`` tensor (peaks, not points)."""
    if deltas.numel() == 0:
        return 0
    return int((deltas.diff() != 1).sum().item()) + 1

