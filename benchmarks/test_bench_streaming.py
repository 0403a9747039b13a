"""pytest-benchmark cases of ``streaming.py``: one block of the tiny random model's stream (CPU,
one thread, VAE decode off) early in the stream and late in it, per cache configuration (one
group per cache: ``sink-window`` stays flat, ``growing`` slows down as its cache grows).

The late block is block 1000, or 100 with ``--quick`` (the script's ``--blocks`` and
``--quick``); in the test id. The rounds are the blocks of a window centred on that block, as
the script's windowed medians; the stream's first block (which pays one-off set-up costs)
is never timed. Each case's last block must come out finite.

The workload is the script's :func:`streaming.new_run`.
"""

from __future__ import annotations

import math

import pytest
import torch
from streaming import new_run

CACHES = ("sink-window", "growing")
FIRST = 10
LAST = {True: 100, False: 1000}  # by quick
WINDOW = {True: 21, False: 51}  # blocks timed around each block, by quick


def pytest_generate_tests(metafunc):
    last = LAST[metafunc.config.getoption("quick")]
    metafunc.parametrize("cache,block", [
        pytest.param(c, b, id=f"{c}-block{b}",
                     marks=pytest.mark.benchmark(group=f"streaming {c}"))
        for c in CACHES for b in (FIRST, last)])


@pytest.fixture
def one_thread():
    """The script's worker runs on one thread (``--threads 1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_streaming(benchmark, quick, one_thread, cache, block):
    w = WINDOW[quick]
    start = max(2, block - w // 2)  # first timed block (1-based)
    st, step = new_run(cache, blocks=start + w)
    for _ in range(start - 1):
        step()
    x0 = benchmark.pedantic(step, rounds=w, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(cache=cache, block=block, blocks_timed=[start, start + w - 1],
                                frames_cached=st.cache.num_frames,
                                cache_mib=st.cache.memory_bytes() / 2**20)
    assert math.isfinite(x0.abs().max().item()), "the block's latents are not finite"
