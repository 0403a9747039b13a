"""Public ``apply_rope``: validation, backend dispatch and the ``lol::apply_rope`` custom op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import (
    check_host_positions,
    check_no_grad_transform,
    check_positions_fit,
    check_same_device,
    check_tensor,
    register_forward_only,
    value_checks_enabled,
)
from .._dispatch import resolve_backend, triton_kernel
from .rope_cpu import apply_rope_torch
from .table import RopeTable


def check_table(table, num_heads: int | None, head_dim: int, num_axes: int | None = None,
                heads_name: str = "x"):
    """Validate a :class:`RopeTable` against the tensor it rotates."""
    if not isinstance(table, RopeTable):
        raise TypeError(f"table must be a RopeTable (lk.rope_frequencies), got {type(table).__name__}")
    if table.head_dim != head_dim:
        raise ValueError(f"table has head_dim {table.head_dim} but {heads_name} has D={head_dim}")
    if num_heads is not None and table.num_heads != num_heads:
        raise ValueError(f"table must have one row per head of {heads_name} ({num_heads}), "
                         f"got {table.num_heads} heads")
    if num_axes is not None and table.num_axes > num_axes:
        raise ValueError(f"positions have A={num_axes} axes but table needs {table.num_axes}")


@torch.library.custom_op("lol::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor,
                   pair_axis: torch.Tensor, backend: str,
                   axes: Sequence[int] | None = None) -> torch.Tensor:
    if x.numel() == 0:  # no token, head or batch row: nothing to rotate (no backend call)
        return x.new_empty(x.shape)
    table = RopeTable.from_tensors(freqs, pair_axis, axes)
    fn = triton_kernel("apply_rope") if backend == "triton" else apply_rope_torch
    return fn(x, pos, table).contiguous()  # the layout the fake implementation promises


@_apply_rope_op.register_fake
def _(x, pos, freqs, pair_axis, backend, axes=None):
    return x.new_empty(x.shape)  # contiguous, whatever x's strides


register_forward_only(_apply_rope_op, "lol::apply_rope")


def apply_rope(x: torch.Tensor, pos: torch.Tensor, table: RopeTable, *,
               backend: str = "auto", validate: bool | None = None) -> torch.Tensor:
    """Rotate ``x`` with per-head (optionally jittered) 3D RoPE.

    Args:
        x: ``[..., N, H, D]`` fp16/bf16/fp32/fp64 (queries or keys, un-rotated).
        pos: ``[..., N, A]`` integer positions, ``A >= table.num_axes`` (``t, h, w`` for video);
            leading dims equal to those of ``x``.
        table: :class:`RopeTable` with ``H`` rows (one per head of ``x``).
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"``, ``"triton"``
            (fp64 and head dims the kernel lacks run the torch path; docs/design.md §3).
        validate: also check that ``pos`` fits int32 (a host sync); ``None``: when
            ``LOL_VALIDATE=1``.

    Returns:
        ``[..., N, H, D]`` contiguous, in ``x.dtype``: pair ``j`` of head ``h`` rotated by
        ``pos[..., axis(j)] * freqs[h, j]``. Angles are formed in float64 and reduced mod 2 pi,
        so positions up to 2^24 stay accurate. Forward-only (``backward`` raises).

    Example:
        >>> table = lk.rope_frequencies(128, 12, jitter_sigma=0.8)
        >>> y = lk.apply_rope(torch.randn(1, 1560, 12, 128), pos, table)
    """
    check_tensor("x", x, kind="float")
    if x.dim() < 3:
        raise ValueError(f"x must be [..., N, H, D] (at least 3 dims), got shape {tuple(x.shape)}")
    check_tensor("pos", pos, ndim=x.dim() - 1, kind="int")
    if tuple(pos.shape[:-1]) != tuple(x.shape[:-2]):
        raise ValueError(f"pos must have shape [{', '.join(map(str, x.shape[:-2]))}, A] "
                         f"matching x [..., N, H, D], got {list(pos.shape)}")
    check_same_device("x", x, pos=pos)
    check_table(table, x.shape[-2], x.shape[-1], pos.shape[-1])
    if value_checks_enabled(validate):
        check_positions_fit("pos", pos)
    else:
        check_host_positions("pos", pos)
    backend = resolve_backend("apply_rope", backend, x)
    t = table.to(x.device)
    check_no_grad_transform("lol::apply_rope", x)
    return _apply_rope_op(x, pos, t.freqs, t.pair_axis, backend, list(t.axes))
