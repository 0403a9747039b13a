"""Ahead-of-time sm_90 compile of every Triton kernel on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole Triton
pipeline down to a cubin with the ``ptxas`` shipped in the triton wheel; ``cuobjdump`` (also in
the wheel) then reports registers, shared/local memory and stack, and disassembles the SASS.
Used by ``tests/kernels/common/test_triton_aot.py``, ``tests/kernels/moc/test_moc_attention.py``
and ``benchmarks/kernel_report.py``.

One signature builder (:func:`attention_signature`) serves both attention kernels
(:data:`ATTENTION_KERNELS`); :func:`sm90_report` compiles in ``spawn`` worker processes started
with ``TRITON_INTERPRET=0``, so it works inside a test session that runs the kernels in the
interpreter; :func:`compiled_module` gives the JIT functions themselves (for inspection) in any
process.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .triton_attention import CONFIGS, dot_precision, offered_configs

#: every module that defines ``@triton.jit`` functions, helpers first: :func:`compiled_module`
#: re-imports them all, so a compiled kernel never calls an interpreted helper
KERNEL_MODULES = ("lol_kernels.common.triton_rope", "lol_kernels.common.triton_attention",
                  "lol_kernels.attention.attention_triton_split",
                  "lol_kernels.attention.attention_triton_rotate",
                  "lol_kernels.attention.attention_triton",
                  "lol_kernels.moc.moc_attention_triton", "lol_kernels.rope.rope_triton")
#: the attention kernels :func:`compile_attention_config` compiles: jit name -> its module
ATTENTION_KERNELS = {"paged_rope_attn_fwd": "lol_kernels.attention.attention_triton",
                     "paged_attn_rotated_fwd": "lol_kernels.attention.attention_triton_rotate",
                     "moc_attn_fwd": "lol_kernels.moc.moc_attention_triton"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: runtime scalars of the attention kernels (i32, except the fp32 qk_scale)
SCALARS = {"N", "N_new", "M", "T", "Hq", "num_splits", "Lc"}
#: strides that are multiples of 16 in any contiguous launch (head strides, row strides of
#: [.., H, D] tensors); the JIT marks the same ones divisible
ALIGNED_STRIDES = {"stride_qb", "stride_qn", "stride_kp", "stride_ks", "stride_vp", "stride_vs",
                   "stride_knb", "stride_knn", "stride_vnb", "stride_vnn", "stride_ob",
                   "stride_on", "stride_rb", "stride_rh", "stride_wb", "stride_wh"}
HEAD_STRIDES = {"stride_qh", "stride_kh", "stride_vh", "stride_knh", "stride_vnh", "stride_oh"}


@contextmanager
def interpret_flag(flag: str):
    """Set ``TRITON_INTERPRET`` to ``flag`` inside the block, restoring it afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = flag
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def compiled_module(name: str):
    """A private copy of the kernel module ``name`` (one of :data:`KERNEL_MODULES`) whose
    ``@triton.jit`` functions are real JITFunctions, whatever ``TRITON_INTERPRET`` says;
    ``sys.modules`` and the parent packages' attributes are left as they were."""
    saved = {m: sys.modules.pop(m) for m in KERNEL_MODULES if m in sys.modules}
    try:
        with interpret_flag("0"):
            return importlib.import_module(name)
    finally:
        for m in KERNEL_MODULES:
            sys.modules.pop(m, None)
            parent, child = m.rsplit(".", 1)
            pkg = sys.modules.get(parent)
            if pkg is not None:  # the import bound the package attribute to the copy
                if m in saved:
                    setattr(pkg, child, saved[m])
                else:
                    pkg.__dict__.pop(child, None)
        sys.modules.update(saved)


