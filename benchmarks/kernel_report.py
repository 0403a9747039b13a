"""Kernel report of the fused paged RoPE attention at the Wan shape.

Shape (:data:`SHAPE`): one block of ``Nq = 4680`` queries (3 latent frames of 1560 tokens) over
``Nk = 18720`` cached keys (LongLive's 12 frames) laid out as ``PagedKVCache`` stores them: each
frame on ``ceil(1560 / S)`` fresh pages of ``S = 64`` slots, the last one partial (24 tokens), so
the kernel walks 300 pages; ``Hq = Hkv = 12`` heads of ``D = 128``, bf16, jittered 3D RoPE
applied to the un-rotated keys in registers. :data:`TINY` is the same layout at a toy size
(partial pages, ``Nq`` not a multiple of a frame, GQA) for the interpreter.

For every autotune config of both key paths (``path``: ``fused``, the keys rotated in the key
loop, :mod:`lol_kernels.attention.attention_triton`; ``once``, rotated once per call then a
plain paged loop, :mod:`lol_kernels.attention.attention_triton_rotate`: the "rotate once + a
standard attention kernel" alternative, with its prologue's traffic ``prologue_ms`` added) it
reports, without a GPU:

* ``flops``: matmul FLOPs ``4 Nq Nk Hq D`` (FlashAttention's count; RoPE and softmax excluded);
* ``min_bytes``: compulsory HBM traffic: Q, K, V, positions read once, out and lse written once;
* static resources from the sm_90 ahead-of-time compile (``cuobjdump``): registers per thread,
  shared memory per CTA, stack/local bytes, HGMMA count; CTAs per SM from registers and shared
  memory; ``splits``: the split-KV parts the launcher picks
  (``attention_triton_split.num_splits_for``) and ``wave_eff``: the fraction of the grid's ``waves * slots`` filled with key tiles (the
  ``cdiv(Nq, BLOCK_M) * Hq * splits`` programs on 132 SMs, each part also paying its fixed
  work); ``merge_ms``: the fp32 parts written and read back at 3.0 TB/s;
* ``roofline_ms``: ``max(flops / 800 TFLOP/s, min_bytes / 3.0 TB/s)`` (H100 dense bf16 and copy
  bandwidth); ``predicted_ms`` (below) is an upper bound on speed, not a measurement. The 70%
  goal is ``flops / 560 TFLOP/s``;
* ``issue_ms``: the instruction-issue bound the roofline ignores (every program rotates every
  key tile it reads, then runs the softmax on it): the SASS instructions of one key-tile
  iteration of the compiled loop on its common path (``loop_hot``, per thread: without the
  partial-page mask and the lazy rescale, which a long stream runs on a few tiles;
  ``loop_instr`` counts them too), times warps and tiles, at 4 warp instructions per SM per
  clock (1.755 GHz). ``predicted_ms`` is the largest bound over the wave efficiency, plus
  ``merge_ms``. It assumes issue, tensor cores and MUFU overlap perfectly; ``serial_ms`` is
  the pessimistic side: a warp idles while its scores product runs and issues the softmax
  while no product is in flight (only the key loads and rotation overlap the previous
  ``P V``), CTAs resident on one SM interleaving. A GPU run lands between the two.
  ``exp_ms``: ``Hq * Nq * Nk`` ``exp2`` on the MUFU at 16 per SM per clock (the RoPE sin/cos
  add ``ctas * Nk * D`` more MUFU ops on the fused path, ``mufu_ms`` counts both);
* ``mufu_hot``, ``bar_hot``: MUFU and CTA-wide barrier (``BAR``) instructions per key tile on
  the common path (``aot.loop_counts``), ``instr_per_pair``: ``loop_hot * threads /
  (BLOCK_M * BLOCK_N)``; ``best`` in the JSON: each path's config with the highest
  ``predicted + serial`` TFLOP/s.

The static mode also compiles ``rope_attention``'s backward kernels (preprocess, dq, dk/dv;
:mod:`lol_kernels.attention.rope_attention_aot`) for the same dtypes and head dim and reports their
registers, shared memory, stack, spills, HGMMA and MUFU counts (``backward`` in the JSON;
``--no-backward`` skips them).

On a machine with a CUDA GPU it also measures (``triton.testing.do_bench``) the Triton kernel
(autotuned) next to torch SDPA, FlexAttention and flash-attn (when installed) on keys that were
rotated beforehand (those baselines cannot rotate per head at read time), writes TFLOP/s and
checks the kernel's first queries against the float64 reference (docs/design.md §5 rule).

    python benchmarks/kernel_report.py --out results              # static; measured on a GPU
    python benchmarks/kernel_report.py --measure --out results    # measured only (GPU)
    python benchmarks/kernel_report.py --measure --tiny --out DIR # measured path at TINY on the
                                                                  # CPU under TRITON_INTERPRET=1

``--tiny`` without a GPU runs the Triton kernel in the interpreter (fp16: the interpreter's
bf16 products are wrong) and times it on the host: the numbers mean nothing, but every shape
and call of the measured path runs, so a shape bug shows without a GPU
(``tests/benchmarks/test_kernel_report.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench, markdown_table, write_results  # noqa: E402

# the Triton kernel modules are imported inside the functions: --tiny on a CPU machine must
# set TRITON_INTERPRET=1 before the first @triton.jit decoration

PEAK_FLOPS = 800e12  # H100 measured dense bf16
PEAK_BYTES = 3.0e12  # H100 copy bandwidth
GOAL = 0.7
NUM_SMS = 132  # H100 SXM
REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # 228 KiB
CLOCK = 1.755e9
ISSUE_PER_SM = 4  # warp schedulers
#: the Wan block: Nq queries over Nk cached keys of whole frames of Fh x Fw tokens
SHAPE = {"B": 1, "Nq": 4680, "Nk": 18720, "Hq": 12, "Hkv": 12, "D": 128, "S": 64, "A": 3,
         "Fh": 30, "Fw": 52}
#: the same layout at a toy size: 24-token frames on 2 pages of 16 (the second holds 8),
#: 40 queries (not a whole frame), GQA 4/2
TINY = {"B": 1, "Nq": 40, "Nk": 72, "Hq": 4, "Hkv": 2, "D": 32, "S": 16, "A": 3, "Fh": 4,
        "Fw": 6}


def frame_layout(s) -> tuple[int, int, int, int]:
    """``(Nf, F, pages_per_frame, P)`` of shape ``s``: tokens a frame, cached frames, the pages
    a frame takes (``ceil(Nf / S)``, the last one partial) and the pool's pages."""
    nf = s["Fh"] * s["Fw"]
    if s["Nk"] % nf:
        raise ValueError(f"shape: Nk={s['Nk']} must be whole frames of Fh*Fw={nf} tokens")
    frames = s["Nk"] // nf
    ppf = math.ceil(nf / s["S"])
    return nf, frames, ppf, frames * ppf


