"""paged_attention and rope_attention make no host sync (the counter of
tests/support/host_syncs.py), so a block step can be compiled whole and captured as a CUDA
graph: from the public call to the CPU path's body, and on the Triton backend through the
launcher to the kernel.

Value checks run when asked (``validate=True`` or ``LOL_VALIDATE=1``): they still refuse bad
data, cost syncs only when on, and the Triton launcher checks caller-provided buffers.
"""

import pytest
import torch

import lol_kernels as lk
from tests.support.host_syncs import (
    D,
    check_validation_refuses,
    count_syncs,
    no_host_sync_tests,
    paged_case,
    triton_here,
)

OPS = ["paged_attention", "rope_attention"]

test_op_makes_no_host_sync_torch_backend, test_op_makes_no_host_sync_triton_backend = \
    no_host_sync_tests(OPS)


# ------------------------------------------------------------------------------ validation mode
def bad_page(x, moc):
    x["page_table"][0, 0] = x["cache_k"].shape[0] + 5


BAD = {  # name -> (edit of the paged inputs, op, the argument the error names)
    "page-id": (bad_page, "paged_attention", "page_table holds page ids"),
    "page-twice": (lambda x, moc: x["page_table"][1].fill_(int(x["page_table"][1, 0])),
                   "paged_attention", r"page_table\[1\] lists a page twice"),
    "position": (lambda x, moc: x["q_pos"].__setitem__((0, 0, 0), 2**31 - 1), "paged_attention",
                 "q_pos must hold positions"),
}


@pytest.mark.parametrize("how", ["validate=True", "LOL_VALIDATE=1"])
@pytest.mark.parametrize("case", list(BAD))
def test_validation_mode_still_refuses_bad_data(case, how, monkeypatch):
    check_validation_refuses(*BAD[case], how, monkeypatch)


def test_validation_is_off_by_default_and_costs_syncs_when_on(monkeypatch):
    monkeypatch.delenv("LOL_VALIDATE", raising=False)
    x, _ = paged_case()
    lk.paged_attention(**x, backend="torch")
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", enter_ops=False)
    assert c.total == 0
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", validate=True, enter_ops=False)
    assert 0 < c.total <= 6, dict(c.events)  # one sync per checked range
    monkeypatch.setenv("LOL_VALIDATE", "0")
    _, c = count_syncs(lk.paged_attention, **x, backend="torch", enter_ops=False)
    assert c.total == 0
    with pytest.raises(TypeError, match="validate must be a bool"):
        lk.paged_attention(**x, backend="torch", validate="yes")


# ------------------------------------------------------------------------------ caller buffers
@pytest.mark.skipif(not triton_here(), reason="needs Triton (interpreter on a CPU machine)")
@pytest.mark.parametrize(("name", "make", "exc", "needle"), [
    ("out", lambda q: torch.empty(q.shape[:-1] + (8,)), ValueError, "out must have shape"),
    ("out", lambda q: torch.empty(q.shape, dtype=torch.float16), TypeError, "out must have dtype"),
    ("out", lambda q: torch.empty(*q.shape[:-1], 2 * q.shape[-1])[..., ::2], ValueError,
     "unit stride"),
    ("lse", lambda q: torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float64),
     TypeError, "lse must have dtype"),
    ("lse", lambda q: torch.empty(q.shape[0], q.shape[1], q.shape[2]), ValueError,
     "lse must have shape"),
    ("out", lambda q: q.shape, TypeError, "out must be a torch.Tensor"),
])
def test_caller_buffers_are_checked(name, make, exc, needle):
    from lol_kernels.attention.attention_triton import paged_attention_triton

    x, _ = paged_case()
    x.pop("table")
    table = lk.rope_frequencies(D, 4, jitter_sigma=0.5)
    with pytest.raises(exc, match=needle):
        paged_attention_triton(*list(x.values())[:7], table, k_new=x["k_new"],
                               v_new=x["v_new"], **{name: make(x["q"])})
