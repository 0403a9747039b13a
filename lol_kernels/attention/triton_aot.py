"""Ahead-of-time sm_90 compile of the Triton kernels on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole Triton
pipeline down to a cubin with the ``ptxas`` shipped in the triton wheel; ``cuobjdump`` (also in
the wheel) then reports registers, shared/local memory and stack, and disassembles the SASS.
Used by ``tests/test_triton_aot.py`` and ``benchmarks/kernel_report.py``.

:func:`sm90_report` compiles in ``spawn`` worker processes started with ``TRITON_INTERPRET=0``,
so it works inside a test session that runs the kernels in the interpreter;
:func:`compiled_module` gives the JIT functions themselves (for inspection) in any process.
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

_KERNEL_MODULES = ("lol_kernels._triton_common", "lol_kernels.attention.triton_split",
                   "lol_kernels.attention.triton_kernel", "lol_kernels.rope.triton_kernel")
_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
_SCALARS = {"Nq", "N_new", "M", "Hq", "qk_scale", "num_splits"}


@contextmanager
def _interpret(flag: str):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = flag
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def compiled_module(name: str = "lol_kernels.attention.triton_kernel"):
    """A private copy of a kernel module whose ``@triton.jit`` functions are real JITFunctions,
    whatever ``TRITON_INTERPRET`` says; ``sys.modules`` is left as it was."""
    saved = {m: sys.modules.pop(m) for m in _KERNEL_MODULES if m in sys.modules}
    try:
        with _interpret("0"):
            return importlib.import_module(name)
    finally:
        for m in _KERNEL_MODULES:
            sys.modules.pop(m, None)
        sys.modules.update(saved)


def tool(name: str) -> str:
    """Path of a CUDA binary (``cuobjdump``, ``ptxas``) shipped in the triton wheel."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def attention_signature(kernel, dtype: str, *, head_dim: int, group: int = 1, num_axes: int = 3,
                        has_shift: bool = True, has_new: bool = True, causal: bool = False,
                        page_size: int = 64, block_m: int, block_n: int):
    """Signature, constexprs and alignment attributes of a typical paged-attention launch:
    contiguous fp16/bf16 tensors, int32 positions/page ids, int64 turns."""
    t = _DTYPES[dtype]
    ptr = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "KNew": f"*{t}", "VNew": f"*{t}",
           "Out": f"*{t}", "Lse": "*fp32", "OutPart": "*fp32", "LsePart": "*fp32",
           "Turns": "*i64"}
    const = {"HEAD_DIM": head_dim, "PAGE_SIZE": page_size, "GROUP": group, "NUM_AXES": num_axes, "HAS_SHIFT": has_shift,
             "HAS_NEW": has_new, "IS_CAUSAL": causal,
             "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32", "FAST_TRIG": True,
             "BLOCK_M": block_m,
             "BLOCK_N": block_n}
    # strides that are multiples of 16 in any contiguous launch (head strides, row strides of
    # [.., H, D] tensors); the JIT marks the same ones divisible
    aligned = {"stride_qb", "stride_qn", "stride_kp", "stride_ks", "stride_vp", "stride_vs",
               "stride_knb", "stride_knn", "stride_vnb", "stride_vnn", "stride_ob", "stride_on"}
    head = {"stride_qh", "stride_kh", "stride_vh", "stride_knh", "stride_vnh", "stride_oh"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name not in _SCALARS and name[0].isupper():
            signature[name] = ptr.get(name, "*i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in aligned or (name in head and head_dim % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, const, attrs


def compile_sm90(kernel, signature, constexprs, attrs=None, *, num_warps: int, num_stages: int):
    """``triton.compile`` for sm_90; returns the CompiledKernel (``.asm["cubin"]`` etc.)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    with _interpret("0"):  # parts of the front end (static_range, ...) consult the knob
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
    loops = loop_sizes(text)
    return {"hgmma": len(re.findall(r"\bHGMMA\.", text)),
            "local_ldst": len(re.findall(r"\b(LDL|STL)\b", text)),
            "mufu": len(re.findall(r"\bMUFU\.", text)),
            "calls": len(re.findall(r"\bCALL\.", text)),
            "loop_instructions": [n[0] for n in loops],
            "loop_hot_instructions": [n[1] for n in loops],
            "loop_softmax_instructions": [n[2] for n in loops]}


def loop_sizes(sass: str) -> list[tuple[int, int, int]]:
    """``(all, hot, softmax)`` SASS instructions in the body of each loop (a backward branch
    to a lower address), in address order: per-thread instructions of one key-tile iteration.

    ``hot`` leaves out the blocks that a forward conditional branch inside the body jumps
    over: in these kernels the partial-tile mask and the lazy accumulator rescale, which run
    on a few tiles of a long stream (a partial last page; a row max that jumped by more than
    the rescale slack), so ``hot`` is the per-tile cost of the common path. ``softmax``: the
    hot instructions from the first tensor-core wait (``WARPGROUP.DEPBAR``: the scores are
    ready) to the last ``WARPGROUP.ARRIVE`` (the ``P V`` product is issued), which run while
    no product is in flight; the rest (key loads and rotation) overlaps the ``P V`` product."""
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
        sizes.append((len(body), len(hot), max(issue - wait, 0)))
    return sizes


def compile_attention_config(dtype: str, head_dim: int, config, *, causal: bool = True,
                             group: int = 3, module=None, **signature_kw) -> dict:
    """Compile one ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` config of the paged-attention
    kernel for sm_90; returns its static resources (``registers``, ``shared`` = static +
    dynamic bytes per CTA, ``stack``, ``local``) and SASS counts (``hgmma``, ``local_ldst``,
    ``mufu``, ``calls``)."""
    mod = module or compiled_module()
    bm, bn, warps, stages = config
    sig, const, attrs = attention_signature(mod._paged_rope_attn_fwd, dtype, head_dim=head_dim,
                                            group=group, causal=causal, block_m=bm, block_n=bn,
                                            **signature_kw)
    ck = compile_sm90(mod._paged_rope_attn_fwd, sig, const, attrs, num_warps=warps,
                      num_stages=stages)
    cubin = ck.asm["cubin"]
    res = resource_usage(cubin)
    res["shared"] += int(ck.metadata.shared)  # cuobjdump lists static smem; Triton's is dynamic
    return {"kernel": "paged_rope_attn_fwd", "dtype": dtype, "head_dim": head_dim,
            "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, **res,
            **sass_summary(cubin)}


def _compile_small_kernel(fn, name: str, pointers: dict, const: dict, num_warps: int,
                          **report) -> dict:
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
    res = resource_usage(ck.asm["cubin"])
    res["shared"] += int(ck.metadata.shared)
    return {"kernel": name, **report, "num_warps": num_warps, **res,
            **sass_summary(ck.asm["cubin"])}


def compile_rope_kernel(dtype: str, head_dim: int, module=None) -> dict:
    """Compile the ``apply_rope`` kernel for sm_90; same report as above."""
    mod = module or compiled_module("lol_kernels.rope.triton_kernel")
    t = _DTYPES[dtype]
    return _compile_small_kernel(
        mod._apply_rope_fwd, "apply_rope_fwd",
        {"X": f"*{t}", "Y": f"*{t}", "Turns": "*i64", "Pos": "*i32", "PairAxis": "*i32"},
        {"HEAD_DIM": head_dim, "NUM_AXES": 3, "FAST_TRIG": True, "BLOCK_R": mod.BLOCK_R},
        mod.NUM_WARPS, dtype=dtype, head_dim=head_dim, BLOCK_R=mod.BLOCK_R)


def compile_combine_kernel(dtype: str, head_dim: int, module=None) -> dict:
    """Compile the split-KV merge kernel for sm_90; same report as above."""
    mod = module or compiled_module("lol_kernels.attention.triton_split")
    return _compile_small_kernel(
        mod._combine_splits, "combine_splits",
        {"OutPart": "*fp32", "LsePart": "*fp32", "Out": f"*{_DTYPES[dtype]}", "Lse": "*fp32"},
        {"HEAD_DIM": head_dim, "BLOCK_R": mod.BLOCK_R}, mod.NUM_WARPS, dtype=dtype,
        head_dim=head_dim, BLOCK_R=mod.BLOCK_R)


def _job(job):
    kind, dtype, head_dim, config, kw = job
    if kind == "rope":
        return compile_rope_kernel(dtype, head_dim)
    if kind == "combine":
        return compile_combine_kernel(dtype, head_dim)
    return compile_attention_config(dtype, head_dim, config, **kw)


def sm90_report(dtypes=("fp16", "bf16"), head_dims=(64, 128), *, rope: bool = True,
                fp32_d64: bool = False, workers: int | None = None, **variant) -> list[dict]:
    """Compile every autotune config of the attention kernel (and the apply_rope and split-KV
    merge kernels, ``rope=True``) for
    each dtype and head dim; ``fp32_d64`` adds the configs kept for fp32 inputs at D = 64.
    ``variant``: keyword arguments of :func:`compile_attention_config` (``causal``, ``group``,
    ``has_new``, ``has_shift``, ``page_size``); default: causal with new keys, shifts, GQA 3.

    Runs in fresh ``spawn`` processes started with ``TRITON_INTERPRET=0``: a process that
    imported triton in interpreter mode has interpreted versions of triton's own library
    (``tl.max``, ``tl.sum``, ...) and cannot compile for a GPU. ``workers`` defaults to one per
    CPU (Triton compiles hold the GIL, so threads would not help).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    configs = compiled_module().CONFIGS
    jobs = [("attn", dt, d, c, variant) for dt in dtypes for d in head_dims for c in configs]
    if fp32_d64:
        jobs += [("attn", "fp32", 64, c, variant) for c in configs if c[1] <= 32]
    if rope:  # and the split-KV merge
        jobs += [(k, dt, d, None, {}) for k in ("rope", "combine") for dt in dtypes
                 for d in head_dims]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with _interpret("0"), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_job, jobs))
