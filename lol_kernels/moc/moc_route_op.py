"""Public ``moc_route``: validation, backend dispatch and the ``lol::moc_route`` custom op over
the C++/CUDA extension ``lol_kernels._C`` (op ``lol_C::moc_route``, csrc/moc/; loaded by
:mod:`lol_kernels._dispatch`, which also decides the backend)."""

from __future__ import annotations

import torch

from .._checks import check_same_device, check_shape, check_tensor, register_forward_only
from .._dispatch import (
    ExtensionFallbackWarning,
    extension_error,
    extension_has_cuda,
    resolve_backend,
)
from .reference import moc_route_reference

MAX_K = 64  # the CUDA kernel keeps 64 candidates per warp; every backend shares the limit
MAX_D = 8192  # the CUDA kernel keeps one fp32 query row in shared memory

__all__ = ["MAX_D", "MAX_K", "ExtensionFallbackWarning", "extension_error", "extension_has_cuda",
           "moc_route"]


@torch.library.custom_op("lol::moc_route", mutates_args=())
def _moc_route_op(q_mean: torch.Tensor, chunk_mean: torch.Tensor, k: int,
                  chunk_valid: torch.Tensor | None, causal_limit: torch.Tensor | None,
                  backend: str) -> torch.Tensor:
    if backend == "torch":
        return moc_route_reference(q_mean, chunk_mean, k, chunk_valid=chunk_valid,
                                   causal_limit=causal_limit)
    return torch.ops.lol_C.moc_route(q_mean, chunk_mean, k, chunk_valid, causal_limit)


@_moc_route_op.register_fake
def _(q_mean, chunk_mean, k, chunk_valid, causal_limit, backend):
    B, T, H, _ = q_mean.shape
    return q_mean.new_empty((B, T, H, k), dtype=torch.int32)


register_forward_only(_moc_route_op, "lol::moc_route")


def moc_route(q_mean: torch.Tensor, chunk_mean: torch.Tensor, k: int, *,
              chunk_valid: torch.Tensor | None = None, causal_limit: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Mixture-of-Contexts router: the top-``k`` chunks of each query tile and head.

    Args:
        q_mean: ``[B, T, H, D]`` fp16/bf16/fp32/fp64, summary (mean) of each query tile;
            ``1 <= D <= 8192``.
        chunk_mean: ``[B, C, H, D]`` fp16/bf16/fp32/fp64, summary (mean of the un-rotated keys)
            of each chunk. The two dtypes may differ.
        k: chunks per (tile, head), ``1 <= k <= 64``. ``k`` may exceed the eligible count.
        chunk_valid: ``[B, C]`` bool or None (all valid); invalid chunks are never picked.
        causal_limit: ``[B, T]`` integer or None: chunk ``c`` is eligible for tile ``t`` only if
            ``c < causal_limit[b, t]`` (so 0 or less means no chunk, ``>= C`` means all).
        backend: ``"auto"`` (CUDA kernel on CUDA tensors, C++ on the CPU, the torch reference
            with one warning when the extension is missing), ``"torch"``, ``"cpp"``, ``"cuda"``.

    Returns:
        ``[B, T, H, k]`` int32: the eligible chunks with the ``k`` largest fp32 scores
        ``q_mean[b, t, h] . chunk_mean[b, c, h]``, in **ascending chunk order** (not score
        order), ``-1`` at the end where fewer than ``k`` chunks are eligible. Ties go to the lower
        chunk index. Scores are accumulated in fp32 in one fixed order (see
        :mod:`lol_kernels.moc.reference`), so every backend returns identical indices, even for
        near-ties. A NaN score ranks as ``-inf`` (it is still picked before ``-1`` padding).

    Example:
        >>> idx = lk.moc_route(q_mean, chunk_mean, 8, causal_limit=limit)  # [B, T, H, 8]
    """
    check_tensor("q_mean", q_mean, ndim=4, kind="float")
    B, T, H, D = q_mean.shape
    check_tensor("chunk_mean", chunk_mean, ndim=4, kind="float")
    check_shape("chunk_mean", chunk_mean, (B, None, H, D), "[B, C, H, D] with B, H, D of q_mean")
    C = chunk_mean.shape[1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"q_mean head dim D must be in [1, {MAX_D}], got {D}")
    if C >= 2**31:
        raise ValueError(f"chunk_mean must have fewer than 2^31 chunks (int32 indices), got {C}")
    if chunk_valid is not None:
        check_tensor("chunk_valid", chunk_valid, kind="bool")
        check_shape("chunk_valid", chunk_valid, (B, C), "[B, C]")
    if causal_limit is not None:
        check_tensor("causal_limit", causal_limit, kind="int")
        check_shape("causal_limit", causal_limit, (B, T), "[B, T]")
    check_same_device("q_mean", q_mean, chunk_mean=chunk_mean, chunk_valid=chunk_valid,
                      causal_limit=causal_limit)
    backend = resolve_backend("moc_route", backend, q_mean)
    return _moc_route_op(q_mean, chunk_mean, k, chunk_valid, causal_limit, backend)
