"""``lol``: the command line. The top layer of ``lol_model``; nothing in the library imports it.

Examples::

    lol generate                                   # tiny random model, ~1 min on a CPU
    lol generate --prompt "a cat[10s] | a dog[20s#]" --cache relativistic --jitter-sigma 0.8
    lol generate --resume --out hour.mp4           # continue from hour.mp4.ckpt/
    lol diagnose --jitter-sigma 0.8                # predicted sink-collapse indices + plots
    lol bench --quick                              # run benchmarks/, write a report

The commands are a static table (:data:`COMMANDS`): ``lol --help`` lists them without importing
any, and a run imports only the module of the command it runs, which adds that command's
options with its ``add_parser(subparsers)``. This module imports no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import GenerationError, Interrupted

# name -> (module, its add-parser function, one-line help)
COMMANDS = {
    "generate": ("lol_model.cli.generate", "add_parser", "stream a video block by block"),
    "diagnose": ("lol_kernels.diagnostics.cli", "add_diagnose_parser",
                 "predict and measure RoPE sink-collapse"),
    "bench": ("lol_model.cli.bench", "add_parser", "run the benchmark scripts and write a report"),
}


class Parser(argparse.ArgumentParser):
    """One-line errors: ``lol: error: argument --shift: ...`` and exit 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"lol: error: {message}\n")


def chosen_command(argv: list[str]) -> str | None:
    """The command ``argv`` runs (its first word that is not an option), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _unavailable(name: str, module: str, err: Exception):
    def run(args):
        raise SystemExit(f"lol {name} is unavailable: {module} could not be imported ({err})")
    return run


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``lol`` parser for ``argv``: every command listed, the options of the one ``argv``
    runs (all of them when ``argv`` is ``None``)."""
    parser = Parser(prog="lol", description="LoL streaming video kernels and generator")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    chosen = None if argv is None else chosen_command(argv)
    for name, (module, fn, help_text) in COMMANDS.items():
        if argv is not None and name != chosen:  # listed only: its module stays unimported
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            getattr(importlib.import_module(module), fn)(sub)
        except (ImportError, AttributeError) as e:
            # a stub that accepts any arguments ("-" is no option prefix here) and explains
            p = sub.add_parser(name, help=f"(unavailable: {e})", add_help=False,
                               prefix_chars="+")
            p.set_defaults(func=_unavailable(name, module, e))
            p.add_argument("rest", nargs="*")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lol``; a user-facing failure prints one ``lol: error: ...`` line: exit 2 for bad
    options and files (checked before any work), 1 when a run stops (non-finite latents, a
    failed output segment, a failed rank); Ctrl-C prints ``lol: interrupted ...`` (what was
    kept), exit 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a command's module may import torch (seconds): a Ctrl-C there is an interrupt too
        args = build_parser(argv).parse_args(argv)
        rc = args.func(args)
    except Interrupted as e:
        print(f"lol: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lol: interrupted", file=sys.stderr)
        return 130
    except GenerationError as e:
        print(f"lol: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"lol: error: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0
