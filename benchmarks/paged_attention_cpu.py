"""CPU path of ``paged_attention`` against SDPA on keys already rotated and contiguous.

Scaled-down Wan shape: one block of 3 frames x 390 tokens (1170 queries) over a cache of
12 frames (4680 keys: 3 sink + 9 window) plus the block's own keys, 12 heads, D = 128, fp32;
the cache on 128-token pages (``wan-page128``) or 64-token pages (``wan-page64``: 84 pages
per read instead of 48). Rows are labelled by ``shape``.

* ``sdpa_prerotated``: the floor: ``scaled_dot_product_attention`` on rotated contiguous K/V.
* ``paged``: ``lk.paged_attention`` (gather pages, rotate in place of read, one fused call):
  the CPU path rotates every key once per call, as the GPU's rotate-once path does (target:
  within about 1.05x of ``sdpa_prerotated``; ``ratio_of_minima`` is the figure to read on a
  shared machine, the medians move with the load).
* ``rerotate_sdpa``: what streaming code without this project does: re-rotate the dense
  window with a RoPE table (float32 angles), then SDPA.

    python benchmarks/paged_attention_cpu.py --out results
    python benchmarks/paged_attention_cpu.py --out /tmp/x --repeats 3 --shapes wan-page64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_interleaved, markdown_table, write_results  # noqa: E402

import lol_kernels as lk  # noqa: E402
from lol_kernels.cache import PagedKVCache, read_cache, token_positions  # noqa: E402
from lol_kernels.rope import apply_rope_torch, rope_naive_fp32  # noqa: E402

#: name -> keyword arguments of :func:`setup`
SHAPES = {"wan-page128": {"page_size": 128}, "wan-page64": {"page_size": 64}}


def setup(frame_tokens=390, grid=(15, 26), cached=12, sink=3, block=3, H=12, D=128,
          page_size=128, jitter_sigma=0.8):
    cache = PagedKVCache(num_layers=1, num_kv_heads=H, head_dim=D, frame_tokens=frame_tokens,
                         sink_frames=sink, window_frames=cached - sink, block_frames=block,
                         page_size=page_size)
    table = lk.rope_frequencies(D, H, jitter_sigma=jitter_sigma)
    t = 0
    while t < 40:  # stream long enough that the window has rolled
        blk = cache.append_frames(token_positions(torch.arange(t, t + block), *grid))
        n = block * frame_tokens
        cache.write(0, blk, torch.randn(1, n, H, D), torch.randn(1, n, H, D))
        t += block
    read = read_cache(cache, block, "absolute")
    q_pos = token_positions(read.q_t, *grid)
    n = block * frame_tokens
    q, k_new, v_new = (torch.randn(1, n, H, D) for _ in range(3))
    return cache, table, read, q, q_pos, k_new, v_new


def cases(**kw):
    """The timed calls of one shape (keyword arguments of :func:`setup`): ``{method:
    zero-argument callable}`` in timing order, and the shape's record."""
    cache, table, read, q, q_pos, k_new, v_new = setup(**kw)
    H, D = cache.num_kv_heads, cache.head_dim

    # the dense data a user without this project would hold
    idx = torch.cat([(fr.pages[0][:, None] * cache.page_size
                      + torch.arange(cache.page_size)).reshape(-1)[:cache.frame_tokens]
                     for fr in cache.frames()])
    k_win = cache.k[0].view(-1, H, D)[idx][None]
    v_win = cache.v[0].view(-1, H, D)[idx][None]
    k_pos = cache.pos.view(-1, cache.pos.shape[-1])[idx][None]
    K = torch.cat([k_win, k_new], 1)
    V = torch.cat([v_win, v_new], 1)
    KP = torch.cat([k_pos, q_pos], 1)
    qr = apply_rope_torch(q, q_pos, table).transpose(1, 2).contiguous()
    kr = apply_rope_torch(K, KP, table).transpose(1, 2).contiguous()
    vt = V.transpose(1, 2).contiguous()

    def sdpa_prerotated():
        return F.scaled_dot_product_attention(qr, kr, vt)

    def paged():
        return lk.paged_attention(q, q_pos, cache.k[0], cache.v[0], cache.pos, cache.page_len,
                                  read.page_table, table, k_new=k_new, v_new=v_new,
                                  page_shift=read.page_shift, backend="torch")

    def rerotate_sdpa():
        a = rope_naive_fp32(q, q_pos, table).transpose(1, 2)
        b = rope_naive_fp32(K, KP, table).transpose(1, 2)
        return F.scaled_dot_product_attention(a, b, V.transpose(1, 2))

    shape = {"N": q.shape[1], "Nk_cache": k_win.shape[1], "Nk_total": K.shape[1], "H": H,
             "D": D, "dtype": "float32", "page_size": cache.page_size,
             "pages_read": read.page_table.shape[1]}
    return {"sdpa_prerotated": sdpa_prerotated, "paged": paged,
            "rerotate_sdpa": rerotate_sdpa}, shape


def output(result):
    """Attention output ``[B, H, N, D]`` of any method's return value (``paged`` returns
    ``(out [B, N, H, D], lse)``, the SDPA methods the output itself)."""
    return result[0].transpose(1, 2) if isinstance(result, tuple) else result


def max_abs_diff(result, reference):
    """max |output - reference output| of two methods' return values."""
    return (output(result) - output(reference)).abs().max().item()


def flops(shape):
    """Floating-point operations of one attention call of ``shape`` (a :func:`cases` record)."""
    return 4 * shape["N"] * shape["Nk_total"] * shape["H"] * shape["D"]


def run_shape(name, repeats):
    """Rows of shape ``name``, its shape record and max |paged - SDPA|."""
    fns, shape = cases(**SHAPES[name])
    err = max_abs_diff(fns["paged"](), fns["sdpa_prerotated"]())
    stats = bench_interleaved(fns, repeats=repeats)
    floor = stats["sdpa_prerotated"]
    rows = [{"shape": name, "method": m, **r, "gflops": flops(shape) / r["median_s"] / 1e9,
             "ratio_vs_sdpa": r["median_s"] / floor["median_s"],
             "ratio_of_minima": r["min_s"] / floor["min_s"]} for m, r in stats.items()]
    return rows, shape, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args(argv)
    rows, shapes, errs = [], {}, {}
    for name in args.shapes:
        shape_rows, shapes[name], errs[name] = run_shape(name, args.repeats)
        rows += shape_rows
    table_md = markdown_table(rows, ["shape", "method", "median_s", "min_s", "gflops",
                                     "ratio_vs_sdpa", "ratio_of_minima"])
    path = write_results(args.out, "paged_attention_cpu",
                         {"shape": shapes, "max_abs_diff_paged_vs_sdpa": errs, "rows": rows},
                         table_md)
    errs_txt = ", ".join(f"{n} {e:.2e}" for n, e in errs.items())
    print(f"shapes {shapes}\nmax |paged - sdpa| = {errs_txt}\n\n{table_md}\nwrote {path}")


if __name__ == "__main__":
    main()
