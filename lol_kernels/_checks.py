"""Input validation shared by every public op.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong rank, shape,
device or range) with a message that names the argument and states what was expected.
"""

from __future__ import annotations

import math
import operator
import os
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
    if Hkv == 0:
        raise ValueError(f"{k_name} must have at least one head (Hkv >= 1), got shape "
                         f"{list(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of {k_name} heads Hkv={Hkv} (GQA)")
    check_tensor(v_name, v, ndim=k.dim(), kind="float")
    check_shape(v_name, v, tuple(k.shape), f"like {k_name}")
    check_same_dtype("q", q, **{k_name: k, v_name: v})


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``head_dim ** -0.5`` when ``None``, else a finite positive number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def check_page_ids(name: str, ids: torch.Tensor, num_pages: int, what: str = "page"):
    """``ids [B, X]``: each ``-1`` (empty) or an id in ``[0, num_pages)``, no id twice in a row
    (a page listed twice would be attended twice). One host sync: call it where
    :func:`value_checks_enabled` says so (skipped while torch.compile traces)."""
    if torch.compiler.is_compiling() or not ids.numel():
        return
    srt = ids.sort(dim=-1).values
    twice = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1)
    lo, hi, *dup = torch.cat([torch.stack([srt.min().long(), srt.max().long()]),
                              twice.long()]).tolist()
    if lo < -1 or hi >= num_pages:
        raise ValueError(f"{name} holds {what} ids in [{lo}, {hi}]; expected -1 (empty) or a "
                         f"{what} in [0, {num_pages})")
    if any(dup):
        raise ValueError(f"{name}[{dup.index(1)}] lists a {what} twice; each may appear once "
                         f"per row (it would be attended twice)")


def check_out_buffer(name: str, buf, shape, dtype: torch.dtype, device: torch.device, *,
                     unit_last: bool = True):
    """A caller-supplied output ``buf`` (``None`` passes) must be a tensor of ``shape``,
    ``dtype`` and ``device``, with ``unit_last`` a unit stride in its last dim (the kernels
    store rows with vectorised writes; the other strides are passed to them). Returns ``buf``."""
    if buf is None:
        return None
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
    if tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(buf.shape)}")
    if buf.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {buf.dtype}")
    if buf.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {buf.device}")
    if unit_last and buf.numel() and buf.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim (e.g. contiguous), "
                         f"got strides {buf.stride()}")
    return buf


def forward_only_error(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is forward-only (an inference kernel with no backward): call "
                        f"it under torch.no_grad() / torch.inference_mode(), or detach its inputs")


def register_forward_only(op, name: str) -> None:
    """Give custom op ``op`` (``name``, e.g. ``"lol::paged_attention"``) an autograd formula
    that refuses clearly: ``.backward()`` through it raises ``RuntimeError("<name> is
    forward-only ...")`` instead of torch's generic message (see :func:`check_no_grad_transform`
    for ``torch.func.grad``)."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise forward_only_error(name)

    op.register_autograd(backward, setup_context=setup_context)


def check_no_grad_transform(name: str, *tensors) -> None:
    """Under ``torch.func.grad``/``vjp``/``jacrev`` the custom op's generated autograd function
    fails with a message about ``setup_context``; say "forward-only" before it is reached."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    if torch._C._are_functorch_transforms_active() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise forward_only_error(name)


#: environment switch of value checks in every op (``LOL_VALIDATE=1``; docs/design.md §4)
VALIDATE_ENV = "LOL_VALIDATE"


def value_checks_enabled(validate: bool | None = None) -> bool:
    """Whether an op reads its inputs' values to check them (page ids, positions, routing).

    Such checks need a host sync, so they run only when asked: ``validate=True``, or
    ``validate=None`` (the ops' default) with the environment variable ``LOL_VALIDATE=1``.
    Never while torch.compile traces (compiled code cannot read values). Tables built by the
    cache are checked where they are made (``PagedKVCache.append_frames`` and the reads)."""
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool or None, got {type(validate).__name__}")
    if torch.compiler.is_compiling():
        return False
    if validate is None:
        return os.environ.get(VALIDATE_ENV, "") not in ("", "0")
    return validate


