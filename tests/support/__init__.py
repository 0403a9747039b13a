"""Helpers shared by the tests: the repository root, the max error and the parity rule of
docs/design.md §5. Further modules of this package hold the inputs and checks that tests of
several folders share."""

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, with -inf == -inf counted as equal."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, 0.0, (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def assert_close_rule(out, ref_low, ref64, what="out", slack=1e-5):
    """docs/design.md §5: ``|out - ref64| <= 2 |ref_low - ref64| + 1e-5`` (max over elements)."""
    assert not torch.isnan(out).any(), f"{what} has NaN (unwritten or invalid)"
    e_out, e_ref = max_err(out, ref64), max_err(ref_low, ref64)
    assert e_out <= 2 * e_ref + slack, f"{what}: error {e_out:.3e} > 2 * {e_ref:.3e} + {slack}"
