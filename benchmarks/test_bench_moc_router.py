"""pytest-benchmark cases of ``moc_router.py``: the MoC chunk router's C++ extension against the
torch reference and against a plain matmul + topk, per number of chunks ``C`` (one group per
``C``, fp32; ``--quick`` leaves out the largest ``C``, where the reference takes seconds).

The workload is the script's :func:`moc_router.cases`. Checked on the last timed call's result
(outside the timing): ``cpp`` and ``torch`` return the reference's indices exactly (the
contract's summation order); ``matmul_topk`` sums scores in BLAS's order, so near ties may pick
other chunks: its chunks must score as high as the reference's.
"""

from __future__ import annotations

import pytest
import torch
from moc_router import CHUNKS, EXACT, cases, inputs

import lol_kernels as lk

METHODS = ("cpp", "torch", "matmul_topk")
#: by quick: the script's --repeats (and --ref-repeats, of the slow reference) under
#: lol bench --quick / in full
ROUNDS, REF_ROUNDS = {True: 3, False: 5}, {True: 2, False: 3}


def pytest_generate_tests(metafunc):
    chunks = CHUNKS[:-1] if metafunc.config.getoption("quick") else CHUNKS
    metafunc.parametrize("chunks,method", [
        pytest.param(c, m, id=f"C{c}-{m}", marks=pytest.mark.benchmark(group=f"moc_router C{c}"))
        for c in chunks for m in METHODS])


def workload(memo, chunks):
    """``(q, c, fns, reference indices)`` at ``chunks`` chunks, built once per module."""
    if chunks not in memo:
        q, c = inputs(chunks, seed=chunks)
        fns = cases(q, c)
        memo[chunks] = q, c, fns, fns["torch"]()
    return memo[chunks]


def score_of_choice(q, c, idx):
    """Summed float64 score of the chunks ``idx [B, T, H, k]`` picked per query tile and head."""
    s = torch.einsum("bthd,bchd->bthc", q.double(), c.double())
    return s.gather(-1, idx.long()).sum(-1)


def test_moc_router(benchmark, memo, quick, chunks, method):
    if method == "cpp" and lk.moc.extension_error() is not None:
        pytest.skip(f"the C++ extension is not available: {lk.moc.extension_error()}")
    q, c, fns, ref = workload(memo, chunks)
    if method == "torch":  # about 10x the extension's time: fewer rounds, no warm-up
        rounds, warmup = REF_ROUNDS[quick], 0
    else:
        rounds, warmup = ROUNDS[quick], 1
    idx = benchmark.pedantic(fns[method], rounds=rounds, iterations=1, warmup_rounds=warmup)
    if method in EXACT:
        assert torch.equal(idx, ref), f"{method} and the torch reference pick other chunks"
    else:
        gap = (score_of_choice(q, c, ref) - score_of_choice(q, c, idx)).max().item()
        assert gap <= 1e-3, f"{method}'s chunks score {gap:.2e} below the reference's"
