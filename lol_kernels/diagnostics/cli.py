"""``lol diagnose``: predict sink-collapse from a RoPE configuration, measure it on latents.

Wiring: ``lol_model.cli`` (its ``COMMANDS`` table) calls :func:`add_diagnose_parser` on its
subparsers and dispatches to :func:`run_diagnose`; ``python -m lol_kernels.diagnostics [diagnose] ...`` runs it alone.

Outputs (under ``--out``): ``summary.json``, ``coherence.png`` (coherence with and without
jitter), ``synchronization.png`` (synchronized distances per sigma) and, with ``--latents``,
``l2_to_sink.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from .._checks import SEED_RANGE
from ..rope.table import rope_frequencies
from .coherence import (
    axis_frequencies,
    count_runs,
    head_fraction_above,
    phase_coherence,
    predict_collapse,
    synchronized_events,
)
from .stream import nonfinite_frames, stream_metrics

_PRINT_MAX = 24  # predicted indices printed per line (the JSON has them all)


def _floats(text: str) -> list[float]:
    try:
        xs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not all(math.isfinite(x) for x in xs):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return xs


def _finite(text: str) -> float:
    """argparse type: one finite float (``inf``, ``nan`` and ``1e999`` are refused)."""
    xs = _floats(text)
    if len(xs) != 1:
        raise argparse.ArgumentTypeError(f"expected one number, got {text!r}")
    return xs[0]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from e


#: (flag, type, default, help) of the analysis options, one row each
_ANALYSIS_OPTIONS = (
    ("--min-delta", int, 100, "analyse distances min_delta < Delta <= max_delta (default 100)"),
    ("--max-delta", int, 172800, "largest distance (default 172800 = 12 h of latent frames)"),
    ("--threshold", _finite, 0.55,
     "head-averaged coherence a predicted collapse must exceed (0.55)"),
    ("--sync-threshold", _finite, 0.5, "per-head coherence level of a synchronized event (0.5)"),
    ("--min-fraction", _finite, 1.0,
     "fraction of heads above --sync-threshold at once (default 1.0 = all)"),
    ("--zoom", int, 400, "upper distance of the zoomed coherence plot (default 400)"),
)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RoPE configuration")
    g.add_argument("--head-dim", type=int, default=128, help="head dim D (default 128, Wan)")
    g.add_argument("--heads", type=int, default=12, help="attention heads H (default 12)")
    g.add_argument("--theta", type=_finite, default=10000.0, help="RoPE base (default 10000)")
    g.add_argument("--jitter-sigma", type=_finite, default=0.8,
                   help="sigma of the 'with jitter' curves (default 0.8, LoL's best)")
    g.add_argument("--seed", type=int, default=0, help="jitter draw seed (default 0)")
    g.add_argument("--axis", type=int, default=0, help="position axis to analyse (0 = time)")
    g = p.add_argument_group("analysis")
    g.add_argument("--sigmas", type=_floats, default=[0.0, 0.1, 0.5, 0.8, 0.9],
                   help="jitter sweep, comma-separated (default 0,0.1,0.5,0.8,0.9)")
    for flag, typ, default, text in _ANALYSIS_OPTIONS:
        g.add_argument(flag, type=typ, default=default, help=text)
    g = p.add_argument_group("latent stream")
    g.add_argument("--latents", type=Path, default=None,
                   help="latent frames [F, Cz, H, W] (.pt or .safetensors) to measure")
    g.add_argument("--sink-frames", type=_ints, default=[0, 1, 2],
                   help="sink frame indices, comma-separated (default 0,1,2)")
    g.add_argument("--out", type=Path, default=Path("results/diagnose"),
                   help="output folder for PNG plots and summary.json (default results/diagnose)")


def add_diagnose_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``diagnose`` on an ``argparse`` subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "diagnose", help="predict and measure RoPE sink-collapse",
        description="Predict sink-collapse distances from RoPE phase coherence, count "
                    "multi-head synchronized events over a jitter sweep, and (with --latents) "
                    "measure L2-to-sink collapses on a latent stream.")
    _add_arguments(p)
    p.set_defaults(func=run_diagnose)
    return p


def load_latents(path: Path) -> torch.Tensor:
    """Read ``[F, Cz, H, W]`` latents from ``.pt`` / ``.safetensors`` (a tensor or a dict).

    A dict must hold one tensor or a ``"latents"`` key; a leading batch axis of size 1 is
    dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--latents {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        elif path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"--latents must be a .pt or .safetensors file, got {path}")
    except ValueError:
        raise
    except Exception as e:  # safetensors / pickle raise their own types for corrupt files
        first = (str(e).strip().splitlines() or [""])[0][:200]  # one-line error
        raise ValueError(f"--latents {path} cannot be read (truncated or corrupt?): "
                         f"{type(e).__name__}: {first}") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "latents" in tensors:
            obj = tensors["latents"]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; expected one tensor or "
                             "a 'latents' key")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} does not hold a tensor")
    if obj.dim() == 5 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() != 4:
        raise ValueError(f"latents in {path} must have shape [F, Cz, H, W], got {list(obj.shape)}")
    bad = nonfinite_frames(obj) if obj.is_floating_point() else []
    if bad:
        raise ValueError(f"--latents {path}: NaN or inf in {len(bad)} of {obj.shape[0]} frames "
                         f"(first: {bad[:8]}); a broken stream, not a measurable one")
    return obj


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(args) -> None:
    """``ValueError`` naming ``--min-delta`` / ``--max-delta`` when the analysed range is empty
    or cannot fit in memory: the coherence of every head over every distance is held at once,
    ``[H, N]`` float64, plus per-distance curves and the RoPE tables of every sigma, ``[H, D/2]``
    float64, with their work blocks (an estimate, refused before any work)."""
    if args.min_delta < 0 or args.max_delta <= args.min_delta:
        raise ValueError(f"--min-delta {args.min_delta} and --max-delta {args.max_delta}: need "
                         f"0 <= --min-delta < --max-delta")
    n = args.max_delta - args.min_delta
    sigmas = len({0.0, *args.sigmas, args.jitter_sigma})
    need = 8 * n * (2 * max(args.heads, 1) + sigmas + 4) + \
        16 * args.heads * args.head_dim * (sigmas + 2)
    have = available_memory()
    if need > have:
        raise ValueError(f"--max-delta {args.max_delta} (with --min-delta {args.min_delta}, "
                         f"--heads {args.heads}, --head-dim {args.head_dim}) needs about "
                         f"{need / 2**30:.1f} GiB; {have / 2**30:.1f} GiB is available: lower "
                         f"--max-delta, --heads or --head-dim")