def tool(name: str) -> str:
    """Path of a CUDA binary (``cuobjdump``, ``ptxas``) shipped in the triton wheel."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def attention_signature(kernel, dtype: str, *, head_dim: int, group: int = 1, num_axes: int = 3,
                        has_shift: bool = True, has_new: bool = True, causal: bool = False,
                        page_size: int = 64, tile: int = 128, block_m: int, block_n: int):
    """Signature, constexprs and alignment attributes of a typical launch of an attention
    kernel (:data:`ATTENTION_KERNELS`): contiguous ``dtype`` tensors, int32 positions, page
    ids and page lists, int64 turns. ``tile``: the MoC routing tile (kernels with ``TILE``)."""
    t = dtype
    ptr = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "KNew": f"*{t}", "VNew": f"*{t}",
           "Out": f"*{t}", "Lse": "*fp32", "OutPart": "*fp32", "LsePart": "*fp32",
           "Turns": "*i64", "KRot": f"*{t}", "VRot": f"*{t}"}
    const = {"HEAD_DIM": head_dim, "PAGE_SIZE": page_size, "GROUP": group, "NUM_AXES": num_axes,
             "HAS_SHIFT": has_shift, "HAS_NEW": has_new, "IS_CAUSAL": causal,
             "DOT_PREC": dot_precision(DTYPES[dtype]), "FAST_TRIG": True, "BLOCK_M": block_m,
             "BLOCK_N": block_n}
    if "TILE" in kernel.arg_names:
        const["TILE"] = tile
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name in SCALARS or name.startswith("stride"):
            signature[name] = "i32"
            if name in ALIGNED_STRIDES or (name in HEAD_STRIDES and head_dim % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = ptr.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, const, attrs


def ast_source(kernel, signature: dict, constexprs: dict, attrs: dict | None = None):
    """``triton.compiler.ASTSource`` of ``kernel``, the one place that knows its API.

    Triton 3.6 (the H200 image, CI's oldest-Triton environment) and 3.9 (this venv) take the
    same form, checked by compiling every kernel under both: ``signature`` names every
    argument (constexprs as ``"constexpr"``), ``constexprs`` maps names to values and
    ``attrs`` maps ``(index,)`` to ``[["tt.divisibility", 16]]``. Releases before 3.3 took
    ``constants`` and an ``AttrsDescriptor`` instead; they get a clear error here, not a
    TypeError inside the front end. (The other 3.6 difference is the interpreter's: it needs
    numpy < 2.4, which made ``int()`` of a one-element array an error.)"""
    import inspect

    import triton

    params = inspect.signature(triton.compiler.ASTSource).parameters
    if "constexprs" not in params:
        raise RuntimeError(f"the sm_90 compile needs an ASTSource that takes constexprs (triton "
                           f">= 3.3; tested 3.6-3.9), this is triton {triton.__version__}")
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


def compile_sm90(kernel, signature, constexprs, attrs=None, *, num_warps: int, num_stages: int):
    """``triton.compile`` for sm_90; returns the CompiledKernel (``.asm["cubin"]`` etc.)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = ast_source(kernel, signature, constexprs, attrs)
    with interpret_flag("0"):  # parts of the front end (static_range, ...) consult the knob
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "enable_fp_fusion": True})


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([tool("cuobjdump"), *flags, str(path)], capture_output=True,
                             text=True, check=True)
    return res.stdout


def resource_usage(cubin: bytes) -> dict:
    """``{"registers", "stack", "shared", "local"}`` of the (single) kernel in ``cubin``."""
    text = cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def sass_summary(cubin: bytes) -> dict:
    """Counts of the SASS instructions that matter: tensor-core HGMMA, local loads/stores,
    MUFU (special functions) and calls, and the loop sizes of :func:`loop_sizes`."""
    text = cuobjdump(cubin, "--dump-sass")
    counts = loop_counts(text)
    loops = [(c["all"], c["hot"], c["softmax"]) for c in counts]
    return {"hgmma": len(re.findall(r"\bHGMMA\.", text)),
            "local_ldst": len(re.findall(r"\b(LDL|STL)\b", text)),
            "mufu": len(re.findall(r"\bMUFU\.", text)),
            "calls": len(re.findall(r"\bCALL\.", text)),
            "loop_instructions": [n[0] for n in loops],
            "loop_hot_instructions": [n[1] for n in loops],
            "loop_softmax_instructions": [n[2] for n in loops],
            "loop_hot_mufu": [c["mufu_hot"] for c in counts],
            "loop_hot_bar": [c["bar_hot"] for c in counts]}


def loop_sizes(sass: str) -> list[tuple[int, int, int]]:
    """``(all, hot, softmax)`` of each loop of :func:`loop_counts`."""
    return [(c["all"], c["hot"], c["softmax"]) for c in loop_counts(sass)]


