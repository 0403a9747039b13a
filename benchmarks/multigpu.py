"""Head-parallel (Ulysses) streaming: traffic, FLOPs and a modelled time on 2, 4 and 8 H100s.

Per block and per rank, for Wan-1.3B (12 heads, dim 1536) and Wan-14B (40 heads, dim 5120) at
832x480 (latent 104x60, ``Nf`` = 52 x 30 = 1560 tokens a frame) with the ``longlive`` cache
(3-frame blocks: ``N`` = 4680 queries against ``sink + window + block`` = 12 frames = 18720
keys), ``steps`` denoising forwards plus the write pass (5 forwards a block):

* **all-to-all bytes**: each self-attention sends ``q, k, v`` of its ``N / w`` tokens (all
  heads) and receives them back as one output ``[N / w, H, D]``; a rank keeps ``1 / w`` of each
  exchange, so it moves ``(3 + 1) (N / w) dim (w - 1) / w`` elements per layer (bf16), plus one
  all-gather of the head's output per forward;
* **FLOPs**: linear (self q/k/v/o, cross q/o, FFN; the text K/V is computed once per prompt)
  and attention (``4 N Nk dim`` self, ``4 N L dim`` cross with ``L`` = 512 text tokens), both
  divided by ``w``;
* **modelled time**: FLOPs at an assumed achieved rate (``--linear-tflops``, ``--attn-tflops``)
  plus the all-to-all bytes at NVLink's ``--link-gbs`` (450 GB/s each way per GPU) and a
  per-collective latency, without overlap (a pessimistic model); speedup against one GPU.

The **measured** part is a fact about this CPU, not a goal: the wall time of one
``all_to_all_single`` of Wan-1.3B's q/k/v exchange over gloo between ``--nproc`` local
processes, and the tiny 12-head model's block time with 1 and 2 processes.

Usage::

    python benchmarks/multigpu.py --out results/multigpu
    python benchmarks/multigpu.py --no-measure --out /tmp/m      # the model only

Writes ``multigpu.json`` and ``multigpu.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, write_results  # noqa: E402

from lol_model.model.config import ModelConfig  # noqa: E402

MODELS = {"wan-1.3b": ModelConfig.preset("wan-1.3b"), "wan-14b": ModelConfig.preset("wan-14b")}
FRAME_TOKENS = (480 // 8 // 2) * (832 // 8 // 2)  # 30 x 52 = 1560
BLOCK_FRAMES, ATTENDED_FRAMES, TEXT_LEN, FORWARDS = 3, 12, 512, 5  # longlive; 4 steps + write
BYTES = 2  # bf16 activations


def per_block(cfg: ModelConfig, world: int) -> dict:
    """Per-rank traffic and FLOPs of one block (``FORWARDS`` forwards) on ``world`` ranks."""
    d, L = cfg.dim, cfg.num_layers
    N, Nk = BLOCK_FRAMES * FRAME_TOKENS, ATTENDED_FRAMES * FRAME_TOKENS
    keep = (world - 1) / world  # the share of an exchange that leaves the rank
    a2a = 4 * (N / world) * d * keep * BYTES  # q, k, v out + the output back, per layer
    gather = (N / world) * cfg.patch_dim * 4 * keep  # fp32 head output, once per forward
    linear = 2 * N * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * N * Nk * d + 4 * N * TEXT_LEN * d
    return {"a2a_bytes_per_exchange": a2a / 4 * (3 if world > 1 else 0),
            "a2a_bytes_per_layer": a2a if world > 1 else 0.0,
            "a2a_bytes": (a2a * L + gather) * FORWARDS if world > 1 else 0.0,
            "collectives": (2 * L + 1) * FORWARDS if world > 1 else 0,
            "linear_flops": linear * L * FORWARDS / world,
            "attn_flops": attn * L * FORWARDS / world}


def modelled(args) -> list[dict]:
    rows = []
    for name, cfg in MODELS.items():
        base = None
        for w in (1, 2, 4, 8):
            if cfg.num_heads % w:  # Ulysses needs w | H: Wan-1.3B has 12 heads
                rows.append({"model": name, "gpus": w, "speedup": f"n/a ({cfg.num_heads} heads)"})
                continue
            b = per_block(cfg, w)
            t_lin = b["linear_flops"] / (args.linear_tflops * 1e12)
            t_att = b["attn_flops"] / (args.attn_tflops * 1e12)
            t_comm = b["a2a_bytes"] / (args.link_gbs * 1e9) + b["collectives"] * args.latency_us * 1e-6
            t = t_lin + t_att + t_comm
            base = t if w == 1 else base
            rows.append({"model": name, "gpus": w, "a2a MB/exchange": b["a2a_bytes_per_exchange"] / 1e6,
                         "a2a MB/block": b["a2a_bytes"] / 1e6,
                         "linear TFLOP": b["linear_flops"] / 1e12,
                         "attn TFLOP": b["attn_flops"] / 1e12, "compute ms": (t_lin + t_att) * 1e3,
                         "comm ms": t_comm * 1e3, "block ms": t * 1e3, "speedup": base / t,
                         "comm share": t_comm / t})
    return rows


# --------------------------------------------------------------------------- measured (CPU)
def _measure_rank(rank, world, port, out, repeats):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = MODELS["wan-1.3b"]
    N = BLOCK_FRAMES * FRAME_TOKENS
    x = torch.randn(world, 3, N // world, cfg.num_heads // world, cfg.head_dim)
    y = torch.empty_like(x)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(y, x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"a2a_s": sorted(times[1:])[len(times[1:]) // 2],
                    "a2a_bytes": x.numel() * x.element_size()}, out)
    dist.destroy_process_group()


def measured_a2a(world: int, repeats: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "a2a.pt")
    mp.start_processes(_measure_rank, args=(world, port, out, repeats), nprocs=world,
                       start_method="spawn")
    return torch.load(out)


def measured_stream(world: int) -> float:
    """Seconds for tests/parallel/test_parallel.py's tiny 12-head streams (4 caches x 8 blocks)
    on ``world`` processes (for ``world > 1`` including the processes' start, about 3 s)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    code = (f"import time, sys; sys.path.insert(0, {str(root)!r}); "
            "import tests.parallel.test_parallel as T; "
            "from lol_model.streaming.stream import new_stream; T.PRESETS['tiny12'] = T.TINY12; "
            "T.register_test_caches(); import torch; torch.set_num_threads(1); "
            "t0 = time.perf_counter(); [T.stream_latents(new_stream(s)) for s in "
            "T.CASES.values()]; print(time.perf_counter() - t0)")
    if world == 1:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=root)
        return float(r.stdout.split()[-1])
    code = (f"import time, sys, tempfile; sys.path.insert(0, {str(root)!r}); "
            "import tests.parallel.test_parallel as T; t0 = time.perf_counter(); "
            f"T.spawn(T.worker_parity, {world}, tempfile.mkdtemp()); "
            "print(time.perf_counter() - t0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=root)
    return float(r.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/multigpu")
    p.add_argument("--linear-tflops", type=float, default=600.0,
                   help="achieved bf16 GEMM rate of one H100 (peak 989)")
    p.add_argument("--attn-tflops", type=float, default=450.0,
                   help="achieved attention rate of one H100")
    p.add_argument("--link-gbs", type=float, default=450.0, help="NVLink GB/s each way per GPU")
    p.add_argument("--latency-us", type=float, default=15.0, help="per collective")
    p.add_argument("--nproc", type=int, default=2, help="gloo processes for the measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-measure", action="store_true")
    args = p.parse_args()
    rows = modelled(args)
    cols = ["model", "gpus", "a2a MB/exchange", "a2a MB/block", "linear TFLOP", "attn TFLOP",
            "compute ms", "comm ms", "block ms", "speedup", "comm share"]
    table = markdown_table(rows, cols)
    payload = {"settings": vars(args), "frame_tokens": FRAME_TOKENS,
               "block_tokens": BLOCK_FRAMES * FRAME_TOKENS,
               "attended_tokens": ATTENDED_FRAMES * FRAME_TOKENS, "forwards_per_block": FORWARDS,
               "modelled": rows}
    if not args.no_measure:
        a2a = measured_a2a(args.nproc, args.repeats)
        m = {"gloo_a2a_ms": a2a["a2a_s"] * 1e3, "gloo_a2a_MB": a2a["a2a_bytes"] / 1e6,
             "gloo_GBps": a2a["a2a_bytes"] / a2a["a2a_s"] / 1e9,
             "tiny12_4caches_8blocks_s_1proc": measured_stream(1),
             f"tiny12_4caches_8blocks_s_{args.nproc}proc": measured_stream(args.nproc)}
        payload["measured_cpu"] = m
        table += (f"\nMeasured on this CPU (gloo, {args.nproc} processes, a fact, not a goal): "
                  f"one Wan-1.3B q/k/v all_to_all_single of {m['gloo_a2a_MB']:.1f} MB (fp32) "
                  f"takes {m['gloo_a2a_ms']:.1f} ms ({m['gloo_GBps']:.2f} GB/s); the tiny "
                  f"12-head streams take {m['tiny12_4caches_8blocks_s_1proc']:.1f} s in one "
                  f"process, {m[f'tiny12_4caches_8blocks_s_{args.nproc}proc']:.1f} s in "
                  f"{args.nproc} (process start and gloo latency dominate).\n")
    path = write_results(args.out, "multigpu", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
