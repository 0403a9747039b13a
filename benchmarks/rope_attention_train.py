"""Training step of ``rope_attention``: forward + backward against rotate-with-autograd + SDPA.

Small Wan-like shapes (12 heads, D = 128, fp32 on the CPU, per-head jittered 3D RoPE):
``B1-N3120`` is one clip of 2 latent frames x 1560 tokens, ``B2-N1560`` two clips of one frame.

* ``rotate_sdpa``: the baseline a model without this project runs: RoPE as a complex multiply
  with autograd (factors from float64 angles, formed once outside the timed step, as a model
  caches them), then ``F.scaled_dot_product_attention`` forward and backward.
* ``rope_attention``: ``lk.rope_attention(backend="torch")`` forward and backward (RoPE inside
  the op; the backward recomputes the rotations and runs torch's fused CPU flash backward).

Both get the same incoming gradient; the step is ``torch.autograd.grad(out, (q, k, v), dO)``.
``--split`` also times each forward alone (``*_fwd`` rows, ratio against the baseline's).
Figures are the median of ``--repeats`` interleaved runs (A, B, A, B, ...), so load from other
processes falls on both alike; ``ratio`` is rope_attention / rotate_sdpa.

    python benchmarks/rope_attention_train.py --out results           # CPU, fp32
    python benchmarks/rope_attention_train.py --tiny --out /tmp/x      # seconds (a smoke test)
    python benchmarks/rope_attention_train.py --cuda --out results     # + Triton backend, bf16
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
from lol_kernels.cache import token_positions  # noqa: E402
from lol_kernels.rope import rope_angles  # noqa: E402

#: name -> (B, frames, grid h x w of one latent frame, H, D); Wan 480p: 30 x 52 = 1560 tokens
SHAPES = {"B1-N3120": (1, 2, (30, 52), 12, 128), "B2-N1560": (2, 1, (30, 52), 12, 128)}
TINY = {"B1-N48-tiny": (1, 2, (4, 6), 4, 32)}


def make_inputs(B, frames, grid, H, D, dtype, device, seed=0):
    """``q, k, v [B, N, H, D]`` (N = frames * h * w), positions ``[B, N, 3]``, a jittered
    table, and the incoming gradient ``dO``."""
    g = torch.Generator().manual_seed(seed)
    pos = token_positions(torch.arange(frames), *grid, batch_size=B)
    N = pos.shape[1]
    q, k, v, do = (torch.randn(B, N, H, D, generator=g).to(device, dtype) for _ in range(4))
    table = lk.rope_frequencies(D, H, jitter_sigma=0.8)
    return q, k, v, pos.to(device).contiguous(), table, do


def rotate_with_autograd(x, fac):
    """``x [B, N, H, D]`` rotated by complex factors ``fac [B, N, H, D/2]`` (autograd on)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * fac).flatten(-2).to(x.dtype)


def steps(q, k, v, pos, table, do, *, causal, backend, split=False):
    """The two training steps being compared, as closures returning ``(dq, dk, dv)``; with
    ``split`` also their forwards alone (``*_fwd``, autograd recording on)."""
    ang = rope_angles(pos, table).float()  # [B, N, H, D/2], once (a model caches it)
    fac = torch.polar(torch.ones_like(ang), ang)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    dot = do.transpose(1, 2)

    def rotate_sdpa():
        qr = rotate_with_autograd(xs[0], fac).transpose(1, 2)
        kr = rotate_with_autograd(xs[1], fac).transpose(1, 2)
        out = F.scaled_dot_product_attention(qr, kr, xs[2].transpose(1, 2), is_causal=causal)
        return torch.autograd.grad(out, xs, dot)

    def rope_attention():
        out = lk.rope_attention(*xs, pos, pos, table, causal=causal, backend=backend)
        return torch.autograd.grad(out, xs, do)

    fns = {"rotate_sdpa": rotate_sdpa, "rope_attention": rope_attention}
    if split:
        fns["rotate_sdpa_fwd"] = lambda: F.scaled_dot_product_attention(
            rotate_with_autograd(xs[0], fac).transpose(1, 2),
            rotate_with_autograd(xs[1], fac).transpose(1, 2), xs[2].transpose(1, 2),
            is_causal=causal)
        fns["rope_attention_fwd"] = lambda: lk.rope_attention(*xs, pos, pos, table,
                                                              causal=causal, backend=backend)
    return fns