def loop_counts(sass: str) -> list[dict]:
    """``{"all", "hot", "softmax", "mufu_hot", "bar_hot"}`` SASS instructions in the body of
    each loop (a backward branch to a lower address), in address order: per-thread
    instructions of one key-tile iteration.

    ``hot`` leaves out the blocks that a forward conditional branch inside the body jumps
    over: in these kernels the partial-tile mask and the lazy accumulator rescale, which run
    on a few tiles of a long stream (a partial last page; a row max that jumped by more than
    the rescale slack), so ``hot`` is the per-tile cost of the common path. ``softmax``: the
    hot instructions from the first tensor-core wait (``WARPGROUP.DEPBAR``: the scores are
    ready) to the last ``WARPGROUP.ARRIVE`` (the ``P V`` product is issued), which run while
    no product is in flight; the rest (key loads and rotation) overlaps the ``P V`` product.
    ``mufu_hot`` / ``bar_hot``: the special-function (``MUFU``: exp2, sin, cos) and CTA-wide
    barrier (``BAR``) instructions among the hot ones."""
    addr = {}
    order = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            a = int(m.group(1), 16)
            addr[a] = m.group(2)
            order.append(a)
    sizes = []
    for a in order:
        b = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", addr[a])
        if not (b and int(b.group(1), 16) < a):
            continue
        body = [x for x in order if int(b.group(1), 16) <= x <= a]
        skipped = set()
        for x in body:
            f = re.search(r"@!?P\d\s+BRA\s+(?:`\()?0x([0-9a-f]+)", addr[x])
            if f and x < int(f.group(1), 16) <= a:
                skipped.update(y for y in body if x < y < int(f.group(1), 16))
        hot = [x for x in body if x not in skipped]
        wait = next((i for i, x in enumerate(hot) if "WARPGROUP.DEPBAR" in addr[x]), 0)
        issue = max((i for i, x in enumerate(hot) if "WARPGROUP.ARRIVE" in addr[x]), default=0)
        sizes.append({"all": len(body), "hot": len(hot), "softmax": max(issue - wait, 0),
                      "mufu_hot": sum(bool(re.search(r"\bMUFU\.", addr[x])) for x in hot),
                      "bar_hot": sum(bool(re.search(r"\bBAR\.", addr[x])) for x in hot)})
    return sizes


def _report(ck, kernel: str, **fields) -> dict:
    """Static resources (``registers``, ``shared`` = static + dynamic bytes per CTA,
    ``stack``, ``local``) and SASS counts of a compiled kernel, after ``fields``."""
    cubin = ck.asm["cubin"]
    res = resource_usage(cubin)
    res["shared"] += int(ck.metadata.shared)  # cuobjdump lists static smem; Triton's is dynamic
    return {"kernel": kernel, **fields, **res, **sass_summary(cubin)}


def compile_attention_config(dtype: str, head_dim: int, config, *,
                             kernel: str = "paged_rope_attn_fwd", causal: bool = True,
                             group: int = 3, module=None, **signature_kw) -> dict:
    """Compile one ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` config of an attention kernel
    (``kernel``: a key of :data:`ATTENTION_KERNELS`) for sm_90; returns :func:`_report`'s
    resources and SASS counts (``hgmma``, ``local_ldst``, ``mufu``, ``calls``, loop sizes).
    ``signature_kw``: further keywords of :func:`attention_signature`."""
    fn = getattr(module or compiled_module(ATTENTION_KERNELS[kernel]), kernel)
    bm, bn, warps, stages = config
    sig, const, attrs = attention_signature(fn, dtype, head_dim=head_dim, group=group,
                                            causal=causal, block_m=bm, block_n=bn,
                                            **signature_kw)
    ck = compile_sm90(fn, sig, const, attrs, num_warps=warps, num_stages=stages)
    return _report(ck, kernel, dtype=dtype, head_dim=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                   num_warps=warps, num_stages=stages)


def _compile_small_kernel(fn, name: str, pointers: dict, const: dict, num_warps: int,
                          **fields) -> dict:
    """Compile a kernel whose scalars are all i32 for sm_90 (``pointers``: argument name ->
    pointer type, all 16-byte aligned) and report it like the attention configs."""
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const:
            sig[arg] = "constexpr"
        elif arg in pointers:
            sig[arg] = pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "i32"
    ck = compile_sm90(fn, sig, const, attrs, num_warps=num_warps, num_stages=1)
    return _report(ck, name, **fields, num_warps=num_warps)


def compile_rope_kernel(dtype: str, head_dim: int, module=None) -> dict:
    """Compile the ``apply_rope`` kernel for sm_90; same report as above."""
    mod = module or compiled_module("lol_kernels.rope.rope_triton")
    return _compile_small_kernel(
        mod.apply_rope_fwd, "apply_rope_fwd",
        {"X": f"*{dtype}", "Y": f"*{dtype}", "Turns": "*i64", "Pos": "*i32", "PairAxis": "*i32"},
        {"HEAD_DIM": head_dim, "NUM_AXES": 3, "FAST_TRIG": True, "BLOCK_R": mod.BLOCK_R},
        mod.NUM_WARPS, dtype=dtype, head_dim=head_dim, BLOCK_R=mod.BLOCK_R)


