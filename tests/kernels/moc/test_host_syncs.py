"""moc_attention and moc_route_tiles make no host sync (the counter of
tests/support/host_syncs.py), so a block step can be compiled whole and captured as a CUDA
graph: from the public call to the CPU path's body, and on the Triton backend through the
launcher to the kernel. Value checks run when asked (``validate=True`` or ``LOL_VALIDATE=1``)
and still refuse bad routing and shared chunk pages."""

import pytest

from tests.support.host_syncs import check_validation_refuses, no_host_sync_tests

OPS = ["moc_attention", "moc_route_tiles"]

test_op_makes_no_host_sync_torch_backend, test_op_makes_no_host_sync_triton_backend = \
    no_host_sync_tests(OPS)


BAD = {  # name -> (edit of the paged and MoC inputs, op, the argument the error names)
    "routed-range": (lambda x, moc: moc["routed"].__setitem__((0, 0, 0, 0), 7),
                     "moc_attention", "routed holds chunk ids"),
    "chunk-shared": (lambda x, moc: moc["chunk_pages"].__setitem__((0, 0, 0),
                                                                    x["page_table"][0, 0]),
                     "moc_attention", "disjoint"),
}


@pytest.mark.parametrize("how", ["validate=True", "LOL_VALIDATE=1"])
@pytest.mark.parametrize("case", list(BAD))
def test_validation_mode_still_refuses_bad_data(case, how, monkeypatch):
    check_validation_refuses(*BAD[case], how, monkeypatch)
