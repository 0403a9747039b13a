"""moc_attention and the MoC router on hostile-but-realistic input:

* every empty dimension of ``moc_attention``, ``moc_route``, ``moc_route_tiles`` and
  ``tile_means`` on every backend reachable on the CPU gives the right empty result or a
  ``ValueError`` naming the argument (each case in a forked child, so a regression that kills
  the process fails one case instead of the session);
* positions the kernels cannot represent in int32 are refused;
* silently accepted input (bad ``scale``, a page listed twice) is refused;
* autograd: ``backward`` gives q a finite gradient, torch.func transforms are refused by name
  (the gradients themselves: test_moc_attention_grad.py).
"""

import pytest

from tests.support.reliability import (
    BAD_POSITIONS,
    BAD_SCALES,
    check_autograd_with_backward,
    check_every_empty_dimension,
    check_refuses_bad_position,
    check_refuses_bad_scale,
    check_refuses_page_listed_twice,
    dup_chunk_page,
    dup_entry,
    empty_cases,
)


@pytest.mark.parametrize(("op", "dim", "backend"),
                         empty_cases("moc_attention", "moc_route", "moc_route_tiles",
                                     "tile_means"))
def test_every_empty_dimension(op, dim, backend):
    check_every_empty_dimension(op, dim, backend)


@pytest.mark.parametrize(("op", "case"), [("moc_attention", case) for case in BAD_POSITIONS])
def test_ops_refuse_positions_the_kernels_cannot_represent(op, case):
    check_refuses_bad_position(op, case)


@pytest.mark.parametrize("op", ["moc_attention"])
@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
def test_ops_refuse_bad_scale(op, scale):
    check_refuses_bad_scale(op, scale)


@pytest.mark.parametrize(("op", "name", "edit"), [
    ("moc_attention", "page_table", dup_entry),
    ("moc_attention", "chunk_pages", dup_chunk_page),
])
def test_ops_refuse_a_page_listed_twice(op, name, edit):
    check_refuses_page_listed_twice(op, name, edit)


@pytest.mark.parametrize("op", ["moc_attention"])
@pytest.mark.parametrize("how", ["backward", "torch.func.grad", "torch.func.vjp"])
def test_autograd_of_ops_with_a_backward(op, how):
    check_autograd_with_backward(op, how)
