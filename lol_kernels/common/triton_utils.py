"""Host-side helpers of the Triton launchers: interpreter detection, device checks, layouts,
the attention outputs."""

from __future__ import annotations

import torch
import triton

from .._checks import check_out_buffer


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a jit function or an autotuner around one) was built under
    ``TRITON_INTERPRET=1``, i.e. it runs on CPU tensors and cannot be compiled or autotuned."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, (triton.runtime.jit.JITFunction, InterpretedFunction)):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def kernel_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """The RoPE kernels take fp16/bf16/fp32 and a power-of-two head dim in [16, 256]
    (``tl.arange`` extents); the wrappers send anything else to the torch path."""
    return dtype in (torch.float16, torch.bfloat16, torch.float32) and 16 <= head_dim <= 256 \
        and head_dim & (head_dim - 1) == 0


def check_kernel_device(kernel, x: torch.Tensor):
    """A GPU-compiled kernel needs CUDA tensors; say so instead of Triton's driver error."""
    if x.device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"the Triton kernel needs CUDA tensors (got {x.device}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before lol_kernels' Triton kernel modules are first imported")


def fast_trig(kernel) -> bool:
    """Whether a launch of ``kernel`` may use the MUFU sin/cos (compiled for a GPU), or must use
    the portable polynomials (the interpreter runs no inline assembly)."""
    return not is_interpreted(kernel)


def last_contig(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with a unit last stride (a copy only when needed): the kernels index the last dim
    with stride 1 (vectorised loads). ``None`` passes through."""
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def stride_args(*pairs) -> dict[str, int]:
    """Stride keyword arguments of a launch: ``(x, "stride_a stride_b ...")`` pairs name the
    strides of ``x``'s leading dims in order; an absent ``x`` (``None``) gets 0s (its loads
    never run)."""
    return {name: x.stride(d) if x is not None else 0
            for x, names in pairs for d, name in enumerate(names.split())}


def attention_outputs(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None):
    """``out [B, N, Hq, D]`` in q's dtype and ``lse [B, Hq, N]`` fp32 on q's device for a
    launch on ``q [B, N, Hq, D]``: the caller's buffers, checked (shape, dtype, device, a unit
    last stride; ``ValueError``/``TypeError`` naming the buffer), or new contiguous ones, the
    layout the custom ops' fake implementations promise."""
    B, N, Hq, _ = q.shape
    check_out_buffer("out", out, q.shape, q.dtype, q.device)
    check_out_buffer("lse", lse, (B, Hq, N), torch.float32, q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    return out, lse


__all__ = ["attention_outputs", "check_kernel_device", "fast_trig", "is_interpreted",
           "kernel_supports", "last_contig", "stride_args"]
