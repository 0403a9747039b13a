"""apply_rope on hostile-but-realistic input: every empty dimension on every backend gives the
right empty result (each case in a forked child, so a regression that kills the process fails
one case instead of the session), and autograd through it says "forward-only"."""

import pytest
import torch

from tests.support.reliability import check_every_empty_dimension, empty_cases, grad_inputs


@pytest.mark.parametrize(("op", "dim", "backend"), empty_cases("apply_rope"))
def test_every_empty_dimension(op, dim, backend):
    check_every_empty_dimension(op, dim, backend)


@pytest.mark.parametrize("op", ["apply_rope"])
@pytest.mark.parametrize("how", ["backward", "torch.func.grad", "torch.func.vjp"])
def test_autograd_says_forward_only(op, how):
    fn, x = grad_inputs(op)
    with pytest.raises(RuntimeError, match=f"lol::{op} is forward-only"):
        if how == "backward":
            fn(x.requires_grad_()).backward()
        elif how == "torch.func.grad":
            torch.func.grad(fn)(x)
        else:
            torch.func.vjp(fn, x)
