"""Per-head jittered 3D RoPE frequency tables (docs/design.md §4).

The head dimension ``D`` splits into ``D // 2`` interleaved channel pairs: pair ``j`` is channels
``(2j, 2j + 1)``, rotated as one complex number. Pairs are grouped by position axis, axes in
order (``0 = t``, ``1 = h``, ``2 = w`` for video): with the Wan split at ``D = 128`` the real
channels are ``44 / 42 / 42`` so pairs ``0..21`` are temporal, ``22..42`` height, ``43..63``
width. Pair ``i`` of axis ``a`` (``i`` counted within the axis) has angular frequency
``omega = theta_h ** (-2 i / axes[a])``.

LoL's multi-head jitter gives head ``h`` its own base ``theta_h = theta (1 + sigma eps_h)`` with
``eps_h ~ U[-1, 1]`` drawn from a seeded ``torch.Generator`` (exact draw in
:func:`rope_frequencies`), on the axes listed in ``jitter_axes`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._checks import check_seed


def wan_axes(head_dim: int) -> tuple[int, int, int]:
    """Wan's real-channel split of ``head_dim`` over (t, h, w): ``d - 4(d//6), 2(d//6), 2(d//6)``."""
    hw = 2 * (head_dim // 6)
    return (head_dim - 2 * hw, hw, hw)


@dataclass(frozen=True)
class RopeTable:
    """Frequencies of every channel pair of every head.

    Attributes:
        freqs: ``[H, D // 2]`` float64 angular frequency of pair ``j`` of head ``h``.
        pair_axis: ``[D // 2]`` int64, the position axis that drives pair ``j``.
        axes: real channels per axis (sums to ``D``).
        theta_h: ``[H, A]`` float64 base of each head on each axis (after jitter).
    """

    freqs: torch.Tensor
    pair_axis: torch.Tensor
    axes: tuple[int, ...]
    theta_h: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_tensors(cls, freqs: torch.Tensor, pair_axis: torch.Tensor,
                     axes: Sequence[int] | None = None) -> RopeTable:
        """Rebuild a table from its two tensors and ``axes`` (how custom ops receive it: the
        tensors stay where they are). Without ``axes`` they are counted from ``pair_axis``,
        which reads it on the host (a sync for a device tensor)."""
        if axes is None:
            axes = [2 * c for c in torch.bincount(pair_axis.cpu()).tolist()]
        return cls(freqs, pair_axis, tuple(int(a) for a in axes))

    @property
    def num_heads(self) -> int:
        return self.freqs.shape[0]

    @property
    def head_dim(self) -> int:
        return 2 * self.freqs.shape[1]

    @property
    def num_axes(self) -> int:
        return len(self.axes)

    def to(self, device) -> RopeTable:
        """The same table with ``freqs``/``pair_axis`` on ``device`` (memoized)."""
        device = torch.device(device)
        if self.freqs.device == device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            th = None if self.theta_h is None else self.theta_h.to(device)
            self._cache[key] = RopeTable(self.freqs.to(device), self.pair_axis.to(device),
                                         self.axes, th)
        return self._cache[key]

    def heads(self, start: int, stop: int) -> RopeTable:
        """The table of heads ``start..stop-1`` only: exactly those rows of ``freqs`` and
        ``theta_h`` (jitter included), e.g. one rank's heads under head parallelism."""
        if not (isinstance(start, int) and isinstance(stop, int)
                and 0 <= start < stop <= self.num_heads):
            raise ValueError(f"start, stop must satisfy 0 <= start < stop <= {self.num_heads}, "
                             f"got {start!r}, {stop!r}")
        th = None if self.theta_h is None else self.theta_h[start:stop].clone()
        return RopeTable(self.freqs[start:stop].clone(), self.pair_axis, self.axes, th)

    def axis_shared(self, axis: int) -> bool:
        """True when every head has the same frequencies on ``axis`` (not jittered there)."""
        key = ("axis", axis)
        if key not in self._cache:
            f = self.freqs[:, self.pair_axis.to(self.freqs.device) == axis]
            self._cache[key] = bool((f == f[:1]).all())
        return self._cache[key]

    def heads_share_freqs(self, group: int) -> bool:
        """True when every run of ``group`` consecutive heads has identical frequencies.

        Then GQA keys can be rotated once per KV head instead of once per query head.
        """
        key = ("share", group)
        if key not in self._cache:
            f = self.freqs.view(-1, group, self.freqs.shape[1])
            self._cache[key] = bool((f == f[:, :1]).all())
        return self._cache[key]


def rope_frequencies(head_dim: int, num_heads: int, *, theta: float = 10000.0,
                     axes: Sequence[int] | None = None, jitter_sigma: float = 0.0,
                     jitter_axes: Sequence[int] = (0,), seed: int = 0) -> RopeTable:
    """Build the RoPE table of ``num_heads`` heads of size ``head_dim``.

    Args:
        head_dim: ``D``, even.
        num_heads: ``H``, one row of frequencies per (query) head.
        theta: base ``theta0``.
        axes: real channels per position axis (each even, summing to ``D``); ``None`` = Wan's
            3D split (:func:`wan_axes`).
        jitter_sigma: ``sigma`` in ``[0, 1)``; 0 = no jitter (all heads identical).
        jitter_axes: axes whose base is jittered (LoL: the temporal axis 0; any subset works).
        seed: seed of the draw ``eps = torch.rand(H, generator=Generator().manual_seed(seed),
            dtype=float64) * 2 - 1``.

    Returns:
        :class:`RopeTable` with ``freqs [H, D//2]`` float64 and ``pair_axis [D//2]`` int64.

    Example:
        >>> t = rope_frequencies(128, 12, jitter_sigma=0.8)
        >>> t.freqs.shape, t.axes
        (torch.Size([12, 64]), (44, 42, 42))
    """
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not (isinstance(theta, (int, float)) and theta > 1.0):
        raise ValueError(f"theta must be a number > 1, got {theta!r}")
    if not (isinstance(jitter_sigma, (int, float)) and 0.0 <= jitter_sigma < 1.0):
        raise ValueError(f"jitter_sigma must be in [0, 1), got {jitter_sigma!r}")
    axes = tuple(wan_axes(head_dim) if axes is None else (int(a) for a in axes))
    if not axes or any(a <= 0 or a % 2 for a in axes) or sum(axes) != head_dim:
        raise ValueError(f"axes must be positive even channel counts summing to head_dim="
                         f"{head_dim}, got {axes}")
    jitter_axes = tuple(int(a) for a in jitter_axes)
    if any(a < 0 or a >= len(axes) for a in jitter_axes):
        raise ValueError(f"jitter_axes must index axes 0..{len(axes) - 1}, got {jitter_axes}")

    g = torch.Generator().manual_seed(check_seed("seed", seed))
    eps = torch.rand(num_heads, generator=g, dtype=torch.float64) * 2 - 1
    theta_h = torch.full((num_heads, len(axes)), float(theta), dtype=torch.float64)
    for a in jitter_axes:
        theta_h[:, a] = theta * (1 + jitter_sigma * eps)

    freqs, pair_axis = [], []
    for a, n in enumerate(axes):
        i = torch.arange(n // 2, dtype=torch.float64)
        freqs.append(theta_h[:, a : a + 1] ** (-2.0 * i / n))
        pair_axis.append(torch.full((n // 2,), a, dtype=torch.int64))
    return RopeTable(torch.cat(freqs, dim=1), torch.cat(pair_axis), axes, theta_h)
