"""pytest-benchmark cases of ``rope_attention_train.py``: the training step (forward + backward)
of ``rope_attention`` against rotate-with-autograd + SDPA, and their forwards alone, on the CPU
in fp32, non-causal (one group per shape and step: ``... step`` and ``... fwd``).

Shapes: ``B2-N1560``, and ``B1-N3120`` unless ``--quick`` (the script's shapes under
``lol bench --quick`` and in full). The workload is the script's
:func:`rope_attention_train.cases`; the last timed call's gradients (or output) are checked
against the baseline's (outside the timing).
"""

from __future__ import annotations

import pytest
from rope_attention_train import SHAPES, baseline, cases, comparable, max_rel_diff

METHODS = ("rotate_sdpa", "rope_attention", "rotate_sdpa_fwd", "rope_attention_fwd")
QUICK_SHAPES = ("B2-N1560",)
#: largest max|a - b| / max|b| against the baseline (measured: below 1e-6 in fp32)
TOLERANCE = 1e-4
ROUNDS = {True: 3, False: 5}  # by quick: the script's --repeats under lol bench --quick / full


def pytest_generate_tests(metafunc):
    shapes = QUICK_SHAPES if metafunc.config.getoption("quick") else tuple(SHAPES)
    metafunc.parametrize("shape,method", [
        pytest.param(s, m, id=f"{s}-{m}", marks=pytest.mark.benchmark(
            group=f"rope_attention_train {s} {'fwd' if m.endswith('_fwd') else 'step'}"))
        for s in shapes for m in METHODS])


def workload(memo, shape):
    """``(fns, {baseline method: its comparable result})`` of ``shape``, built once per module."""
    if shape not in memo:
        fns = cases(SHAPES[shape], split=True)
        memo[shape] = fns, {}
    return memo[shape]


def test_rope_attention_train(benchmark, memo, quick, shape, method):
    fns, refs = workload(memo, shape)
    base = baseline(method)
    if base not in refs:
        refs[base] = comparable(base, fns[base]())
    result = benchmark.pedantic(fns[method], rounds=ROUNDS[quick], iterations=1,
                                warmup_rounds=1)
    diff = max_rel_diff(comparable(method, result), refs[base])
    benchmark.extra_info.update(shape=shape, baseline=base, max_rel_diff=diff)
    assert diff <= TOLERANCE, f"{method} differs from {base} by {diff:.2e} (relative)"
