"""Shared test helpers: fresh random inputs, NaN poisoning, the parity rule of docs/design.md §5."""

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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh inputs, reproducible run to run (seeded by a stable hash of its
    node id; Python's ``hash`` of a string changes every process)."""
    seed = zlib.crc32(request.node.nodeid.encode())
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