def compile_rotate_keys_kernel(dtype: str, head_dim: int, module=None, *, group: int = 1,
                               page_size: int = 64) -> dict:
    """Compile the rotate-once prologue (``attention_triton_rotate.rotate_keys_fwd``: keys
    rotated and packed, values packed) for sm_90, with shifts and new keys; same report as
    above."""
    mod = module or compiled_module("lol_kernels.attention.attention_triton_rotate")
    t = f"*{dtype}"
    ptrs = {n: "*i32" for n in ("KPos", "PageLen", "PageTable", "PageShift", "RowOff", "NValid",
                                "NewPos", "PairAxis")}
    ptrs.update(K=t, V=t, KNew=t, VNew=t, KRot=t, VRot=t, Turns="*i64")
    rows = mod.rotate_rows(head_dim, DTYPES[dtype].itemsize)
    return _compile_small_kernel(
        mod.rotate_keys_fwd, "rotate_keys_fwd", ptrs,
        {"HEAD_DIM": head_dim, "PAGE_SIZE": page_size, "GROUP": group, "NUM_AXES": 3,
         "HAS_SHIFT": True, "HAS_NEW": True, "FAST_TRIG": True, "BLOCK_R": rows},
        mod.NUM_WARPS, dtype=dtype, head_dim=head_dim, BLOCK_R=rows)


def compile_combine_kernel(dtype: str, head_dim: int, module=None) -> dict:
    """Compile the split-KV merge kernel for sm_90; same report as above."""
    mod = module or compiled_module("lol_kernels.attention.attention_triton_split")
    return _compile_small_kernel(
        mod.combine_splits_kernel, "combine_splits",
        {"OutPart": "*fp32", "LsePart": "*fp32", "Out": f"*{dtype}", "Lse": "*fp32"},
        {"HEAD_DIM": head_dim, "BLOCK_R": mod.BLOCK_R}, mod.NUM_WARPS, dtype=dtype,
        head_dim=head_dim, BLOCK_R=mod.BLOCK_R)


def _job(job):
    kind, dtype, head_dim, config, kw = job
    if kind == "rope":
        return compile_rope_kernel(dtype, head_dim)
    if kind == "combine":
        return compile_combine_kernel(dtype, head_dim)
    if kind == "rotate":
        return compile_rotate_keys_kernel(dtype, head_dim, **kw)
    return compile_attention_config(dtype, head_dim, config, kernel=kind, **kw)


def sm90_report(dtypes=("fp16", "bf16"), head_dims=(64, 128), *,
                kernel: str = "paged_rope_attn_fwd", rope: bool = True, offered=(), extra=(),
                workers: int | None = None, **variant) -> list[dict]:
    """Compile every autotune config (:data:`CONFIGS`) of the attention kernel ``kernel`` (and
    the apply_rope, split-KV merge and rotate-once prologue kernels, ``rope=True``) for each
    dtype and head dim;
    ``offered``: ``(dtype, head_dim)`` pairs whose offered configs (``offered_configs``: what
    the autotuner may pick for them, e.g. fp32's narrow tiles) are compiled too; ``extra``:
    ``(dtype, head_dim, config)`` triples compiled as well. ``variant``: keyword
    arguments of :func:`compile_attention_config` (``causal``, ``group``, ``has_new``,
    ``has_shift``, ``page_size``, ``tile``); default: causal with new keys, shifts, GQA 3.

    Runs in fresh ``spawn`` processes started with ``TRITON_INTERPRET=0``: a process that
    imported triton in interpreter mode has interpreted versions of triton's own library
    (``tl.max``, ``tl.sum``, ...) and cannot compile for a GPU. ``workers`` defaults to one per
    CPU (Triton compiles hold the GIL, so threads would not help).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"kernel must be one of {sorted(ATTENTION_KERNELS)}, got {kernel!r}")
    jobs = [(kernel, dt, d, c, variant) for dt in dtypes for d in head_dims for c in CONFIGS]
    jobs += [(kernel, dt, d, c, variant) for dt, d in offered
             for c in offered_configs(DTYPES[dt], d)]
    jobs += [(kernel, dt, d, c, variant) for dt, d, c in extra]
    if rope:  # and the split-KV merge and the rotate-once prologue
        jobs += [(k, dt, d, None, {}) for k in ("rope", "combine", "rotate") for dt in dtypes
                 for d in head_dims]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = mp.get_context("spawn")
    with interpret_flag("0"), ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        return list(ex.map(_job, jobs))


__all__ = ["ATTENTION_KERNELS", "KERNEL_MODULES", "ast_source", "attention_signature",
           "compile_attention_config", "compile_combine_kernel", "compile_rope_kernel",
           "compile_rotate_keys_kernel", "compile_sm90", "compiled_module", "cuobjdump",
           "interpret_flag", "loop_counts", "loop_sizes", "resource_usage", "sass_summary",
           "sm90_report", "tool"]
