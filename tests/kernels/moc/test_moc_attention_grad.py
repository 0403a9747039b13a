"""Gradients of moc_attention (the torch-path backward, every backend): ``gradcheck`` in
float64 over two mandatory entries and two one-page chunks with per-head routing and holes,
gradients (through ``out`` and ``lse``) against autograd through the float64 reference,
torch.compile (aot_eager, fullgraph) tracing forward and backward, and torch.func transforms
refused with a clear message."""

import pytest
import torch

import lol_kernels as lk
from lol_kernels.moc import moc_attention_reference
from tests.support.grad_cases import (
    HEAD_IDS,
    HEADS,
    A,
    S,
    check_compile_traces,
    check_paged_gradcheck,
    check_paged_grads_match_reference,
    check_torch_func_refused,
    paged_inputs,
    paged_step,
)

TILE = 16


def moc_inputs(Hq, Hkv, dtype=torch.float64, B=2, N=20):
    """Two mandatory entries and two one-page chunks from a pool of 6 pages; two query tiles
    (N = 20, the last one short) whose heads route to different chunks or none (-1)."""
    x = paged_inputs(Hq, Hkv, dtype, B=B, N=N, P=6)
    x["page_len"] = torch.tensor([S, S // 2, S, S, 1, 3], dtype=torch.int32)
    x["page_table"] = torch.tensor([[3, -1], [0, 4]], dtype=torch.int32)[:B]
    x["page_shift"] = x["page_shift"][:, :2]
    chunk_pages = torch.tensor([[[1], [5]], [[2], [5]]], dtype=torch.int32)[:B]
    g = torch.Generator().manual_seed(11)
    routed = torch.randint(-1, 2, (B, 2, Hq, 1), generator=g).int()
    x.update(chunk_pages=chunk_pages, routed=routed, tile_size=TILE,
             chunk_shift=torch.randint(-3, 4, (B, 2, A), generator=g))
    return x


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS[:2], ids=HEAD_IDS[:2])
def test_moc_gradcheck(hq, hkv, causal):
    check_paged_gradcheck("moc_attention", moc_inputs(hq, hkv), causal)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 2e-4)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=HEAD_IDS)
def test_moc_grads_match_reference(hq, hkv, causal, dtype, tol):
    x = moc_inputs(hq, hkv, dtype)
    check_paged_grads_match_reference("moc_attention", moc_attention_reference, x, causal, dtype,
                                      tol)


# ------------------------------------------------------------------ torch.compile, torch.func
@pytest.mark.parametrize("op", ["moc_attention"])
def test_compile_traces_forward_and_backward(op):
    torch._dynamo.reset()
    x = moc_inputs(4, 2, torch.float32)
    q, k, v = (x.pop(n) for n in ("q", "k_new", "v_new"))
    check_compile_traces(paged_step, q, k, v, x, op)


@pytest.mark.parametrize("how", ["grad", "vjp"])
@pytest.mark.parametrize("op", ["moc_attention"])
def test_torch_func_is_refused_clearly(op, how):
    x = moc_inputs(4, 2)
    q = x.pop("q")
    fn = lambda q: getattr(lk, op)(q, **x, backend="torch")[0].sum()  # noqa: E731
    check_torch_func_refused(op, fn, q, how)
