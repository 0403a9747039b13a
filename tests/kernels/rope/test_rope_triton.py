"""The Triton ``apply_rope`` kernel (interpreter on a CPU-only machine; see
tests/kernels/attention/test_paged_attention_triton.py for why the variable is set here)
against the float64 reference, within the §5 rule of the torch path in the same dtype."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first @triton.jit decoration

import pytest

import lol_kernels as lk
from lol_kernels.rope import apply_rope_reference, apply_rope_torch
from lol_kernels.rope.rope_triton import apply_rope_triton
from tests.support import assert_close_rule

DEV = "cuda" if torch.cuda.is_available() else "cpu"
A = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_apply_rope_triton_parity(dtype):
    """Extra leading dim, a non-contiguous input, positions up to 2^24, jitter; NaN-poisoned
    output; error vs float64 within the §5 rule of the torch path in the same dtype."""
    table = lk.rope_frequencies(64, 4, jitter_sigma=0.8, seed=3)
    x = torch.randn(2, 3, 4, 21, 64).transpose(2, 3)  # [2, 3, N=21, H=4, D=64], strided
    pos = torch.randint(0, 2**24, (2, 3, 21, A))
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEV)
    y = apply_rope_triton(x.to(dtype).to(DEV), pos.to(DEV), table, out=out)
    assert y is out
    assert_close_rule(y.cpu(), apply_rope_torch(x.to(dtype), pos, table),
                      apply_rope_reference(x, pos, table), "apply_rope")
    xs = x.to(dtype).to(DEV)  # without `out`: contiguous, as the fake implementation says
    y2 = apply_rope_triton(xs, pos.to(DEV), table)
    assert y2.is_contiguous() and torch.equal(y2, y)


def test_apply_rope_public_triton_backend():
    table = lk.rope_frequencies(128, 2, jitter_sigma=0.3)
    x = torch.randn(1, 19, 2, 128).to(DEV)
    pos = torch.randint(0, 1000, (1, 19, A)).to(DEV)
    y = lk.apply_rope(x, pos, table, backend="triton")
    assert_close_rule(y.cpu(), apply_rope_torch(x.cpu(), pos.cpu(), table),
                      apply_rope_reference(x.cpu(), pos.cpu(), table), "apply_rope")