def cases(spec, *, dtype=torch.float32, device="cpu", backend="torch", causal=False,
          split=False):
    """The timed calls of shape ``spec`` (a :data:`SHAPES` value), ``{method: zero-argument
    callable}``: :func:`steps` on :func:`make_inputs`."""
    B, frames, grid, H, D = spec
    q, k, v, pos, table, do = make_inputs(B, frames, grid, H, D, dtype, device)
    return steps(q, k, v, pos, table, do, causal=causal, backend=backend, split=split)


def baseline(method):
    """The method that ``method`` is compared with: the rotate + SDPA step or forward."""
    return "rotate_sdpa_fwd" if method.endswith("_fwd") else "rotate_sdpa"


def comparable(method, result):
    """``method``'s result as a tuple of tensors laid out alike in every method: the gradients
    ``(dq, dk, dv)`` of a step, or the output ``[B, H, N, D]`` of a forward."""
    if isinstance(result, torch.Tensor):
        result = (result.transpose(1, 2) if method == "rope_attention_fwd" else result,)
    return tuple(t.detach() for t in result)


def max_rel_diff(got, ref):
    """Largest ``max |a - b| / max |b|`` over the paired tensors of two comparable results."""
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
               for a, b in zip(got, ref))


def run_shape(name, spec, *, dtype, device, backend, causal, repeats, warmup, split=False):
    B, frames, grid, H, D = spec
    fns = cases(spec, dtype=dtype, device=device, backend=backend, causal=causal, split=split)
    ref = fns["rotate_sdpa"]()
    diff = max_rel_diff(fns["rope_attention"](), ref)
    stats = bench_interleaved(fns, warmup=warmup, repeats=repeats)
    N = frames * grid[0] * grid[1]
    # fwd 2 matmuls + bwd 5 matmuls of N x N x D per head (causal: about half of them)
    flops = 2 * B * H * N * N * D * (0.5 if causal else 1.0)
    return [{"shape": name, "B": B, "N": N, "H": H, "D": D, "dtype": str(dtype)[6:],
             "device": device, "backend": backend if m.startswith("rope_attention") else "sdpa",
             "causal": causal, "method": m, **r,
             "gflops": (2 if m.endswith("_fwd") else 7) * flops / r["median_s"] / 1e9,
             "ratio": r["median_s"] / stats[baseline(m)]["median_s"],
             "ratio_of_minima": r["min_s"] / stats[baseline(m)]["min_s"],
             "max_rel_grad_diff": diff}
            for m, r in stats.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--causal", action="store_true", help="also time causal attention")
    ap.add_argument("--split", action="store_true", help="also time the forwards alone")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (smoke test)")
    ap.add_argument("--cuda", action="store_true",
                    help="also time the Triton backend in bf16 on CUDA (skipped without one)")
    args = ap.parse_args(argv)
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in args.shapes}
    repeats, warmup = (2, 1) if args.tiny else (args.repeats, args.warmup)
    runs = [(torch.float32, "cpu", "torch", c) for c in ([False, True] if args.causal
                                                          else [False])]
    if args.cuda:
        if torch.cuda.is_available():
            runs.append((torch.bfloat16, "cuda", "triton", False))
        else:
            print("--cuda: no CUDA device here, the Triton rows are skipped")
    rows = []
    for name, spec in shapes.items():
        for dtype, device, backend, causal in runs:
            rows += run_shape(name, spec, dtype=dtype, device=device, backend=backend,
                              causal=causal, repeats=repeats, warmup=warmup,
                              split=args.split)
    cols = ["shape", "device", "dtype", "causal", "method", "median_s", "min_s", "gflops",
            "ratio", "ratio_of_minima", "max_rel_grad_diff"]
    table_md = markdown_table(rows, cols)
    path = write_results(args.out, "rope_attention_train",
                         {"repeats": repeats, "threads": torch.get_num_threads(), "rows": rows},
                         table_md)
    print(f"{table_md}\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
