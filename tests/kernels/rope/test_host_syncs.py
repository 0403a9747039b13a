"""apply_rope makes no host sync (the counter of tests/support/host_syncs.py): from the public
call to the CPU path's body, and on the Triton backend through the launcher to the kernel, so
a block step can be compiled whole and captured as a CUDA graph."""

from tests.support.host_syncs import no_host_sync_tests

OPS = ["apply_rope"]

test_op_makes_no_host_sync_torch_backend, test_op_makes_no_host_sync_triton_backend = \
    no_host_sync_tests(OPS)
