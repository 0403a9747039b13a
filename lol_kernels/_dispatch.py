"""The one place that decides which backend runs an op (docs/design.md §3).

Every public op calls :func:`resolve_backend` once, before its ``torch.library`` custom op, and
passes the concrete name on:

* ``apply_rope``, ``paged_attention``, ``rope_attention``, ``moc_attention`` (``"torch"``,
  ``"triton"``): ``"auto"`` is Triton on CUDA tensors when the kernel module imports, else torch.
  The Triton kernels take fp16/bf16/fp32 and a power-of-two head dim in [16, 256]
  (``kernel_supports``); any other input runs the torch path, a forced ``"triton"`` included.
* ``moc_route`` (``"torch"``, ``"cpp"``, ``"cuda"``): ``"auto"`` is the C++/CUDA extension
  ``lol_kernels._C`` for the tensors' device, or the torch reference with one
  :class:`ExtensionFallbackWarning` when the extension cannot be used.

A name not in the op's list raises ``ValueError`` and a backend that cannot run here raises
``RuntimeError``, each with one message for every op (:func:`check_backend`,
:func:`unavailable`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import warnings

import torch

#: concrete backends of every op (``"auto"`` is accepted by all of them)
BACKENDS = {
    "apply_rope": ("torch", "triton"),
    "paged_attention": ("torch", "triton"),
    "rope_attention": ("torch", "triton"),
    "moc_attention": ("torch", "triton"),
    "moc_route": ("torch", "cpp", "cuda"),
}
#: op -> (module, function) of its Triton wrapper, imported on first use (Triton is optional)
TRITON_KERNELS = {
    "apply_rope": ("lol_kernels.rope.rope_triton", "apply_rope_triton"),
    "paged_attention": ("lol_kernels.attention.attention_triton", "paged_attention_triton"),
    "rope_attention": ("lol_kernels.attention.attention_triton", "rope_attention_triton"),
    "moc_attention": ("lol_kernels.moc.moc_attention_triton", "moc_attention_triton"),
}
EXTENSION = "lol_kernels._C"  # the router's C++/CUDA extension (csrc/moc), op lol_C::moc_route
REBUILD = "rebuild it with `pip install --no-build-isolation -e .`"


class ExtensionFallbackWarning(RuntimeWarning):
    """``backend="auto"`` runs the PyTorch reference because the C++ extension is missing."""


def check_backend(op: str, backend) -> str:
    """``backend`` must be ``"auto"`` or one of ``op``'s backends; raises ``ValueError``."""
    allowed = ["auto", *BACKENDS[op]]
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"backend must be one of {allowed} for {op}, got {backend!r}")
    return backend


def unavailable(op: str, backend: str, why: str) -> RuntimeError:
    """The error of a backend that cannot run here, saying why."""
    return RuntimeError(f"{op}(backend={backend!r}) is unavailable: {why}")


def triton_kernel(op: str):
    """The Triton wrapper of ``op`` (imports Triton); raises :func:`unavailable` without it."""
    module, name = TRITON_KERNELS[op]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise unavailable(op, "triton", str(e)) from e


def triton_available(op: str = "paged_attention") -> bool:
    """Whether ``op``'s Triton kernel module imports (Triton installed, kernels build)."""
    try:
        triton_kernel(op)
    except RuntimeError:
        return False
    return True


def kernel_input_error(op: str, name: str, x: torch.Tensor) -> ValueError:
    """The error of a Triton wrapper called directly with an input its kernel lacks (``op``
    itself runs such inputs on the torch path: :func:`resolve_backend`)."""
    return ValueError(f"{name} must be fp16/bf16/fp32 with a power-of-two head dim in [16, 256] "
                      f"for the Triton kernel, got {x.dtype} with D={x.shape[-1]} "
                      f"(lk.{op}(..., backend='triton') runs it on the torch path)")


def launch_device(x: torch.Tensor):
    """A context making ``x``'s CUDA device the current one for a kernel launch (Triton launches
    on the current device and stream, not on the arguments'); a no-op off CUDA. No sync."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def load_extension() -> None:
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
        load_extension()
    except Exception as e:  # any failure (missing file, ABI mismatch) means "fall back"
        return f"{type(e).__name__}: {e}"
    return None


def extension_has_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernel (built against a CUDA torch)."""
    return extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lol_C::moc_route", "CUDA")


@functools.cache
def warn_extension_fallback(op: str, reason: str) -> None:
    """One warning per process and reason: ``op`` runs the slow PyTorch reference."""
    warnings.warn(f"lk.{op}: the C++ extension {EXTENSION} is unavailable ({reason}); "
                  f"backend='auto' falls back to the PyTorch reference (slow); {REBUILD}.",
                  ExtensionFallbackWarning, stacklevel=5)


@torch.compiler.assume_constant_result
def extension_backend(op: str, backend: str, is_cuda: bool) -> str:
    """Concrete backend of an op served by the extension (once per graph under compile)."""
    err = extension_error()
    if backend == "auto":
        if err is None and (not is_cuda or extension_has_cuda()):
            return "cuda" if is_cuda else "cpp"
        warn_extension_fallback(op, err or "it was built without CUDA")
        return "torch"
    if backend == "torch":
        return backend
    if err is not None:
        raise unavailable(op, backend, f"the C++ extension {EXTENSION} could not be loaded "
                                       f"({err}); {REBUILD}")
    if is_cuda != (backend == "cuda"):
        need, here = ("CPU", "a CUDA device") if is_cuda else ("CUDA", "the CPU")
        raise ValueError(f"{op}(backend={backend!r}) runs on {need} tensors; the inputs are on "
                         f"{here} (use backend='auto')")
    if backend == "cuda" and not extension_has_cuda():
        raise unavailable(op, backend, f"{EXTENSION} was built without CUDA (torch had no "
                                       f"CUDA at build time); {REBUILD}")
    return backend


@torch.compiler.assume_constant_result
def triton_ready(op: str) -> bool:
    """:func:`triton_available` evaluated once per graph under ``torch.compile``."""
    return triton_available(op)


def resolve_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """The concrete backend that runs ``op`` on inputs like ``x`` (its device, dtype and last
    dim, the head dim); ``backend`` is the user's choice, checked here. An attention input
    that no kernel config fits in shared memory (fp32 at D = 256:
    ``common.triton_attention.launch_refusal``) runs the torch path with one
    ``KernelFallbackWarning``, never an out-of-resources launch."""
    check_backend(op, backend)
    if op not in TRITON_KERNELS:
        return extension_backend(op, backend, x.is_cuda)
    if backend == "torch" or (backend == "auto" and not (x.is_cuda and triton_ready(op))):
        return "torch"
    if not triton_ready(op):  # a forced "triton" without Triton: say why
        triton_kernel(op)
    # these import Triton: only once the kernel did
    from .common.triton_attention import kernel_launchable
    from .common.triton_utils import kernel_supports

    if not kernel_supports(x.dtype, x.shape[-1]):
        return "torch"
    # an input no kernel config fits (fp32 at D = 256) runs the torch path, with a warning
    return "triton" if kernel_launchable(op, x.dtype, x.shape[-1], x.device) else "torch"
