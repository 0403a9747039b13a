"""Fixtures of every test: fresh random inputs, one torch thread, a fresh torch.compile state;
the Triton interpreter on a machine without CUDA. Helpers live in tests/support/."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on a CPU-only machine. The variable is read when
    # @triton.jit decorates, so it is set here, before any test module imports a kernel module
    # (an earlier module importing one would otherwise freeze it in GPU mode for the session).
    # The sm_90 compile test re-imports the kernels with it off (common.aot.compiled_module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the helpers' asserts report their operands, like the tests' own
pytest.register_assert_rewrite("tests.support")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh inputs, reproducible run to run: seeded by a stable hash (Python's
    ``hash`` of a string changes every process) of its node id as if its file sat at the top of
    tests/ (``tests/<file>::<test>``), so a test draws the same inputs whichever folder holds
    its file."""
    path, _, test = request.node.nodeid.partition("::")
    seed = zlib.crc32(f"tests/{os.path.basename(path)}::{test}".encode())
    torch.manual_seed(seed)
    yield


def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# tiny ops: threads only add overhead on a shared box (and ``lol generate`` uses one)
one_thread = pytest.fixture(_one_torch_thread)  # one test
one_thread_module = pytest.fixture(scope="module")(_one_torch_thread)  # a whole test file


@pytest.fixture
def fresh_dynamo(one_thread):
    """torch.compile's caches and counters reset before and after the test (one thread)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
