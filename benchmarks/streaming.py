"""Streaming benchmark: per-block time and resident memory over a long stream on the CPU.

Runs the tiny random model (``--preset tiny``, 8x8 latents = 16 tokens a frame, 4 steps + the
write pass = 5 forwards a block) for ``--blocks`` blocks with each cache configuration, every
configuration in its own process (so resident memory is not shared between them). The VAE
decode is **disabled** (latents only): the figures measure the transformer and the KV cache.

Target (docs/design.md §5): with ``sink-window`` block 1000 is within 10% of block 10 in time and
memory; the ``growing`` baseline (no eviction) grows. Block figures are medians over a window
of ``--window`` blocks centered on the block (the machine is shared; single blocks are noisy).
Both wall time and this process's CPU time per block are recorded: on a shared machine the
wall time also measures the neighbours' load, the CPU time (1 thread) only the block's work.

Modes (``--modes``, one run per cache and mode): ``eager`` (the default generator),
``validate`` (eager with ``LOL_VALIDATE=1``: every op reads its ids and positions on the host,
the cost of checking values on every call), ``compile`` (``lol generate --compile``: each block's
forwards as two ``torch.compile(fullgraph=True)`` graphs, backend ``--compile-backend``; the
first block pays the compilation, reported as ``compile s``). With the tiny model on the CPU
the block's time is host time: Python, dispatch and small kernels, what CUDA graphs remove on a
GPU.

Usage::

    python benchmarks/streaming.py --out results/streaming            # 1000 blocks each
    python benchmarks/streaming.py --quick --out /tmp/s               # 100 blocks
    python benchmarks/streaming.py --blocks 60 --caches longlive --modes validate,eager,compile

Writes ``streaming.json`` (settings, per-block arrays, summary), ``streaming.md`` (table) and
``streaming.png`` (time and memory against block index).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, write_results  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def new_run(cache: str, blocks: int, *, latent: int = 8, mode: str = "eager",
            compile_backend: str = "inductor"):
    """The tiny random model's stream with cache configuration ``cache`` (VAE decode off) and
    its timed call: ``(stream, step)``, ``step()`` generating the next block's latents. Mode
    ``validate`` is eager with ``LOL_VALIDATE=1`` in the environment, which the caller sets."""
    from lol_model.streaming.settings import StreamSettings
    from lol_model.streaming.stream import advance, new_stream

    s = StreamSettings(blocks=blocks, cache=cache, latent_height=latent, latent_width=latent,
                       decode=False, seed=0,
                       compile=compile_backend if mode == "compile" else None)
    st = new_stream(s)
    return st, lambda: advance(st)


def worker(args) -> None:
    """One configuration in this process: per-block seconds and RSS, JSON to ``args.result``."""
    if args.mode == "validate":
        os.environ["LOL_VALIDATE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    st, step = new_run(args.cache, args.blocks, latent=args.latent, mode=args.mode,
                       compile_backend=args.compile_backend)
    times, cpu, rss, peak, cache_mib = [], [], [], [], []
    for _ in range(args.blocks):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        rss.append(rss_mib())
        peak.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        cache_mib.append(st.cache.memory_bytes() / 2**20)
    tokens = st.cache.frame_tokens
    Path(args.result).write_text(json.dumps({
        "cache": args.cache, "mode": args.mode, "time_s": times, "cpu_s": cpu, "rss_mib": rss, "peak_rss_mib": peak,
        "cache_mib": cache_mib, "frame_tokens": tokens, "frames_cached": st.cache.num_frames}))


def window(xs, block: int, w: int) -> list:
    """``xs`` over ``w`` blocks centered on 1-based ``block`` (clipped to the run)."""
    i = block - 1
    lo = max(0, min(i - w // 2, len(xs) - w))
    return xs[lo : lo + w]


def window_median(xs, block: int, w: int) -> float:
    return statistics.median(window(xs, block, w))


def window_min(xs, block: int, w: int) -> float:
    """Minimum over the window: the least disturbed by other processes on a shared machine."""
    return min(window(xs, block, w))


def plot(runs: dict, path: Path, blocks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(runs.items()):
        x, c = range(1, len(r["time_s"]) + 1), f"C{i}"
        ax[0].plot(x, [1000 * t for t in r["time_s"]], c=c, lw=0.6, label=f"{name} wall")
        ax[0].plot(x, [1000 * t for t in r["cpu_s"]], c=c, lw=0.6, ls=":", label=f"{name} CPU")
        ax[1].plot(x, r["peak_rss_mib"], c=c, lw=1.2, label=f"{name} peak RSS")
        ax[1].plot(x, r["cache_mib"], c=c, lw=1.0, ls="--", label=f"{name} cache tensors")
    ax[0].set(xlabel="block", ylabel="ms / block", yscale="log",
              title=f"per-block time, tiny model, CPU ({blocks} blocks)")
    ax[1].set(xlabel="block", ylabel="MiB", title="resident memory")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/streaming")
    p.add_argument("--blocks", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="100 blocks")
    p.add_argument("--caches", default="sink-window,growing")
    p.add_argument("--latent", type=int, default=8, help="latent height = width (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=51, help="blocks per windowed median")
    p.add_argument("--modes", default="eager",
                   help="comma-separated: eager, validate, compile (module doc)")
    p.add_argument("--compile-backend", default="inductor", help="backend of mode compile")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--cache", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.blocks = 100
    if args.cache:
        return worker(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, wall = {}, {}
    modes = args.modes.split(",")
    for cache in args.caches.split(","):
        for mode in modes:
            name = cache if modes == ["eager"] else f"{cache} {mode}"
            res = out / f"_{cache}_{mode}.json"
            cmd = [sys.executable, __file__, "--cache", cache, "--result", str(res), "--blocks",
                   str(args.blocks), "--latent", str(args.latent), "--threads",
                   str(args.threads), "--mode", mode, "--compile-backend", args.compile_backend]
            print(f"[streaming] {name}: {args.blocks} blocks ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall[name] = time.perf_counter() - t0
            runs[name] = json.loads(res.read_text())
            res.unlink()

    first, last, w = 10, args.blocks, args.window
    rows, summary = [], {}
    for name, r in runs.items():
        t_a, t_b = (1000 * window_median(r["time_s"], b, w) for b in (first, last))
        u_a, u_b = (1000 * window_median(r["cpu_s"], b, w) for b in (first, last))
        n_a, n_b = (1000 * window_min(r["cpu_s"], b, w) for b in (first, last))
        m_a, m_b = (window_median(r["peak_rss_mib"], b, w) for b in (first, last))
        c_a, c_b = r["cache_mib"][first - 1], r["cache_mib"][last - 1]
        s = {"ms_block_first": t_a, "ms_block_last": t_b, "time_ratio": t_b / t_a,
             "cpu_ms_block_first": u_a, "cpu_ms_block_last": u_b, "cpu_time_ratio": u_b / u_a,
             "cpu_ms_min_first": n_a, "cpu_ms_min_last": n_b, "cpu_min_ratio": n_b / n_a,
             "peak_rss_first_mib": m_a, "peak_rss_last_mib": m_b, "rss_ratio": m_b / m_a,
             "cache_first_mib": c_a, "cache_last_mib": c_b, "frames_cached": r["frames_cached"],
             "wall_s": wall[name], "mode": r["mode"], "first_block_s": r["time_s"][0],
             "time_flat_10pct": abs(t_b / t_a - 1) <= 0.10,
             "cpu_time_flat_10pct": abs(u_b / u_a - 1) <= 0.10,
             "cpu_min_flat_10pct": abs(n_b / n_a - 1) <= 0.10,
             "rss_flat_10pct": abs(m_b / m_a - 1) <= 0.10}
        summary[name] = s
        rows.append({"cache": name, f"ms/block @{first}": t_a, f"ms/block @{last}": t_b,
                     "time ratio": s["time_ratio"], f"CPU ms @{first}": u_a,
                     f"CPU ms @{last}": u_b, "CPU ratio": s["cpu_time_ratio"],
                     "first block s": s["first_block_s"],
                     "min CPU ms ratio": s["cpu_min_ratio"],
                     f"peak RSS MiB @{first}": m_a, f"peak RSS MiB @{last}": m_b,
                     "RSS ratio": s["rss_ratio"], f"cache MiB @{last}": c_b})
    cols = list(rows[0])
    table = (f"Streaming, tiny model on CPU ({args.threads} thread), {args.blocks} blocks of 3 "
             f"latent frames ({runs[next(iter(runs))]['frame_tokens']} tokens a frame), VAE "
             f"decode off; block figures are medians of {w} blocks centered on the block "
             f"(min CPU ms ratio: minima of those windows, the figure least disturbed by "
             f"other processes).\n\n"
             + markdown_table(rows, cols))
    payload = {
        "settings": {"preset": "tiny", "latent": [args.latent, args.latent], "blocks": args.blocks,
                     "block_frames": 3, "forwards_per_block": 5, "threads": args.threads,
                     "modes": modes, "compile_backend": args.compile_backend,
                     "vae_decode": False, "window_median": w,
                     "note": "VAE decode disabled (latents only): transformer + KV cache only"},
        "summary": summary,
        "per_block": {n: {k: r[k] for k in ("time_s", "cpu_s", "rss_mib", "peak_rss_mib",
                                            "cache_mib")}
                      for n, r in runs.items()},
    }
    write_results(out, "streaming", payload, table)
    plot(runs, out / "streaming.png", args.blocks)
    print(table)


if __name__ == "__main__":
    main()
