"""Kernel report of the fused paged RoPE attention (issue 3) at the Wan shape.

Shape: one block of ``N = 4680`` queries (3 latent frames of 1560 tokens) over ``Nk = 18720``
cached keys (LongLive's 12 frames) in pages of ``S = 64`` slots, ``Hq = Hkv = 12`` heads of
``D = 128``, bf16, jittered 3D RoPE applied to the un-rotated keys in registers.

For every autotune config it reports, without a GPU:

* ``flops``: matmul FLOPs ``4 N Nk Hq D`` (FlashAttention's count; RoPE and softmax excluded);
* ``min_bytes``: compulsory HBM traffic: Q, K, V, positions read once, out and lse written once;
* static resources from the sm_90 ahead-of-time compile (``cuobjdump``): registers per thread,
  shared memory per CTA, stack/local bytes, HGMMA count; CTAs per SM from registers and shared
  memory; ``splits``: the split-KV parts the launcher picks (``triton_split.num_splits_for``)
  and ``wave_eff``: the fraction of the grid's ``waves * slots`` filled with key tiles (the
  ``cdiv(N, BLOCK_M) * Hq * splits`` programs on 132 SMs, each part also paying its fixed
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
  ``P V``), CTAs resident on one SM interleaving. A GPU run lands between the two. ``exp_ms``: ``Hq * N * Nk`` ``exp2`` on the MUFU at 16 per SM per clock (the
  RoPE sin/cos add ``ctas * Nk * D`` more MUFU ops, ``mufu_ms`` counts both).

On a machine with a CUDA GPU it also measures (``triton.testing.do_bench``) the Triton kernel
(autotuned) next to torch SDPA, FlexAttention and flash-attn (when installed) on keys that were
rotated beforehand (those baselines cannot rotate per head at read time), and writes TFLOP/s.

    python benchmarks/kernel_report.py --out results
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, write_results  # noqa: E402

from lol_kernels.attention.triton_split import PART_FIXED_TILES, num_splits_for  # noqa: E402
from lol_kernels.common import aot  # noqa: E402

PEAK_FLOPS = 800e12  # H100 measured dense bf16
PEAK_BYTES = 3.0e12  # H100 copy bandwidth
GOAL = 0.7
NUM_SMS = 132  # H100 SXM
REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # 228 KiB
CLOCK = 1.755e9
ISSUE_PER_SM = 4  # warp schedulers
SHAPE = {"B": 1, "N": 4680, "Nk": 18720, "Hq": 12, "Hkv": 12, "D": 128, "S": 64, "A": 3}


def flops(s) -> float:
    return 4.0 * s["B"] * s["N"] * s["Nk"] * s["Hq"] * s["D"]


def min_bytes(s, elem: int = 2, pos_bytes: int = 4) -> float:
    q = s["B"] * s["N"] * s["Hq"] * s["D"] * elem
    kv = 2 * s["Nk"] * s["Hkv"] * s["D"] * elem
    pos = (s["Nk"] + s["B"] * s["N"]) * s["A"] * pos_bytes
    out = q + s["B"] * s["Hq"] * s["N"] * 4  # out in bf16 + lse fp32
    return float(q + kv + pos + out)


def occupancy(row) -> int:
    """CTAs per SM allowed by registers and shared memory."""
    threads = 32 * row["num_warps"]
    regs = math.ceil(row["registers"] * threads / 256) * 256  # allocation granularity
    by_regs = REGS_PER_SM // regs
    by_smem = SMEM_PER_SM // max(row["shared"], 1)
    return max(1, min(by_regs, by_smem, 2048 // threads))


def static_rows(dtypes) -> list[dict]:
    fl, by = flops(SHAPE), min_bytes(SHAPE)
    roof = max(fl / PEAK_FLOPS, by / PEAK_BYTES)
    rows = []
    report = aot.sm90_report(dtypes, (SHAPE["D"],), rope=False, causal=False, group=1,
                                    has_new=False, has_shift=True, page_size=SHAPE["S"])
    for r in report:
        per_sm = occupancy(r)
        ctas = math.ceil(SHAPE["N"] / r["BLOCK_M"]) * SHAPE["Hq"] * SHAPE["B"]
        # the cached-key loop (has_new=False: the only loop); mask/rescale blocks run rarely
        body = max(r["loop_hot_instructions"] or [0])
        tiles = math.ceil(SHAPE["Nk"] / r["BLOCK_N"])
        issue_s = ctas * tiles * body * r["num_warps"] / (ISSUE_PER_SM * NUM_SMS * CLOCK)
        exp_s = SHAPE["Hq"] * SHAPE["N"] * SHAPE["Nk"] * SHAPE["B"] / (16 * NUM_SMS * CLOCK)
        mufu_s = exp_s + ctas * SHAPE["Nk"] * SHAPE["D"] / (16 * NUM_SMS * CLOCK)
        bound = max(roof, issue_s, mufu_s)
        # pessimistic: a warp waits for its scores product, then issues the softmax while no
        # product is in flight; only the key loads and rotation overlap the previous P V.
        # One CTA's tile then takes s1 cycles; per_sm CTAs interleave, so a tile costs
        # s1 / per_sm unless issue or the tensor cores bind first
        t_mma = 4.0 * r["BLOCK_M"] * r["BLOCK_N"] * SHAPE["D"] / (PEAK_FLOPS / NUM_SMS) * CLOCK
        warp_cycles = r["num_warps"] / ISSUE_PER_SM  # issue cycles per instruction per SM
        soft = (r["loop_softmax_instructions"] or [0])[0] * warp_cycles
        s1 = max(body * warp_cycles - soft, t_mma / 2) + t_mma / 2 + soft
        tile = max(body * warp_cycles, t_mma, s1 / per_sm)
        serial_s = ctas * tiles * tile / (NUM_SMS * CLOCK)
        # split-KV as the launcher picks it; waves of ctas * splits programs, each with the
        # part's tiles plus the fixed per-part work; the merge moves fp32 parts through HBM
        splits = num_splits_for(ctas, tiles, NUM_SMS, per_sm)
        slots = NUM_SMS * per_sm
        waves = math.ceil(ctas * splits / slots)
        eff = ctas * tiles / (waves * slots * (tiles / splits + PART_FIXED_TILES))
        merge_s = 0.0 if splits == 1 else (
            splits * SHAPE["B"] * SHAPE["Hq"] * SHAPE["N"] * (SHAPE["D"] + 1) * 8 / PEAK_BYTES)
        pred = bound / eff + merge_s
        serial = max(serial_s, bound) / eff + merge_s
        rows.append({"config": f"M{r['BLOCK_M']}-N{r['BLOCK_N']}-w{r['num_warps']}"
                               f"-s{r['num_stages']}", "dtype": r["dtype"],
                     "registers": r["registers"], "shared_B": r["shared"], "stack_B": r["stack"],
                     "local_B": r["local"], "hgmma": r["hgmma"], "ctas_per_sm": per_sm,
                     "splits": splits, "wave_eff": eff, "gflop": fl / 1e9, "min_MB": by / 1e6,
                     "roofline_ms": roof * 1e3, "loop_instr": max(r["loop_instructions"] or [0]),
                     "loop_hot": body, "issue_ms": issue_s * 1e3,
                     "exp_ms": exp_s * 1e3, "mufu_ms": mufu_s * 1e3, "merge_ms": merge_s * 1e3,
                     "predicted_ms": pred * 1e3,
                     "predicted_tflops": fl / pred / 1e12, "serial_ms": serial * 1e3,
                     "serial_tflops": fl / serial / 1e12,
                     "goal_ms": fl / (GOAL * PEAK_FLOPS) * 1e3})
    return rows


def make_inputs(s, dtype, device):
    import lol_kernels as lk
    from lol_kernels.cache import token_positions

    P = s["Nk"] // s["S"]
    g = torch.Generator(device="cpu").manual_seed(0)
    frames = s["Nk"] // 1560
    kpos = token_positions(torch.arange(frames), 30, 52)[0].view(P, s["S"], 3)
    qpos = token_positions(torch.arange(frames, frames + 3), 30, 52)[:, : s["N"]]
    x = dict(
        q=torch.randn(1, s["N"], s["Hq"], s["D"], generator=g),
        cache_k=torch.randn(P, s["S"], s["Hkv"], s["D"], generator=g),
        cache_v=torch.randn(P, s["S"], s["Hkv"], s["D"], generator=g))
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}
    x.update(q_pos=qpos.to(device).int().contiguous(), cache_pos=kpos.to(device).int(),
             page_len=torch.full((P,), s["S"], dtype=torch.int32, device=device),
             page_table=torch.randperm(P, generator=g).int().view(1, P).to(device),
             table=lk.rope_frequencies(s["D"], s["Hq"], jitter_sigma=0.8))
    return x


def measured_rows(dtype=torch.bfloat16) -> list[dict]:
    """Timings on the local CUDA GPU: the Triton kernel and rotate-then-attend baselines."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    import lol_kernels as lk
    from lol_kernels.attention import triton_kernel as tk
    from lol_kernels.attention.reference import gather_keys

    s, dev = SHAPE, "cuda"
    x = make_inputs(s, dtype, dev)
    fl = flops(s)
    rows = []

    def add(name, fn, note=""):
        try:
            ms = do_bench(fn, warmup=25, rep=100)
        except Exception as e:  # a missing or failing baseline must not hide the others
            rows.append({"method": name, "note": f"failed: {type(e).__name__}: {e}"[:120]})
            return
        rows.append({"method": name, "ms": ms, "tflops": fl / (ms * 1e-3) / 1e12,
                     "pct_of_800": 100 * fl / (ms * 1e-3) / PEAK_FLOPS, "note": note})

    def ours():
        return lk.paged_attention(x["q"], x["q_pos"], x["cache_k"], x["cache_v"], x["cache_pos"],
                                  x["page_len"], x["page_table"], x["table"], backend="triton")
    add("lol triton (RoPE in registers, paged)", ours)
    best = getattr(tk.paged_rope_attn_fwd_tuned, "best_config", None)
    if best is not None:
        rows[-1]["note"] = f"best config {best}"

    # baselines get keys gathered and rotated ahead of time (not counted)
    k, v, kpos, _ = gather_keys(x["cache_k"], x["cache_v"], x["cache_pos"], x["page_len"],
                                x["page_table"], None)
    qr = lk.apply_rope(x["q"], x["q_pos"], x["table"]).transpose(1, 2).contiguous()
    kr = lk.apply_rope(k, kpos, x["table"]).transpose(1, 2).contiguous()
    vt = v.transpose(1, 2).contiguous()
    add("torch SDPA (pre-rotated dense K)", lambda: F.scaled_dot_product_attention(qr, kr, vt))
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
        add("FlexAttention compiled (pre-rotated dense K)", lambda: flex(qr, kr, vt))
    except ImportError:
        rows.append({"method": "FlexAttention", "note": "not available"})
    try:
        from flash_attn import flash_attn_func
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (qr, kr, vt))
        add("flash-attn (pre-rotated dense K)", lambda: flash_attn_func(qf, kf, vf))
    except ImportError:
        rows.append({"method": "flash-attn", "note": "not installed"})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--dtypes", default="bf16", help="comma list of fp16,bf16 for the compile")
    ap.add_argument("--repeats", type=int, default=None, help="unused (harness compatibility)")
    args = ap.parse_args(argv)
    static = static_rows(tuple(args.dtypes.split(",")))
    measured = measured_rows() if torch.cuda.is_available() else []
    payload = {"shape": SHAPE, "flops": flops(SHAPE), "min_bytes": min_bytes(SHAPE),
               "ceilings": {"flops": PEAK_FLOPS, "bytes_per_s": PEAK_BYTES, "sms": NUM_SMS},
               "goal_tflops": GOAL * PEAK_FLOPS / 1e12, "configs": static, "measured": measured,
               "measured_note": None if measured else "no CUDA device: static report only"}
    table = markdown_table(static, ["config", "dtype", "registers", "shared_B", "stack_B",
                                    "local_B", "hgmma", "ctas_per_sm", "splits", "wave_eff",
                                    "gflop", "min_MB", "roofline_ms", "loop_instr", "loop_hot",
                                    "issue_ms", "mufu_ms", "merge_ms", "predicted_ms", "predicted_tflops",
                                    "serial_ms", "serial_tflops",
                                    "goal_ms"])
    if measured:
        table += "\n" + markdown_table(measured, ["method", "ms", "tflops", "pct_of_800",
                                                  "note"])
    else:
        table += "\nNo CUDA device here: measured TFLOP/s not available (static report only).\n"
    path = write_results(args.out, "kernel_report", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
