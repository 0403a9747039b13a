"""The CPU paths are safe to call from several Python threads at once, and never change
torch's thread settings: concurrent ``paged_attention``, ``moc_attention``,
``rope_attention`` and ``apply_rope`` calls on different inputs (different shapes and dtypes)
each return exactly the single-threaded result.

The calls of the four ops run interleaved in one pool, so the ops of different folders share
these tests (a race between two ops, or an op changing a setting another reads, shows only
when they run together)."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lol_kernels as lk
from tests.support.moc_cases import make_case as moc_case
from tests.support.moc_cases import split as moc_split
from tests.support.paged_cases import call as paged_call
from tests.support.paged_cases import make_case as paged_case


def _paged(dtype, **shape):
    c = paged_case(dtype=dtype, **shape)
    return lambda: paged_call(c, causal=c["k_new"] is not None, backend="torch")


def _moc(dtype, **shape):
    x, opts = moc_case(**shape)
    pos, kw = moc_split(x, opts, dtype)
    return lambda: lk.moc_attention(*pos, **kw, backend="torch")


def _rope_attention(B, N, Nk, Hq, Hkv, D, causal):
    table = lk.rope_frequencies(D, Hq, jitter_sigma=0.5, seed=N)
    q, k, v = torch.randn(B, N, Hq, D), torch.randn(B, Nk, Hkv, D), torch.randn(B, Nk, Hkv, D)
    qp, kp = torch.randint(0, 40, (B, N, 3)), torch.randint(0, 40, (B, Nk, 3))
    return lambda: lk.rope_attention(q, k, v, qp, kp, table, causal=causal, backend="torch",
                                     return_lse=True)


def _apply_rope(N, H, D):
    table = lk.rope_frequencies(D, H, jitter_sigma=0.8, seed=N)
    x, pos = torch.randn(2, N, H, D), torch.randint(0, 2**20, (2, N, 3))
    return lambda: lk.apply_rope(x, pos, table, backend="torch")


def _calls():
    """CPU calls of different ops, shapes and dtypes (large enough to overlap; the N=1024 MoC
    call has (head, chunk) groups of about 12 tiles of 64 rows: some are batched, some not)."""
    return [
        _paged(torch.float32, B=2, N=96, Hq=8, Hkv=2, D=64, S=32, P=12, M=8),
        _paged(torch.float32, B=1, N=160, Hq=4, Hkv=4, D=128, S=64, P=8, M=6),
        _paged(torch.float64, B=3, N=40, Hq=6, Hkv=3, D=32, S=16, P=20, M=9),
        _paged(torch.float32, B=2, N=64, Hq=4, Hkv=1, D=64, S=16, P=9, M=5, with_new=False),
        _moc(torch.float32, B=2, N=200, Hq=4, Hkv=2, D=32, S=16, M=3, C=8, Pc=2, k=3, tile=32),
        _moc(torch.float32, B=1, N=300, Hq=6, Hkv=3, D=64, S=32, M=2, C=6, Pc=1, k=2, tile=64),
        _moc(torch.float64, B=2, N=90, Hq=2, Hkv=1, D=16, S=16, M=3, C=5, Pc=2, k=2, tile=16),
        _moc(torch.float32, B=1, N=1024, Hq=2, Hkv=1, D=16, S=16, M=2, C=4, Pc=1, k=3, tile=64),
        _rope_attention(2, 120, 150, 4, 2, 64, causal=False),
        _rope_attention(1, 200, 200, 6, 6, 32, causal=True),
        _apply_rope(500, 4, 64),
        _apply_rope(300, 8, 128),
    ]


@pytest.mark.parametrize("workers", [4, 8])
def test_concurrent_calls_equal_single_threaded(workers):
    calls = _calls()
    expected = [fn() for fn in calls]
    order = [i for i in range(len(calls)) for _ in range(3)]
    random.Random(workers).shuffle(order)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda i: calls[i](), order))
    wrong = 0
    for i, res in zip(order, results, strict=True):
        ref = expected[i]
        pairs = zip(res, ref, strict=True) if isinstance(ref, tuple) else [(res, ref)]
        wrong += not all(torch.equal(a, b) for a, b in pairs)
    assert wrong == 0, f"{wrong} of {len(order)} concurrent calls differ from the serial result"


def test_calls_keep_torch_thread_settings():
    """No call changes the thread count: not the caller's, and not the one a thread started
    while calls run in other threads inherits (OpenMP reads the process setting then)."""
    n, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    calls = _calls()
    for fn in calls:
        fn()
        assert torch.get_num_threads() == n
    seen, done = set(), threading.Event()

    def probe():
        while not done.is_set():
            t = threading.Thread(target=lambda: seen.add(torch.get_num_threads()))
            t.start()
            t.join()

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda fn: fn(), calls * 2))
    finally:
        done.set()
        prober.join()
    assert torch.get_num_threads() == n and torch.get_num_interop_threads() == interop
    assert seen == {n}, f"threads started during the calls saw thread counts {sorted(seen)}"
