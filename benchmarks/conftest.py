"""pytest-benchmark set-up of the CPU micro-benchmarks (``test_bench_*.py``).

``--quick`` (or ``LOL_BENCH_QUICK=1`` in the environment) selects the cheap sizes: fewer rounds,
and smaller shapes where the full ones take minutes on two cores. The quick and the full sizes
of a benchmark carry different test ids where their shapes differ, so a saved run is compared
only with runs of the same shapes.

The scripts import each other by file name (``harness``, ``paged_attention_cpu``, ...), so this
folder goes on ``sys.path`` whatever the working directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

QUICK_ENV = "LOL_BENCH_QUICK"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help=f"cheap benchmark sizes (also {QUICK_ENV}=1): fewer rounds, smaller "
                          "shapes where the full ones take minutes")


def pytest_configure(config):
    # one switch for the tests to read: the option, or the environment variable
    if os.environ.get(QUICK_ENV, "") not in ("", "0"):
        config.option.quick = True


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """Whether the cheap sizes are selected."""
    return bool(request.config.getoption("quick"))


@pytest.fixture(scope="module")
def memo():
    """A dict that lives for one test module: each shape's workload (inputs, callables,
    reference results) is built once for all its cases and freed when the module is done."""
    store: dict = {}
    yield store
    store.clear()