#: stored positions and page shifts each stay within +-POS_LIMIT (and their sum within int32)
POS_LIMIT = 2**30
INT32_MAX = 2**31 - 1


def check_positions_fit(name: str, pos: torch.Tensor, limit: int = INT32_MAX) -> int:
    """Positions must fit int32 arithmetic in the kernels: ``|pos| <= limit``. Returns the
    largest ``|pos|`` (0 when empty or while torch.compile traces: nothing is read then).
    One host sync: call it where :func:`value_checks_enabled` says so, or on host data."""
    if torch.compiler.is_compiling() or not pos.numel():
        return 0
    lo, hi = torch.stack(torch.aminmax(pos)).tolist()  # one host sync
    if hi > limit or lo < -limit:
        raise ValueError(f"{name} must hold positions in [-{limit}, {limit}] (int32 in the "
                         f"kernels), got range [{lo}, {hi}]")
    return max(hi, -lo)


def check_host_positions(name: str, pos: torch.Tensor, limit: int = INT32_MAX) -> None:
    """Positions wider than int32 on the host (an int64 CPU tensor) are checked always: reading
    them costs no sync, and the int32 arithmetic of the kernels would wrap them. Device tensors
    are read only by the value checks (:func:`value_checks_enabled`)."""
    if pos.device.type == "cpu" and pos.dtype == torch.int64:
        check_positions_fit(name, pos, limit)


def check_frame_times(name: str, t, limit: int = POS_LIMIT) -> torch.Tensor:
    """Frame times given on the host (a tensor, a sequence or a number) as an int64 CPU tensor
    of the same shape, each within ``+-limit`` (stored and read as int32 by the kernels): a
    ``ValueError`` naming ``name`` otherwise, checked before any narrowing cast could wrap
    them."""
    if isinstance(t, torch.Tensor):
        x = t.detach().cpu()
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold integer frame times, got {x.dtype}")
    else:
        try:
            x = torch.as_tensor(t)
        except (RuntimeError, OverflowError, ValueError) as e:  # a Python int beyond int64
            raise ValueError(f"{name} must hold frame times in [-{limit}, {limit}] (int32 in "
                             f"the kernels), got {t!r}") from e
    if x.numel():
        lo, hi = torch.stack(torch.aminmax(x.reshape(-1))).tolist()
        if not (-limit <= lo and hi <= limit):  # also refuses NaN
            raise ValueError(f"{name} must hold frame times in [-{limit}, {limit}] (int32 in "
                             f"the kernels), got range [{lo}, {hi}]")
    return x.to(torch.int64)


#: the seeds torch.Generator.manual_seed accepts
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(name: str, seed) -> int:
    """``seed`` as an int in :data:`SEED_RANGE`; ``TypeError``/``ValueError`` naming ``name``
    otherwise (torch's own refusal names no argument)."""
    if isinstance(seed, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(seed)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}") from None
    if not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
        raise ValueError(f"{name} must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (what "
                         f"torch.Generator.manual_seed accepts), got {v}")
    return v


def check_shifted_fit(pos_name: str, pos_abs: int, shift_name: str, shift_abs: int):
    """A stored position plus a shift is formed in int32 by the kernels: ``|pos| + |shift|``
    (the maxima :func:`check_positions_fit` returned) must stay within int32."""
    if pos_abs + shift_abs > INT32_MAX:
        raise ValueError(f"{pos_name} + {shift_name} overflows int32 in the kernels: largest "
                         f"|{pos_name}| {pos_abs} + largest |{shift_name}| {shift_abs} > "
                         f"{INT32_MAX}")