def check_args(args) -> None:
    """``ValueError`` naming the option of the first bad value, before any work: the ranges
    the analysis accepts (``rope_frequencies``, the thresholds), then :func:`check_memory`."""
    def need(ok: bool, option: str, value, rule: str) -> None:
        if not ok:
            raise ValueError(f"{option} {value}: {rule}")

    need(args.heads >= 1, "--heads", args.heads, "must be an int >= 1")
    need(args.head_dim >= 6 and args.head_dim % 2 == 0, "--head-dim", args.head_dim,
         "must be an even int >= 6 (Wan's 3D RoPE gives the t, h and w axes a channel pair "
         "each)")
    need(args.theta > 1, "--theta", args.theta, "must be > 1")
    need(0 <= args.jitter_sigma < 1, "--jitter-sigma", args.jitter_sigma, "must be in [0, 1)")
    need(bool(args.sigmas) and all(0 <= x < 1 for x in args.sigmas), "--sigmas",
         ",".join(f"{x:g}" for x in args.sigmas), "must be one or more numbers in [0, 1)")
    need(SEED_RANGE[0] <= args.seed <= SEED_RANGE[1], "--seed", args.seed,
         f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    need(0 <= args.axis <= 2, "--axis", args.axis, "must be 0 (time), 1 (height) or 2 (width)")
    for option, value in (("--threshold", args.threshold),
                          ("--sync-threshold", args.sync_threshold)):
        need(0 <= value <= 1, option, value, "must be a coherence in [0, 1]")
    need(0 < args.min_fraction <= 1, "--min-fraction", args.min_fraction, "must be in (0, 1]")
    need(args.zoom >= 1, "--zoom", args.zoom, "must be an int >= 1")
    sinks = args.sink_frames
    need(bool(sinks) and min(sinks) >= 0 and len(set(sinks)) == len(sinks), "--sink-frames",
         ",".join(map(str, sinks)), "must be distinct frame indices >= 0")
    check_memory(args)


def make_out_folder(out: Path) -> None:
    """Create the ``--out`` folder (and its parents); ``ValueError`` naming it if impossible."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")


def check_latents(lat: torch.Tensor, args) -> None:
    """``ValueError`` naming ``--latents`` / ``--sink-frames`` unless the ``[F, Cz, H, W]``
    stream ``lat`` has 2 frames or more and holds every sink frame."""
    F = lat.shape[0]
    if F < 2:
        raise ValueError(f"--latents {args.latents}: holds {F} frame(s); at least 2 are needed")
    if max(args.sink_frames) >= F:
        raise ValueError(f"--sink-frames {','.join(map(str, args.sink_frames))}: --latents "
                         f"{args.latents} has frames 0..{F - 1}")


def _fmt_list(xs: list[int]) -> str:
    head = ", ".join(str(x) for x in xs[:_PRINT_MAX])
    more = f", ... ({len(xs)} in all)" if len(xs) > _PRINT_MAX else ""
    return f"[{head}{more}]"


def _binned_max(y: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin max of a long curve (indices of the bin maxima, values) so peaks stay visible."""
    n = y.numel()
    size = max(1, math.ceil(n / bins))
    pad = (-n) % size
    yy = torch.cat([y, y.new_full((pad,), -math.inf)]).view(-1, size)
    val, arg = yy.max(dim=1)
    return arg + torch.arange(yy.shape[0]) * size, val


def _figure(rows: int, cols: int = 1, size=(10, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0], size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _plot_coherence(path: Path, args, tables: dict, preds0: list[int]) -> None:
    fig, ax = _figure(2)
    zoom = max(args.min_delta + 2, min(args.zoom, args.max_delta))
    dz = torch.arange(0, zoom + 1)
    a = ax[0][0]
    c0 = phase_coherence(tables[0.0], dz, args.axis)
    cj = phase_coherence(tables[args.jitter_sigma], dz, args.axis)
    for h in range(cj.shape[0]):
        a.plot(dz, cj[h], color="tab:orange", lw=0.5, alpha=0.3)
    a.plot(dz, c0.mean(0), color="black", lw=1.2, label="sigma = 0 (all heads identical)")
    a.plot(dz, cj.mean(0), color="tab:red", lw=1.2,
           label=f"sigma = {args.jitter_sigma:g}: head mean (thin: single heads)")
    a.axhline(args.threshold, color="gray", ls="--", lw=0.8, label=f"threshold {args.threshold:g}")
    for d in preds0:
        if d <= zoom:
            a.axvline(d, color="tab:blue", lw=0.6, alpha=0.6)
            a.annotate(str(d), (d, 1.0), ha="center", va="top", fontsize=8, color="tab:blue")
    a.set(xlim=(0, zoom), ylim=(0, 1.02), xlabel="distance to sink Delta (latent frames)",
          ylabel="phase coherence C(Delta)",
          title=f"RoPE phase coherence, axis {args.axis} (blue: predicted collapses at sigma 0)")
    a.legend(loc="upper right", fontsize=8)
    a = ax[1][0]
    d = torch.arange(args.min_delta + 1, args.max_delta + 1)
    for sg, col in ((0.0, "black"), (args.jitter_sigma, "tab:red")):
        x, y = _binned_max(phase_coherence(tables[sg], d, args.axis).mean(0), 1500)
        a.plot(d[x], y, color=col, lw=0.8, label=f"sigma = {sg:g}")
    a.axhline(args.threshold, color="gray", ls="--", lw=0.8)
    a.set(xscale="log", xlabel="Delta (latent frames, log scale)",
          ylabel="head-mean coherence (bin max)",
          title=f"Full range ({args.min_delta}, {args.max_delta}]")
    a.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_sync(path: Path, args, sync: list[dict], fracs: dict) -> None:
    fig, ax = _figure(1, 2, size=(12, 4))
    a = ax[0][0]
    labels = [f"{r['sigma']:g}" for r in sync]
    counts = [r["distances"] for r in sync]
    bars = a.bar(labels, counts, color="tab:purple")
    for b, r in zip(bars, sync, strict=True):
        a.annotate(f"{r['distances']} ({r['runs']} peaks)", (b.get_x() + b.get_width() / 2,
                   b.get_height()), ha="center", va="bottom", fontsize=8)
    a.set(xlabel="jitter sigma", ylabel="synchronized distances",
          title=f">= {args.min_fraction:.0%} of heads with C > {args.sync_threshold:g}, "
                f"Delta in ({args.min_delta}, {args.max_delta}]")
    a = ax[0][1]
    d = torch.arange(args.min_delta + 1, args.max_delta + 1)
    for sg, f in fracs.items():
        x, y = _binned_max(f, 600)
        a.plot(d[x], y, lw=0.8, label=f"sigma = {sg:g}")
    a.axhline(args.min_fraction, color="gray", ls="--", lw=0.8)
    a.set(xscale="log", ylim=(0, 1.05), xlabel="Delta (latent frames, log scale)",
          ylabel=f"fraction of heads with C > {args.sync_threshold:g} (bin max)",
          title="Multi-head synchronization")
    a.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_stream(path: Path, m, sinks: list[int]) -> None:
    fig, ax = _figure(2)
    f = torch.arange(m.distance.numel())
    a = ax[0][0]
    a.plot(f, m.distance, lw=1.0, label="normalized L2 to nearest sink")
    a.plot(f, m.baseline, lw=0.8, ls="--", color="gray", label="trailing baseline (median)")
    for e in m.events:
        a.axvline(e, color="tab:red", lw=0.8, alpha=0.7)
    a.set(xlabel="latent frame", ylabel="distance d_f",
          title=f"L2 to sink frames {sinks}; red: collapse events {m.events[:12]}")
    a.legend(fontsize=8)
    a = ax[1][0]
    a.plot(f, m.score, lw=1.0, color="tab:red")
    a.set(xlabel="latent frame", ylabel="collapse intensity s_f", ylim=(-0.02, 1.02),
          title=f"collapse score: max {m.score_max:.3f}, mean {m.score_mean:.3f}")
    fig.savefig(path, dpi=110)


def run_diagnose(args) -> dict:
    """Run the analysis for parsed ``args``; prints a report, writes plots and ``summary.json``.

    Returns the summary dict (also written to ``args.out / "summary.json"``).
    """
    check_args(args)  # refuse bad input before any work
    lat = load_latents(args.latents) if args.latents is not None else None
    if lat is not None:
        check_latents(lat, args)
    out = Path(args.out)
    make_out_folder(out)  # the last check: an empty folder is all a refusal may leave
    sigmas = list(dict.fromkeys([0.0, *args.sigmas, args.jitter_sigma]))
    tables = {sg: rope_frequencies(args.head_dim, args.heads, theta=args.theta,
                                   jitter_sigma=sg, jitter_axes=(args.axis,), seed=args.seed)
              for sg in sigmas}
    t0 = tables[0.0]
    K = axis_frequencies(t0, args.axis).shape[1]
    rng = f"({args.min_delta}, {args.max_delta}]"
    print(f"RoPE: head_dim {args.head_dim}, {args.heads} heads, theta {args.theta:g}, axes "
          f"{t0.axes}; axis {args.axis} has K = {K} pairs; jitter seed {args.seed}")
    preds = {sg: predict_collapse(tables[sg], threshold=args.threshold, min_delta=args.min_delta,
                                  max_delta=args.max_delta, axis=args.axis) for sg in sigmas}
    print(f"\nPredicted collapse distances (head-mean coherence peaks > {args.threshold:g}, "
          f"Delta in {rng}):")
    for sg in sigmas:
        print(f"  sigma {sg:<4g}: {_fmt_list(preds[sg])}")

    d = torch.arange(args.min_delta + 1, args.max_delta + 1)
    sync, fracs = [], {}
    for sg in args.sigmas:
        ev = synchronized_events(tables[sg], threshold=args.sync_threshold,
                                 min_fraction=args.min_fraction, min_delta=args.min_delta,
                                 max_delta=args.max_delta, axis=args.axis)
        fracs[sg] = head_fraction_above(tables[sg], d, threshold=args.sync_threshold,
                                        axis=args.axis)
        sync.append({"sigma": sg, "distances": int(ev.numel()), "runs": count_runs(ev),
                     "first": [int(x) for x in ev[:10]],
                     "distances_half_heads": int((fracs[sg] >= 0.5).sum()),
                     "max_head_fraction": float(fracs[sg].max()) if d.numel() else 0.0})
    print(f"\nSynchronized events: >= {args.min_fraction:.0%} of heads with C_h > "
          f"{args.sync_threshold:g} at once, Delta in {rng}")
    print(f"  {'sigma':>6} | {'distances':>9} | {'peaks':>5} | {'max frac heads':>14} | "
          f"{'>= half heads':>13} | first")
    for r in sync:
        print(f"  {r['sigma']:>6g} | {r['distances']:>9d} | {r['runs']:>5d} | "
              f"{r['max_head_fraction']:>14.3f} | {r['distances_half_heads']:>13d} | "
              f"{r['first'][:5]}")

    plots = {"coherence": out / "coherence.png", "synchronization": out / "synchronization.png"}
    _plot_coherence(plots["coherence"], args, tables, preds[0.0])
    _plot_sync(plots["synchronization"], args, sync, fracs)

    stream = None
    if args.latents is not None:
        m = stream_metrics(lat, args.sink_frames)
        plots["l2_to_sink"] = out / "l2_to_sink.png"
        _plot_stream(plots["l2_to_sink"], m, args.sink_frames)
        stream = {"file": str(args.latents), "shape": list(lat.shape),
                  "sink_frames": args.sink_frames, **m.to_dict()}
        print(f"\nLatent stream {args.latents} {list(lat.shape)}: collapse events "
              f"{_fmt_list(m.events)}; score max {m.score_max:.3f}, mean {m.score_mean:.3f}")

    summary = {
        "config": {"head_dim": args.head_dim, "heads": args.heads, "theta": args.theta,
                   "axes": list(t0.axes), "axis": args.axis, "pairs": K, "seed": args.seed,
                   "jitter_sigma": args.jitter_sigma, "sigmas": args.sigmas,
                   "min_delta": args.min_delta, "max_delta": args.max_delta,
                   "threshold": args.threshold, "sync_threshold": args.sync_threshold,
                   "min_fraction": args.min_fraction},
        "predicted_collapse": {f"{sg:g}": preds[sg] for sg in sigmas},
        "synchronized_events": sync,
        "stream": stream,
        "plots": {k: str(v) for k, v in plots.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nWrote {', '.join(str(p) for p in plots.values())}, {out / 'summary.json'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m lol_kernels.diagnostics``)."""
    p = argparse.ArgumentParser(prog="python -m lol_kernels.diagnostics",
                                description="lol diagnose: RoPE sink-collapse analysis")
    _add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lol_kernels.diagnostics [diagnose] [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diagnose"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        run_diagnose(args)
    except (ValueError, OSError) as e:
        print(f"lol diagnose: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lol diagnose: interrupted", file=sys.stderr)
        return 130
    return 0
