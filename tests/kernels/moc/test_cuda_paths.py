"""The GPU-only branch of the MoC router, run whenever a CUDA GPU is present (skipped
elsewhere): the CUDA router (``csrc/moc/router_cuda.cu``) picks exactly what the C++ build and
the torch reference pick."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the CUDA router needs one (the C++ build covers the rest)")

import lol_kernels as lk  # noqa: E402
from lol_kernels.moc import moc_route_op as route  # noqa: E402
from lol_kernels.moc import moc_route_reference  # noqa: E402

BF16 = torch.bfloat16


ROUTE_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 9, 3, 257, 128, 33), (1, 37, 3, 63, 100, 8),
                (1, 2, 2, 20000, 64, 16), (2, 4, 12, 64, 1536, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=["fp32", "fp16",
                                                                            "bf16"])
@pytest.mark.parametrize("B,T,H,C,D,k", ROUTE_SHAPES,
                         ids=[f"B{s[0]}-T{s[1]}-H{s[2]}-C{s[3]}-D{s[4]}-k{s[5]}"
                              for s in ROUTE_SHAPES])
def test_cuda_router_equals_cpp_and_reference(B, T, H, C, D, k, dtype):
    """The CUDA router picks exactly what the C++ build and the torch reference pick (same
    fp32 operations in the same order), with masks, a causal limit and k > eligible."""
    if route.extension_error() is not None:
        if os.environ.get("LOL_NO_EXTENSION") == "1":
            pytest.skip("installed with LOL_NO_EXTENSION=1")
        pytest.fail(f"the router extension did not load: {route.extension_error()}")
    assert route.extension_has_cuda(), "torch has CUDA but the extension was built without it"
    q = torch.randn(B, T, H, D).to(dtype)
    c = torch.randn(B, C, H, D).to(dtype)
    valid = torch.rand(B, C) >= 0.2
    limit = torch.randint(-2, C + 3, (B, T))
    ref = moc_route_reference(q, c, k, chunk_valid=valid, causal_limit=limit)
    cpp = lk.moc_route(q, c, k, chunk_valid=valid, causal_limit=limit, backend="cpp")
    args = [t.cuda() for t in (q, c)]
    gpu = lk.moc_route(*args, k, chunk_valid=valid.cuda(), causal_limit=limit.cuda(),
                       backend="cuda")
    auto = lk.moc_route(*args, k, chunk_valid=valid.cuda(), causal_limit=limit.cuda())
    assert gpu.is_cuda and torch.equal(gpu.cpu(), ref) and torch.equal(cpp, ref)
    assert torch.equal(auto, gpu)


def test_cuda_router_integer_ties_and_no_masks():
    """Integer-valued scores (exact, many ties: the lower chunk index wins), no masks."""
    if route.extension_error() is not None or not route.extension_has_cuda():
        pytest.skip(f"no CUDA router: {route.extension_error() or 'built without CUDA'}")
    q = torch.randint(-2, 3, (2, 5, 4, 48)).float()
    c = torch.randint(-2, 3, (2, 300, 4, 48)).float()
    ref = moc_route_reference(q, c, 17)
    assert torch.equal(lk.moc_route(q.cuda(), c.cuda(), 17, backend="cuda").cpu(), ref)
