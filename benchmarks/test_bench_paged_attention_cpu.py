"""pytest-benchmark cases of ``paged_attention_cpu.py``: paged attention against SDPA on keys
already rotated and against re-rotate + SDPA, per shape (one group per shape).

The workload is the script's :func:`paged_attention_cpu.cases`; the output of each case's last
timed call is checked against ``sdpa_prerotated`` (outside the timing), so a benchmark of a
wrong result fails.
"""

from __future__ import annotations

import pytest
from paged_attention_cpu import SHAPES, cases, flops, max_abs_diff

METHODS = ("sdpa_prerotated", "paged", "rerotate_sdpa")
#: max |output - sdpa_prerotated| allowed: fp32 rounding (rerotate_sdpa's angles are float32)
TOLERANCE = 1e-4
ROUNDS = {True: 3, False: 15}  # by quick: the script's --repeats under lol bench --quick / full


def pytest_generate_tests(metafunc):
    metafunc.parametrize("shape,method", [
        pytest.param(s, m, id=f"{s}-{m}",
                     marks=pytest.mark.benchmark(group=f"paged_attention_cpu {s}"))
        for s in SHAPES for m in METHODS])


def workload(memo, shape):
    """``(fns, shape record, reference output)`` of ``shape``, built once per module."""
    if shape not in memo:
        fns, record = cases(**SHAPES[shape])
        memo[shape] = fns, record, fns["sdpa_prerotated"]()
    return memo[shape]


def test_paged_attention_cpu(benchmark, memo, quick, shape, method):
    fns, record, ref = workload(memo, shape)
    out = benchmark.pedantic(fns[method], rounds=ROUNDS[quick], iterations=1, warmup_rounds=1)
    err = max_abs_diff(out, ref)
    benchmark.extra_info.update(record, flops=flops(record), max_abs_diff_vs_sdpa=err)
    assert err <= TOLERANCE, f"{method} differs from sdpa_prerotated by {err:.2e}"
