"""Static sm_90 figures of the fused backward kernels (:mod:`.rope_attention_triton_backward`),
no GPU needed.

Each autotune config of the dq and dk/dv kernels (and the delta/lse preprocess) is compiled
ahead of time for sm_90 with :func:`lol_kernels.common.aot.compile_sm90` and read with the
``cuobjdump`` shipped in the triton wheel: registers, shared memory, stack and local memory
(spills), HGMMA count. Compiles run in ``spawn`` worker processes started with
``TRITON_INTERPRET=0`` (a process that imported Triton in interpreter mode cannot compile for a
GPU), so this works inside a test session that runs the kernels in the interpreter. Used by
``tests/kernels/attention/test_attention_grad_triton.py`` and ``benchmarks/kernel_report.py``.
"""

from __future__ import annotations

import importlib
import os

from ..common import aot
from ..common.triton_attention import dot_precision

#: the jit kernels of :mod:`.rope_attention_triton_backward`
BACKWARD_KERNELS = ("rope_attn_bwd_preprocess", "rope_attn_bwd_dq", "rope_attn_bwd_dkdv")
MODULE = "lol_kernels.attention.rope_attention_triton_backward"
#: pointer arguments that hold fp32 row statistics (every other tensor of rows: input dtype)
FP32_POINTERS = {"Lse", "DLse", "Lse2", "Delta"}
INT_POINTERS = {"QPos": "*i32", "KPos": "*i32", "PairAxis": "*i32", "Turns": "*i64"}


def backward_signature(fn, dtype: str, constexprs: dict):
    """Signature and alignment attributes of a contiguous launch of backward kernel ``fn``:
    ``dtype`` tensors of rows (``DK, DV``: fp32 parts when ``GROUP > 1``), fp32 statistics,
    int32 positions, int64 turns; row and head strides of ``[B, N, H, D]`` tensors are
    multiples of 16 (``D % 16 == 0``)."""
    fp32 = FP32_POINTERS | ({"DK", "DV"} if constexprs.get("GROUP", 1) > 1 else set())
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in ("N", "Nk", "Hq"):
            signature[name] = "i32"
            pos_or_stat = name[7:9] in ("qp", "kp", "lb", "lh", "dl")
            if name.startswith("stride_") and not pos_or_stat:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = INT_POINTERS.get(
                name, "*fp32" if name in fp32 else f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_backward(kernel: str, dtype: str, head_dim: int, config=None, *, group: int = 3,
                     causal: bool = True) -> dict:
    """Compile one config ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of backward kernel
    ``kernel`` (one of :data:`BACKWARD_KERNELS`; the preprocess takes ``config=None``) for
    sm_90 in this process (which must not run Triton in interpreter mode); returns a row of
    :func:`backward_static_rows`."""
    mod = importlib.import_module(MODULE)
    fn = getattr(mod, kernel)
    if config is None:
        const = {"HEAD_DIM": head_dim, "HAS_DO": True, "HAS_DLSE": True,
                 "BLOCK_M": mod.PRE_BLOCK_M}
        config = (mod.PRE_BLOCK_M, 0, 4, 1)
    else:
        const = {"HEAD_DIM": head_dim, "GROUP": group, "NUM_AXES": 3, "IS_CAUSAL": causal,
                 "HAS_DO": True, "DOT_PREC": dot_precision(aot.DTYPES[dtype]),
                 "FAST_TRIG": True, "BLOCK_M": config[0], "BLOCK_N": config[1]}
    sig, attrs = backward_signature(fn, dtype, const)
    ck = aot.compile_sm90(fn, sig, const, attrs, num_warps=config[2], num_stages=config[3])
    cubin = ck.asm["cubin"]
    res = aot.resource_usage(cubin)
    sass = aot.sass_summary(cubin)
    name = f"M{config[0]}-N{config[1]}-w{config[2]}-s{config[3]}" if config[1] else \
        f"M{config[0]}-w{config[2]}"
    return {"kernel": kernel, "config": name, "dtype": dtype, "head_dim": head_dim,
            "registers": res["registers"],
            "shared_B": res["shared"] + int(ck.metadata.shared),  # static + dynamic
            "stack_B": res["stack"], "local_B": res["local"], "spills": sass["local_ldst"],
            "hgmma": sass["hgmma"], "mufu": sass["mufu"], "calls": sass["calls"],
            "loop_instructions": sass["loop_instructions"],
            "loop_hot_instructions": sass["loop_hot_instructions"]}


def _job(job):
    kernel, dtype, head_dim, config = job
    return compile_backward(kernel, dtype, head_dim, config)


def backward_static_rows(dtypes=("bf16",), head_dims=(128,), *, configs: str = "offered",
                         pairs=None, workers: int | None = None) -> list[dict]:
    """Compile the backward kernels for sm_90 for each dtype (``"fp16"``, ``"bf16"``,
    ``"fp32"``) and head dim (or each ``(dtype, head_dim)`` of ``pairs``): the preprocess and
    the dq and dk/dv configs ``configs``: ``"offered"`` (those the autotuner may pick,
    ``rope_attention_triton_backward.backward_configs``), ``"first"`` (the first of these) or
    ``"all"`` (every autotune config, ``rope_attention_triton_backward.all_configs``).

    Returns one dict per compile: ``kernel``, ``config`` (``M<BLOCK_M>-N<BLOCK_N>-w<warps>-
    s<stages>``), ``dtype``, ``head_dim``, ``registers`` a thread, ``shared_B`` a CTA,
    ``stack_B``, ``local_B``, ``spills`` (LDL/STL instructions), ``hgmma``, ``mufu``,
    ``calls``, ``loop_instructions``, ``loop_hot_instructions`` (per key or query tile).
    Runs in ``spawn`` processes with ``TRITON_INTERPRET=0``.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if configs not in ("offered", "first", "all"):
        raise ValueError(f"configs must be 'offered', 'first' or 'all', got {configs!r}")
    mod = importlib.import_module(MODULE)  # the config lists only: no kernel runs here
    jobs = []
    for dt, d in pairs or [(dt, d) for dt in dtypes for d in head_dims]:
        jobs.append(("rope_attn_bwd_preprocess", dt, d, None))
        for kind in ("dq", "dkdv"):
            cfgs = mod.all_configs(kind) if configs == "all" else \
                mod.backward_configs(kind, aot.DTYPES[dt], d)
            cfgs = cfgs[:1] if configs == "first" else cfgs
            jobs += [(f"rope_attn_bwd_{kind}", dt, d, tuple(c)) for c in cfgs]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = mp.get_context("spawn")
    with aot.interpret_flag("0"), ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        return list(ex.map(_job, jobs))


__all__ = ["BACKWARD_KERNELS", "backward_signature", "backward_static_rows", "compile_backward"]
