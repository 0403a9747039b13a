"""MoC chunk router on the CPU: the C++ extension against the torch reference.

The router's shape at Wan-1.3B: B = 1, T = 37 query tiles, H = 12, D = 128, k = 8, C in {256, 1024, 4096,
16384} chunks, no masks. Columns:

* ``cpp_ms``: ``lk.moc_route(..., backend="cpp")`` (csrc/moc/router_cpu.cpp, OpenMP).
* ``torch_ms``: ``backend="torch"``, the reference that computes the scores in the contract's
  bit-exact order (indices identical to ``cpp``); ``ratio = torch_ms / cpp_ms``.
* ``*_cpu_ms``: process CPU time (all threads), less sensitive to other load on the machine.
* ``matmul_topk_ms``: for scale only, a plain ``einsum`` + ``topk``: fastest torch code, but its
  summation order is BLAS's, so near-ties may pick other chunks (not the contract).

    python benchmarks/moc_router.py --out results
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench, markdown_table, write_results  # noqa: E402

import lol_kernels as lk  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the router's sizes at Wan-1.3B (``C``, the number of chunks, varies)
B, T, H, D, K = 1, 37, 12, 128, 8
CHUNKS = (256, 1024, 4096, 16384)
#: methods whose indices follow the contract's summation order (identical to each other)
EXACT = ("cpp", "torch")


def cpu_time(fn, repeats):
    """Median process CPU time of ``fn()`` (all threads): robust to other load on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def matmul_topk(q, c, k):
    s = torch.einsum("bthd,bchd->bthc", q.float(), c.float())
    return s.topk(min(k, s.shape[-1]), dim=-1).indices.sort(dim=-1).values


def inputs(C, dtype="fp32", seed=None):
    """Random queries ``q [B, T, H, D]`` and chunk summaries ``c [B, C, H, D]`` in ``dtype``
    (from torch's global generator unless ``seed`` is given)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(DTYPES[dtype])
    c = torch.randn(B, C, H, D, generator=g).to(DTYPES[dtype])
    return q, c


def cases(q, c):
    """The timed calls on :func:`inputs`, ``{method: zero-argument callable}`` returning the
    routed chunk indices ``[B, T, H, K]``."""
    return {"cpp": lambda: lk.moc_route(q, c, K, backend="cpp"),
            "torch": lambda: lk.moc_route(q, c, K, backend="torch"),
            "matmul_topk": lambda: matmul_topk(q, c, K)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--chunks", default=",".join(map(str, CHUNKS)))
    ap.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=3, help="repeats of the slow reference")
    args = ap.parse_args(argv)
    if lk.moc.extension_error() is not None:
        sys.exit(f"the C++ extension is not available: {lk.moc.extension_error()}")

    rows = []
    for name in args.dtypes.split(","):
        for C in (int(x) for x in args.chunks.split(",")):
            fns = cases(*inputs(C, name))
            assert torch.equal(fns["cpp"](), fns["torch"]()), "cpp and torch disagree"
            cpp = bench(fns["cpp"], repeats=args.repeats)
            ref = bench(fns["torch"], warmup=0, repeats=args.ref_repeats)
            mm = bench(fns["matmul_topk"], repeats=args.repeats)
            cpp_cpu = cpu_time(fns["cpp"], args.repeats)
            ref_cpu = cpu_time(fns["torch"], 1)
            row = {"dtype": name, "B": B, "T": T, "H": H, "D": D, "C": C, "k": K,
                   "cpp_ms": cpp["median_s"] * 1e3, "torch_ms": ref["median_s"] * 1e3,
                   "ratio": ref["median_s"] / cpp["median_s"],
                   "matmul_topk_ms": mm["median_s"] * 1e3,
                   "cpp_cpu_ms": cpp_cpu * 1e3, "torch_cpu_ms": ref_cpu * 1e3,
                   "cpu_ratio": ref_cpu / cpp_cpu,
                   "cpp_GMAC_s": B * T * H * C * D / cpp["median_s"] / 1e9,
                   "timings": {"cpp": cpp, "torch": ref, "matmul_topk": mm}}
            rows.append(row)
            print(f"{name} C={C}: cpp {row['cpp_ms']:.2f} ms, torch {row['torch_ms']:.1f} ms, "
                  f"ratio {row['ratio']:.1f}x, matmul+topk {row['matmul_topk_ms']:.2f} ms",
                  flush=True)
    table = markdown_table(rows, ["dtype", "C", "cpp_ms", "torch_ms", "ratio", "matmul_topk_ms",
                                  "cpp_cpu_ms", "torch_cpu_ms", "cpu_ratio", "cpp_GMAC_s"])
    load = os.getloadavg()[0]
    table += f"\nWall times are medians; load average {load:.1f} on {os.cpu_count()} cores.\n"
    path = write_results(args.out, "moc_router", {"rows": rows, "threads": torch.get_num_threads(),
                                                  "loadavg_1min": load}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
