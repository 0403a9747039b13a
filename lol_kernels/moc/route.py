"""Public ``moc_route``: validation, backend dispatch, the ``lol::moc_route`` custom op and the
loader of the C++/CUDA extension ``lol_kernels._C`` (op ``lol_C::moc_route``, csrc/moc/)."""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from .._checks import check_backend, check_same_device, check_shape, check_tensor
from .reference import moc_route_reference

MAX_K = 64  # the CUDA kernel keeps 64 candidates per warp; every backend shares the limit
MAX_D = 8192  # the CUDA kernel keeps one fp32 query row in shared memory
BACKENDS = ("auto", "torch", "cpp", "cuda")
EXTENSION = "lol_kernels._C"


class ExtensionFallbackWarning(RuntimeWarning):
    """``backend="auto"`` runs the PyTorch reference because the C++ extension is missing."""


def _load_extension() -> None:
    """Load ``lol_kernels._C`` (built by setup.py) into ``torch.ops``; raise if impossible."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        raise ImportError(f"{EXTENSION} is not built (installed with LOL_NO_EXTENSION=1 or "
                          "without a C++ compiler)")
    torch.ops.load_library(spec.origin)
    torch.ops.lol_C.moc_route  # noqa: B018  (raises if the library registered no router)


@functools.cache
def extension_error() -> str | None:
    """Why the extension cannot be used (``None`` when it is loaded)."""
    try:
        _load_extension()
    except Exception as e:  # any failure (missing file, ABI mismatch) means "fall back"
        return f"{type(e).__name__}: {e}"
    return None


def extension_has_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernel (built against a CUDA torch)."""
    return extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lol_C::moc_route", "CUDA")


_warned = False


def _fallback_warning(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"lk.moc_route: the C++ extension {EXTENSION} is unavailable ({reason}); "
                      "backend='auto' falls back to the PyTorch reference (slow). Rebuild with "
                      "`pip install --no-build-isolation -e .`.",
                      ExtensionFallbackWarning, stacklevel=4)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, is_cuda: bool) -> str:
    """Concrete backend for a call (evaluated once per compiled graph under torch.compile)."""
    err = extension_error()
    if backend == "auto":
        if err is not None:
            _fallback_warning(err)
            return "torch"
        if is_cuda and not extension_has_cuda():
            _fallback_warning("it was built without CUDA")
            return "torch"
        return "cuda" if is_cuda else "cpp"
    if backend == "torch":
        return backend
    if err is not None:
        raise RuntimeError(f"moc_route(backend={backend!r}) needs the C++ extension {EXTENSION}, "
                           f"which could not be loaded: {err}. Rebuild it with "
                           "`pip install --no-build-isolation -e .`")
    if backend == "cpp" and is_cuda:
        raise ValueError("backend='cpp' runs on CPU tensors; q_mean is on a CUDA device "
                         "(use backend='cuda' or 'auto')")
    if backend == "cuda":
        if not is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors; q_mean is on the CPU")
        if not extension_has_cuda():
            raise RuntimeError(f"moc_route(backend='cuda'): {EXTENSION} was built without CUDA "
                               "(torch had no CUDA at build time)")
    return backend


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
    check_backend(backend, BACKENDS)
    resolved = _resolve_backend(backend, q_mean.is_cuda)
    return _moc_route_op(q_mean, chunk_mean, k, chunk_valid, causal_limit, resolved)
