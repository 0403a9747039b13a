"""The GPU-only branch of apply_rope, run whenever a CUDA GPU is present (skipped elsewhere):
the MUFU fast trig (``FAST_TRIG``; the interpreter takes the portable polynomials) at
positions up to 2^30, against the float64 reference."""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the fast-trig branch needs one (the interpreter covers the rest)")

import lol_kernels as lk  # noqa: E402
from lol_kernels.rope import apply_rope_torch  # noqa: E402
from lol_kernels.rope.reference import apply_rope_reference  # noqa: E402
from tests.support import assert_close_rule  # noqa: E402

BF16 = torch.bfloat16


@pytest.mark.parametrize("base", [0, 2**24, 2**30 - 512], ids=["t0", "t2^24", "t2^30"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_fast_trig_apply_rope_large_positions(dtype, base):
    """MUFU sin/cos after the exact fixed-point reduction: as accurate as the float64
    reference at any position the kernels accept (docs/design.md §5 rule)."""
    table = lk.rope_frequencies(128, 4, jitter_sigma=0.8, seed=3)
    x = torch.randn(2, 300, 4, 128)
    pos = torch.randint(0, 40, (2, 300, 3))
    pos[..., 0] += base + torch.randint(0, 500, (2, 300))
    ref64 = apply_rope_reference(x.double(), pos, table)
    ref_lo = apply_rope_torch(x.to(dtype), pos, table)  # the CPU path in the same dtype
    out = lk.apply_rope(x.to(dtype).cuda(), pos.cuda(), table, backend="triton")
    assert_close_rule(out.cpu(), ref_lo, ref64, f"apply_rope at t ~ {base}")
