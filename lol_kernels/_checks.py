"""Input validation shared by every public op.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong rank, shape,
device or range) with a message that names the argument and states what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, x, *, ndim: int | None = None, kind: str | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` and of a float/int/bool ``kind``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if kind == "float" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if kind == "int" and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of positions/ids, got {x.dtype}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {list(dtypes)}, got {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str = ""):
    """Check ``x.shape`` against ``expected`` (``None`` matches any size)."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {want}{extra}, got {list(x.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **tensors):
    """Every tensor given (``None`` skipped) must have ``ref``'s dtype."""
    for name, t in tensors.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def check_keys_values(q: torch.Tensor, k_name: str, k: torch.Tensor, v_name: str, v):
    """Keys ``k [..., Hkv, D]`` (checked by the caller) and values ``v`` shaped like them, both
    in q's dtype, with ``Hq = q.shape[2]`` a whole multiple of ``Hkv`` (GQA groups)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of {k_name} heads Hkv={Hkv} (GQA)")
    check_tensor(v_name, v, ndim=k.dim(), kind="float")
    check_shape(v_name, v, tuple(k.shape), f"like {k_name}")
    check_same_dtype("q", q, **{k_name: k, v_name: v})


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when ``None``, else a positive number."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def value_checks_enabled() -> bool:
    """Checks that read tensor values (ranges of ids and positions) need a host sync and a
    concrete value; they run in eager mode and are skipped while torch.compile traces."""
    return not torch.compiler.is_compiling()


def check_positions_fit(name: str, pos: torch.Tensor, limit: int = 2**31 - 1):
    """Positions must fit int32 arithmetic in the kernels (and be finite integers)."""
    if value_checks_enabled() and pos.numel() and (pos.max().item() > limit or pos.min().item() < -limit):
        raise ValueError(f"{name} must hold positions in [-{limit}, {limit}] (int32), "
                         f"got range [{pos.min().item()}, {pos.max().item()}]")