def key_tiles(s, block_n: int) -> int:
    """Key tiles one program walks: every slot of every page, partial pages included."""
    return math.ceil(frame_layout(s)[3] * s["S"] / block_n)


def flops(s) -> float:
    return 4.0 * s["B"] * s["Nq"] * s["Nk"] * s["Hq"] * s["D"]


def min_bytes(s, elem: int = 2, pos_bytes: int = 4) -> float:
    q = s["B"] * s["Nq"] * s["Hq"] * s["D"] * elem
    kv = 2 * s["Nk"] * s["Hkv"] * s["D"] * elem
    pos = (s["Nk"] + s["B"] * s["Nq"]) * s["A"] * pos_bytes
    out = q + s["B"] * s["Hq"] * s["Nq"] * 4  # out in bf16 + lse fp32
    return float(q + kv + pos + out)


def occupancy(row) -> int:
    """CTAs per SM allowed by registers and shared memory."""
    threads = 32 * row["num_warps"]
    regs = math.ceil(row["registers"] * threads / 256) * 256  # allocation granularity
    by_regs = REGS_PER_SM // regs
    by_smem = SMEM_PER_SM // max(row["shared"], 1)
    return max(1, min(by_regs, by_smem, 2048 // threads))


def prologue_bytes(s, elem: int = 2, pos_bytes: int = 4) -> float:
    """HBM traffic of the rotate-once prologue (``attention_triton_rotate.rotate_keys_fwd``)
    beyond what the attention kernel reads anyway: the cached K, V and positions read, the rotated keys
    (one copy per query head) and the packed values written; the kernel then reads those
    instead of the pools. Rows padded as the launcher pads them (``scratch_rows``)."""
    from lol_kernels.attention.attention_triton_rotate import scratch_rows

    P = frame_layout(s)[3]
    _, rows = scratch_rows(P, s["S"], 0)
    read = 2 * s["Nk"] * s["Hkv"] * s["D"] * elem + s["Nk"] * s["A"] * pos_bytes
    write = s["B"] * (s["Hq"] + s["Hkv"]) * rows * s["D"] * elem
    return float(read + write)


#: the two key paths the launcher chooses between (``rope_keys``): kernel name per path
PATHS = {"fused": "paged_rope_attn_fwd", "once": "paged_attn_rotated_fwd"}


def static_rows(dtypes, shape=None, paths=("fused", "once")) -> list[dict]:
    """The sm_90 compile model of every autotune config for ``dtypes`` at ``shape``, for each
    key path: ``fused`` (keys rotated in the key loop) and ``once`` (rotate once per call,
    then a plain paged loop: ``prologue_ms`` of traffic added to its prediction)."""
    from lol_kernels.attention.attention_triton_split import PART_FIXED_TILES, num_splits_for
    from lol_kernels.common import aot

    s = SHAPE if shape is None else shape
    fl, by = flops(s), min_bytes(s)
    roof = max(fl / PEAK_FLOPS, by / PEAK_BYTES)
    rows = []
    for path in paths:
        report = aot.sm90_report(dtypes, (s["D"],), kernel=PATHS[path], rope=False,
                                 causal=False, group=s["Hq"] // s["Hkv"], has_new=False,
                                 has_shift=True, page_size=s["S"])
        prologue_s = prologue_bytes(s) / PEAK_BYTES if path == "once" else 0.0
        rows += [static_row(r, s, path, fl, roof, prologue_s, PART_FIXED_TILES, num_splits_for)
                 for r in report]
    return rows


def static_row(r, s, path, fl, roof, prologue_s, part_fixed_tiles, num_splits_for) -> dict:
    """One config's row of :func:`static_rows` from its sm_90 report ``r``."""
    per_sm = occupancy(r)
    ctas = math.ceil(s["Nq"] / r["BLOCK_M"]) * s["Hq"] * s["B"]
    # the cached-key loop (has_new=False: the only loop); mask/rescale blocks run rarely
    body = max(r["loop_hot_instructions"] or [0])
    i_loop = (r["loop_hot_instructions"] or [0]).index(body)
    # packed keys (once): only the valid ones; fused: every slot of every page
    tiles = math.ceil(s["Nk"] / r["BLOCK_N"]) if path == "once" else key_tiles(s, r["BLOCK_N"])
    issue_s = ctas * tiles * body * r["num_warps"] / (ISSUE_PER_SM * NUM_SMS * CLOCK)
    exp_s = s["Hq"] * s["Nq"] * s["Nk"] * s["B"] / (16 * NUM_SMS * CLOCK)
    trig = ctas * s["Nk"] * s["D"] if path == "fused" else 0  # RoPE sin/cos in the loop
    mufu_s = exp_s + trig / (16 * NUM_SMS * CLOCK)
    bound = max(roof, issue_s, mufu_s)
    # pessimistic: a warp waits for its scores product, then issues the softmax while no
    # product is in flight; only the key loads (and rotation) overlap the previous P V.
    # One CTA's tile then takes s1 cycles; per_sm CTAs interleave, so a tile costs
    # s1 / per_sm unless issue or the tensor cores bind first
    t_mma = 4.0 * r["BLOCK_M"] * r["BLOCK_N"] * s["D"] / (PEAK_FLOPS / NUM_SMS) * CLOCK
    warp_cycles = r["num_warps"] / ISSUE_PER_SM  # issue cycles per instruction per SM
    soft = (r["loop_softmax_instructions"] or [0])[i_loop] * warp_cycles
    s1 = max(body * warp_cycles - soft, t_mma / 2) + t_mma / 2 + soft
    tile = max(body * warp_cycles, t_mma, s1 / per_sm)
    serial_s = ctas * tiles * tile / (NUM_SMS * CLOCK)
    # split-KV as the launcher picks it; waves of ctas * splits programs, each with the
    # part's tiles plus the fixed per-part work; the merge moves fp32 parts through HBM
    splits = num_splits_for(ctas, tiles, NUM_SMS, per_sm)
    slots = NUM_SMS * per_sm
    waves = math.ceil(ctas * splits / slots)
    eff = ctas * tiles / (waves * slots * (tiles / splits + part_fixed_tiles))
    merge_s = 0.0 if splits == 1 else (
        splits * s["B"] * s["Hq"] * s["Nq"] * (s["D"] + 1) * 8 / PEAK_BYTES)
    pred = bound / eff + merge_s + prologue_s
    serial = max(serial_s, bound) / eff + merge_s + prologue_s
    threads = 32 * r["num_warps"]
    return {"path": path,
            "config": f"M{r['BLOCK_M']}-N{r['BLOCK_N']}-w{r['num_warps']}-s{r['num_stages']}",
            "dtype": r["dtype"], "registers": r["registers"], "shared_B": r["shared"],
            "stack_B": r["stack"], "local_B": r["local"], "hgmma": r["hgmma"],
            "ctas_per_sm": per_sm, "splits": splits, "wave_eff": eff, "gflop": fl / 1e9,
            "min_MB": min_bytes(s) / 1e6, "roofline_ms": roof * 1e3,
            "loop_instr": max(r["loop_instructions"] or [0]), "loop_hot": body,
            "mufu_hot": (r["loop_hot_mufu"] or [0])[i_loop],
            "bar_hot": (r["loop_hot_bar"] or [0])[i_loop],
            "instr_per_pair": body * threads / (r["BLOCK_M"] * r["BLOCK_N"]),
            "issue_ms": issue_s * 1e3, "exp_ms": exp_s * 1e3, "mufu_ms": mufu_s * 1e3,
            "merge_ms": merge_s * 1e3, "prologue_ms": prologue_s * 1e3,
            "predicted_ms": pred * 1e3, "predicted_tflops": fl / pred / 1e12,
            "serial_ms": serial * 1e3, "serial_tflops": fl / serial / 1e12,
            "goal_ms": fl / (GOAL * PEAK_FLOPS) * 1e3}


def make_inputs(s, dtype, device):
    """Inputs of shape ``s`` as ``PagedKVCache`` lays a cache out: frame ``f`` (temporal
    position ``f``) on ``ceil(Nf / S)`` fresh pages, the last one partial, the page table in
    a random order; the queries are the next frames' first ``Nq`` tokens. Returns a dict of
    ``q, q_pos, cache_k, cache_v, cache_pos, page_len, page_table, table``."""
    import lol_kernels as lk
    from lol_kernels.cache import token_positions

    nf, frames, ppf, P = frame_layout(s)
    B, S, A = s["B"], s["S"], s["A"]
    g = torch.Generator(device="cpu").manual_seed(0)
    kpos = torch.zeros(frames, ppf * S, A, dtype=torch.int32)
    kpos[:, :nf] = token_positions(torch.arange(frames), s["Fh"], s["Fw"])[0].view(frames, nf, A)
    page_len = torch.full((frames, ppf), S, dtype=torch.int32)
    page_len[:, -1] = nf - (ppf - 1) * S
    q_frames = torch.arange(frames, frames + math.ceil(s["Nq"] / nf))
    qpos = token_positions(q_frames, s["Fh"], s["Fw"], batch_size=B)[:, : s["Nq"]]
    x = dict(
        q=torch.randn(B, s["Nq"], s["Hq"], s["D"], generator=g),
        cache_k=torch.randn(P, S, s["Hkv"], s["D"], generator=g),
        cache_v=torch.randn(P, S, s["Hkv"], s["D"], generator=g))
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    table = torch.stack([torch.randperm(P, generator=g) for _ in range(B)]).int()
    x.update(q_pos=qpos.to(device).contiguous(), cache_pos=kpos.view(P, S, A).to(device),
             page_len=page_len.view(P).to(device), page_table=table.to(device),
             table=lk.rope_frequencies(s["D"], s["Hq"], jitter_sigma=0.8))
    return x


def parity_check(x, out, lse, queries: int = 256) -> dict:
    """The kernel's first ``queries`` rows against the float64 reference, by the parity rule of
    docs/design.md §5 (``err <= 2 err(reference in the input dtype) + 1e-5``)."""
    from lol_kernels.attention import paged_attention_reference

    n = min(queries, x["q"].shape[1])
    args = [x["q"][:, :n], x["q_pos"][:, :n], x["cache_k"], x["cache_v"], x["cache_pos"],
            x["page_len"], x["page_table"], x["table"]]

    def ref(dt):
        a = [t.to(dt) if t.is_floating_point() else t for t in args[:-1]]
        return paged_attention_reference(*a, args[-1])

    (o64, l64), (olo, llo) = ref(torch.float64), ref(x["q"].dtype)
    err = float((out[:, :n].double() - o64).abs().max())
    ref_err = float((olo.double() - o64).abs().max())
    lse_err = float((lse[:, :, :n].double() - l64).abs().max())
    lse_ref_err = float((llo.double() - l64).abs().max())
    ok = bool(torch.isfinite(out[:, :n]).all()) and err <= 2 * ref_err + 1e-5 \
        and lse_err <= 2 * lse_ref_err + 1e-5
    return {"queries": n, "out_err": err, "out_ref_err": ref_err, "lse_err": lse_err,
            "lse_ref_err": lse_ref_err, "ok": ok}


def measured_rows(dtype=torch.bfloat16, shape=None, device="cuda", check=None) -> list[dict]:
    """Timings of the Triton kernel and rotate-then-attend baselines at ``shape`` (default
    :data:`SHAPE`) on ``device``: ``do_bench`` on a GPU; host wall time elsewhere (the kernel
    then runs in the interpreter, so the figures only prove the path runs). ``check``: a dict
    that receives :func:`parity_check` of the kernel's output."""
    import torch.nn.functional as F

    import lol_kernels as lk
    from lol_kernels.attention import attention_triton as tk
    from lol_kernels.attention import attention_triton_rotate as tk_rotate
    from lol_kernels.attention.reference import gather_keys

    s = SHAPE if shape is None else shape
    dev = torch.device(device)
    x = make_inputs(s, dtype, dev)
    fl = flops(s)
    rows = []
    if dev.type == "cuda":
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, warmup=25, rep=100)
    else:
        def timer(fn):
            return bench(fn, warmup=1, repeats=3)["median_s"] * 1e3

    def add(name, fn, note=""):
        try:
            ms = timer(fn)
        except Exception as e:  # a missing or failing baseline must not hide the others
            rows.append({"method": name, "note": f"failed: {type(e).__name__}: {e}"[:120]})
            return
        rows.append({"method": name, "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12,
                     "pct_of_800": 100 * fl / (ms * 1e-3) / PEAK_FLOPS, "note": note})

    def ours():
        return lk.paged_attention(x["q"], x["q_pos"], x["cache_k"], x["cache_v"], x["cache_pos"],
                                  x["page_len"], x["page_table"], x["table"], backend="triton")
    def path(rope_keys):  # the kernel backend directly, one key path forced
        return lambda: tk.paged_attention_triton(
            x["q"], x["q_pos"], x["cache_k"], x["cache_v"], x["cache_pos"], x["page_len"],
            x["page_table"], x["table"], config={"rope_keys": rope_keys})
    if check is not None:  # before timing: a wrong result is worth more than a fast one
        check.update(parity_check(x, *ours()))
        check["paths"] = {p: parity_check(x, *path(p)()) for p in ("fused", "once")}
        check["ok"] = check["ok"] and all(c["ok"] for c in check["paths"].values())
    add("lol triton (public op, key path auto)", ours)
    for name, p, kernel in (("lol triton fused (RoPE in the key loop)", "fused",
                             tk.paged_rope_attn_fwd_tuned),
                            ("lol triton rotate once + paged loop", "once",
                             tk_rotate.paged_attn_rotated_fwd_tuned)):
        add(name, path(p))
        best = getattr(kernel, "best_config", None)
        if best is not None:
            rows[-1]["note"] = f"best config {best}"

    # baselines get keys gathered and rotated ahead of time (not counted); GQA: key head
    # h // G rotated with query head h's frequencies, as the kernel does
    group = s["Hq"] // s["Hkv"]
    k, v, kpos, _ = gather_keys(x["cache_k"], x["cache_v"], x["cache_pos"], x["page_len"],
                                x["page_table"], None)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    qr = lk.apply_rope(x["q"], x["q_pos"], x["table"]).transpose(1, 2).contiguous()
    kr = lk.apply_rope(k, kpos, x["table"]).transpose(1, 2).contiguous()
    vt = v.transpose(1, 2).contiguous()
    add("torch SDPA (pre-rotated dense K)", lambda: F.scaled_dot_product_attention(qr, kr, vt))
    try:
        from torch.nn.attention.flex_attention import flex_attention
        if dev.type == "cuda":
            flex = torch.compile(flex_attention)
            add("FlexAttention compiled (pre-rotated dense K)", lambda: flex(qr, kr, vt))
        else:  # compiling for the CPU would take minutes for a smoke run
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            add("FlexAttention eager (pre-rotated dense K)", lambda: flex_attention(qr, kr, vt))
    except ImportError:
        rows.append({"method": "FlexAttention", "note": "not available"})
    try:
        from flash_attn import flash_attn_func
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (qr, kr, vt))
        add("flash-attn (pre-rotated dense K)", lambda: flash_attn_func(qf, kf, vf))
    except ImportError:
        rows.append({"method": "flash-attn", "note": "not installed"})
    return rows


