"""pytest-benchmark cases of ``moc_attention.py``: MoC block-sparse attention (CPU torch path)
against dense SDPA and dense paged attention over one 64k-key history, on the clustered data.

``N`` queries: 2048, or 512 with ``--quick`` (the script's ``--quick``); in the test id. Groups:
``moc_attention N{N}`` (``dense_sdpa``, ``dense_paged``, ``moc_s{sparsity}``: the attention on
indices routed once) and ``moc_attention route N{N}`` (``route_s{sparsity}``: the routing alone;
the script's ``total_s`` is the sum of the two).

The workload is the script's :func:`moc_attention.cases`. Checked on the last timed call's result
(outside the timing): ``dense_sdpa`` matches ``dense_paged``; MoC keeps its error against dense
attention within the bounds that content-aligned chunks allow; the routed ids are in range and
ascending.
"""

from __future__ import annotations

import pytest
from moc_attention import (
    CHUNK,
    HEAD_DIM,
    HEADS,
    K_FOR_SPARSITY,
    MANDATORY,
    QUERIES,
    QUICK_QUERIES,
    TILE,
    C,
    cases,
    error,
    histories,
)

METHODS = ("dense_sdpa", "dense_paged", *(f"{op}_s{s}" for s in K_FOR_SPARSITY
                                          for op in ("route", "moc")))
#: MoC against dense attention on the clustered data (measured: rel_err <= 0.041, mass kept
#: >= 0.976 at 95 % sparsity); i.i.d. keys give rel_err above 0.99 at every sparsity
MAX_REL_ERR, MIN_MASS_KEPT = 0.1, 0.95
ROUNDS = {True: 2, False: 5}  # by quick


def pytest_generate_tests(metafunc):
    n = QUICK_QUERIES if metafunc.config.getoption("quick") else QUERIES
    metafunc.parametrize("queries,method", [
        pytest.param(n, m, id=f"N{n}-{m}", marks=pytest.mark.benchmark(
            group=f"moc_attention {'route ' if m.startswith('route') else ''}N{n}"))
        for m in METHODS])


def workload(memo, queries):
    """``(fns, dense_paged's (out, lse))`` on the clustered history, built once per module."""
    if queries not in memo:
        kind, x, table = next(histories(HEADS, HEAD_DIM, queries, TILE))
        assert kind == "clustered"
        fns = cases(x, table, TILE)
        memo[queries] = fns, fns["dense_paged"]()
    return memo[queries]


def check(method, result, ref):
    """Raise if ``result`` of ``method`` is wrong (``ref``: dense_paged's ``(out, lse)``);
    returns the figures checked, for the benchmark's ``extra_info``."""
    if method.startswith("dense"):
        out = result.transpose(1, 2) if method == "dense_sdpa" else result[0]
        err = (out - ref[0]).abs().max().item()
        assert err <= 1e-4, f"{method} differs from the first dense_paged call by {err:.2e}"
        return {"max_abs_diff_vs_dense_paged": err}
    if method.startswith("moc_s"):
        e = error(result, ref, K_FOR_SPARSITY[int(method.rsplit("_s", 1)[1])])
        assert e["rel_err"] <= MAX_REL_ERR and e["mass_kept"] >= MIN_MASS_KEPT, e
        return e
    k = K_FOR_SPARSITY[int(method.rsplit("_s", 1)[1])]  # route_s{sparsity}
    routable = C - len(MANDATORY)
    assert result.shape[-1] == k and result.min() >= 0 and result.max() < routable
    assert (result.diff(dim=-1) > 0).all(), "routed chunk ids not ascending"
    return {}


def test_moc_attention(benchmark, memo, quick, queries, method):
    fns, ref = workload(memo, queries)
    result = benchmark.pedantic(fns[method], rounds=ROUNDS[quick], iterations=1,
                                warmup_rounds=1)
    benchmark.extra_info.update(queries=queries, history_keys=C * CHUNK,
                                **check(method, result, ref))