BACKWARD_COLUMNS = ["kernel", "config", "dtype", "head_dim", "registers", "shared_B", "stack_B",
                    "spills", "hgmma", "mufu", "loop_hot_instructions"]
STATIC_COLUMNS = ["path", "config", "dtype", "registers", "shared_B", "stack_B", "local_B",
                  "hgmma", "ctas_per_sm", "splits", "wave_eff", "roofline_ms", "loop_instr",
                  "loop_hot", "mufu_hot", "bar_hot", "instr_per_pair", "issue_ms", "mufu_ms",
                  "merge_ms", "prologue_ms", "predicted_ms", "predicted_tflops", "serial_ms",
                  "serial_tflops", "goal_ms"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--dtypes", default="bf16", help="comma list of fp16,bf16 for the compile")
    ap.add_argument("--measure", action="store_true",
                    help="the measured mode only (no sm_90 compile): a GPU, or --tiny")
    ap.add_argument("--tiny", action="store_true",
                    help="the TINY shape; without a GPU the kernel runs under TRITON_INTERPRET=1")
    ap.add_argument("--repeats", type=int, default=None, help="unused (harness compatibility)")
    ap.add_argument("--no-backward", action="store_true",
                    help="skip the sm_90 compile of rope_attention's backward kernels")
    args = ap.parse_args(argv)
    shape = TINY if args.tiny else SHAPE
    cuda = torch.cuda.is_available()
    if args.measure and not cuda:
        if not args.tiny:
            ap.error("--measure needs a CUDA GPU; add --tiny to run it in the Triton interpreter")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    static = [] if args.measure else static_rows(tuple(args.dtypes.split(",")), shape)
    backward = []
    if not (args.measure or args.no_backward):
        from lol_kernels.attention.rope_attention_aot import backward_static_rows
        backward = backward_static_rows(tuple(args.dtypes.split(",")), (shape["D"],))
    measured, parity = [], {}
    if args.measure or cuda:
        # the interpreter computes bf16 products wrongly (docs/design.md §8): fp16 there
        dtype = torch.bfloat16 if cuda else torch.float16
        measured = measured_rows(dtype, shape, "cuda" if cuda else "cpu", check=parity)
    mode = "measured" if args.measure else "static" + ("+measured" if measured else "")
    payload = {"shape": shape, "mode": mode, "flops": flops(shape), "min_bytes": min_bytes(shape),
               "ceilings": {"flops": PEAK_FLOPS, "bytes_per_s": PEAK_BYTES, "sms": NUM_SMS},
               "goal_tflops": GOAL * PEAK_FLOPS / 1e12, "configs": static,
               "best": {p: max((r for r in static if r["path"] == p),
                               key=lambda r: r["serial_tflops"] + r["predicted_tflops"])
                        for p in {r["path"] for r in static}},
               "backward": backward,
               "measured": measured,
               "parity": parity or None,
               "measured_note": None if cuda else (
                   "no CUDA device: Triton interpreter on the CPU, host timings (not kernel "
                   "speed)" if measured else "no CUDA device: static report only")}
    table = markdown_table(static, STATIC_COLUMNS) if static else ""
    if backward:
        table += "\nBackward kernels of rope_attention (sm_90 compile, per key or query tile):\n"
        table += markdown_table(backward, BACKWARD_COLUMNS)
    if measured:
        table += "\n" + markdown_table(measured, ["method", "ms", "tflops", "pct_of_800",
                                                  "note"])
        table += (f"\nParity of the first {parity['queries']} queries vs float64: "
                  f"{'ok' if parity['ok'] else 'FAILED'} (out err {parity['out_err']:.3g}, "
                  f"reference in the input dtype {parity['out_ref_err']:.3g})\n")
    if not cuda:
        table += f"\n{payload['measured_note']}.\n"
    path = write_results(args.out, "kernel_report", payload, table)
    print(table)
    print(f"wrote {path}")
    return 0 if not parity or parity["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
