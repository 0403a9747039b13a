"""MoC chunk router: C++ (and CUDA compile) against the torch reference, exact index equality.

Exactness is by construction: the reference and csrc/moc/router_core.h compute each score with
the same fp32 operations in the same order (see lol_kernels/moc/reference.py), so near-ties
cannot flip. Independent checks guard that construction: integer-valued inputs (every score
exact, many ties) against a pure-Python oracle, and random inputs whose chosen sets are checked
against float64 scores with a rigorous rounding bound.
"""

import os
import shutil
import subprocess
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lol_kernels as lk
from lol_kernels import _dispatch as dispatch
from lol_kernels.moc import moc_route_op as route
from lol_kernels.moc import moc_route_reference, moc_scores_reference
from lol_kernels.moc.reference import eligibility
from tests.support import ROOT

CSRC = os.path.join(ROOT, "csrc")
HAS_EXT = route.extension_error() is None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"extension not built: {route.extension_error()}")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def test_extension_is_built():
    """The cpp tests below skip without the extension; a broken build must still fail here."""
    if os.environ.get("LOL_NO_EXTENSION") == "1":
        pytest.skip("built with LOL_NO_EXTENSION=1")
    assert HAS_EXT, route.extension_error()


def make_inputs(B, T, H, C, D, dtype, *, p_invalid=0.2, causal=True):
    q = torch.randn(B, T, H, D).to(dtype)
    c = torch.randn(B, C, H, D).to(dtype)
    valid = torch.rand(B, C) >= p_invalid if p_invalid else None
    limit = torch.randint(-2, C + 3, (B, T)) if causal else None
    return q, c, valid, limit


def oracle(scores, elig, k):
    """Pure Python selection from exact scores [B, T, H, C] (any type with total order)."""
    B, T, H, C = len(scores), len(scores[0]), len(scores[0][0]), len(scores[0][0][0])
    out = []
    for b in range(B):
        for t in range(T):
            for h in range(H):
                cand = [(-scores[b][t][h][c], c) for c in range(C) if elig[b][t][c]]
                best = sorted(c for _, c in sorted(cand)[:k])
                out.append(best + [-1] * (k - len(best)))
    return torch.tensor(out, dtype=torch.int32).reshape(B, T, H, k)


def check_selection(idx, q, c, valid, limit, k):
    """Chosen sets against float64 scores: a rigorous bound on the fp32 rounding of each score
    (lane sums of D/8 terms plus a 3-level tree) must explain every pick over a left-out chunk."""
    B, T, H, D = q.shape
    C = c.shape[1]
    s64 = moc_scores_reference(q, c, dtype=torch.float64)
    mag = torch.einsum("bthd,bchd->bthc", q.double().abs(), c.double().abs())
    bound = ((D + 7) // 8 + 4) * 2.0**-24 * mag * 1.01
    elig = eligibility(B, T, C, valid, limit, q.device)[:, :, None, :].expand(B, T, H, C)
    chosen = torch.zeros(B, T, H, C + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(idx < 0, C, idx).long(), True)
    chosen = chosen[..., :C]
    assert not (chosen & ~elig).any(), "picked an ineligible chunk"
    n = chosen.sum(-1)
    assert torch.equal(n, torch.clamp(elig.sum(-1), max=k)), "wrong number of picks"
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    worst_in = torch.where(chosen, s64 + bound, inf).amin(-1)
    best_out = torch.where(elig & ~chosen, s64 - bound, -inf).amax(-1)
    assert (worst_in >= best_out).all(), "a left-out chunk beats a picked one beyond rounding"


def check_layout(idx, k):
    """Ascending chunk indices, then -1 padding only at the end."""
    pad = idx < 0
    assert (idx[pad] == -1).all()
    assert not (pad[..., :-1] & ~pad[..., 1:]).any(), "-1 before a real index"
    real_next = ~pad[..., 1:]
    assert (idx[..., 1:] > idx[..., :-1])[real_next].all(), "indices not strictly ascending"


SHAPES = [  # B, T, H, C, D, k
    pytest.param(1, 1, 1, 1, 1, 1, id="C1-D1"),
    pytest.param(2, 3, 2, 5, 7, 8, id="k-gt-C"),
    pytest.param(1, 37, 3, 63, 100, 8, id="T37-C63-D100"),
    pytest.param(2, 9, 2, 257, 128, 33, id="C257-k33"),
    pytest.param(1, 2, 2, 1000, 64, 64, id="C1000-k64"),
    pytest.param(1, 2, 2, 20000, 64, 16, id="C20000"),
    pytest.param(1, 2, 1, 70000, 8, 64, id="C70000-k64"),
]


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("B,T,H,C,D,k", SHAPES)
def test_cpp_equals_torch_random(B, T, H, C, D, k, dtype):
    q, c, valid, limit = make_inputs(B, T, H, C, D, DTYPES[dtype])
    ref = lk.moc_route(q, c, k, chunk_valid=valid, causal_limit=limit, backend="torch")
    out = lk.moc_route(q, c, k, chunk_valid=valid, causal_limit=limit, backend="cpp")
    assert out.dtype == torch.int32 and out.shape == (B, T, H, k)
    assert torch.equal(out, ref)
    check_layout(out, k)
    check_selection(out, q, c, valid, limit, k)


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_cpp_equals_torch_no_masks_and_mixed_dtypes(dtype):
    q = torch.randn(2, 5, 3, 40, dtype=torch.float32)
    c = torch.randn(2, 300, 3, 40).to(DTYPES[dtype])
    out = lk.moc_route(q, c, 10, backend="cpp")
    assert torch.equal(out, moc_route_reference(q, c, 10))
    check_selection(out, q, c, None, None, 10)
    c64 = torch.randn(2, 300, 3, 40, dtype=torch.float64)  # fp64 rounds to fp32 first
    assert torch.equal(lk.moc_route(q.double(), c64, 10, backend="cpp"),
                       moc_route_reference(q.double(), c64, 10))


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_integer_inputs_exact_ties_against_oracle(dtype):
    """Small integers: every product and sum is exact in fp32, so scores are exact integers
    with many ties, and a pure-Python oracle decides the tie rule independently."""
    B, T, H, C, D, k = 2, 4, 3, 97, 24, 12
    q = torch.randint(-3, 4, (B, T, H, D))
    c = torch.randint(-3, 4, (B, C, H, D))
    valid = torch.rand(B, C) > 0.3
    limit = torch.randint(0, C + 5, (B, T))
    exact = torch.einsum("bthd,bchd->bthc", q, c).tolist()
    elig = eligibility(B, T, C, valid, limit, q.device).tolist()
    want = oracle(exact, elig, k)
    qd, cd = q.to(DTYPES[dtype]), c.to(DTYPES[dtype])
    for backend in ("torch", "cpp"):
        got = lk.moc_route(qd, cd, k, chunk_valid=valid, causal_limit=limit, backend=backend)
        assert torch.equal(got, want), backend


@needs_ext
def test_duplicated_chunks_tie_to_lower_index():
    """Eleven exact copies of a row that is by far the best for tile 0, head 0 (score 10 |q|^2,
    ~50 sigma above the rest): the k = 5 picks must be the five lowest copies."""
    B, T, H, C, D, k = 1, 6, 4, 200, 33, 5
    q, c, _, _ = make_inputs(B, T, H, C, D, torch.float32, p_invalid=0, causal=False)
    top = 10 * q[0, 0, 0]
    for i in (40, *range(150, 160)):
        c[0, i, 0] = top
    c[:, 3] = c[:, 199]  # ties for the other tiles and heads too
    out = lk.moc_route(q, c, k, backend="cpp")
    assert torch.equal(out, moc_route_reference(q, c, k))
    assert out[0, 0, 0].tolist() == [40, 150, 151, 152, 153]


@needs_ext
def test_non_finite_scores_rank_as_minus_inf():
    B, T, H, C, D, k = 1, 3, 2, 40, 16, 12
    q, c, valid, limit = make_inputs(B, T, H, C, D, torch.float32, causal=False)
    c[0, 5, :, 0] = float("nan")
    c[0, 6, :, 0] = float("inf")
    c[0, 7, :, 1] = float("-inf")
    c[0, 8, :, :2] = float("inf")
    c[0, 8, 0, 1] = float("-inf")  # inf - inf = nan in one head
    q[0, :, :, :2] = q[0, :, :, :2].abs()
    out = lk.moc_route(q, c, k, chunk_valid=valid, backend="cpp")
    assert torch.equal(out, lk.moc_route(q, c, k, chunk_valid=valid, backend="torch"))
    for t in range(T):  # all-NaN/-inf candidates still beat -1 padding
        got = lk.moc_route(q[:, t : t + 1], c[:, 5:9], 4, backend="cpp")[0, 0]
        assert (got >= 0).all(), got


@needs_ext
def test_nothing_eligible_and_empty_shapes():
    q, c, _, _ = make_inputs(2, 3, 2, 10, 8, torch.float32, causal=False)
    none = torch.zeros(2, 10, dtype=torch.bool)
    limit = torch.tensor([[0, -5, 0], [0, 0, -(2**40)]])
    for kw in ({"chunk_valid": none}, {"causal_limit": limit}):
        for backend in ("torch", "cpp"):
            assert (lk.moc_route(q, c, 4, backend=backend, **kw) == -1).all()
    big = torch.full((2, 3), 2**40)
    assert torch.equal(lk.moc_route(q, c, 4, causal_limit=big, backend="cpp"),
                       lk.moc_route(q, c, 4, backend="torch"))
    c0 = torch.randn(2, 0, 2, 8)
    assert (lk.moc_route(q, c0, 3, backend="cpp") == -1).all()
    assert (lk.moc_route(q, c0, 3, backend="torch") == -1).all()
    q0 = torch.randn(2, 0, 2, 8)
    assert lk.moc_route(q0, c, 3, backend="cpp").shape == (2, 0, 2, 3)


@needs_ext
def test_non_contiguous_inputs():
    q, c, valid, limit = make_inputs(2, 5, 3, 70, 24, torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    ct = c[:, :, :, ::2]
    qs = qt[..., ::2]
    out = lk.moc_route(qs, ct, 6, chunk_valid=valid, causal_limit=limit.int(), backend="cpp")
    assert torch.equal(out, moc_route_reference(qs.contiguous(), ct.contiguous(), 6,
                                                chunk_valid=valid, causal_limit=limit))


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_and_task_splits(threads):
    """Tile spans per task depend on the thread count; results must not."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, T, H in ((1, 37, 1), (2, 20, 3), (3, 1, 1)):
            q, c, valid, limit = make_inputs(B, T, H, 150, 20, torch.bfloat16)
            out = lk.moc_route(q, c, 5, chunk_valid=valid, causal_limit=limit, backend="cpp")
            assert torch.equal(out, moc_route_reference(q, c, 5, chunk_valid=valid,
                                                        causal_limit=limit))
    finally:
        torch.set_num_threads(old)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 4), H=st.integers(1, 3), C=st.integers(0, 80),
       D=st.integers(1, 20), k=st.integers(1, 64), dtype=st.sampled_from(list(DTYPES)),
       seed=st.integers(0, 2**31 - 1), p_invalid=st.sampled_from([0.0, 0.3, 1.0]),
       causal=st.booleans(), spread=st.integers(1, 4))
def test_property_against_oracle(B, T, H, C, D, k, dtype, seed, p_invalid, causal, spread):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-spread, spread + 1, (B, T, H, D), generator=g)
    c = torch.randint(-spread, spread + 1, (B, C, H, D), generator=g)
    valid = torch.rand(B, C, generator=g) >= p_invalid
    limit = torch.randint(-1, C + 2, (B, T), generator=g) if causal else None
    want = oracle(torch.einsum("bthd,bchd->bthc", q, c).tolist(),
                  eligibility(B, T, C, valid, limit, q.device).tolist(), k)
    got = lk.moc_route(q.to(DTYPES[dtype]), c.to(DTYPES[dtype]), k, chunk_valid=valid,
                       causal_limit=limit, backend="cpp")
    assert torch.equal(got, want)
    check_layout(got, k)


def _bad_inputs():
    q, c = torch.randn(1, 2, 3, 8), torch.randn(1, 5, 3, 8)
    ok = dict(q_mean=q, chunk_mean=c, k=2)
    return [
        pytest.param({**ok, "q_mean": q.numpy()}, TypeError, "q_mean must be a torch.Tensor", id="q-numpy"),
        pytest.param({**ok, "q_mean": q[0]}, ValueError, "q_mean must have 4 dimensions", id="q-3d"),
        pytest.param({**ok, "q_mean": q.int()}, TypeError, "q_mean must be a floating", id="q-int"),
        pytest.param({**ok, "chunk_mean": c[..., :4]}, ValueError, "chunk_mean must have shape", id="D-mismatch"),
        pytest.param({**ok, "chunk_mean": torch.randn(2, 5, 3, 8)}, ValueError, "chunk_mean must have shape", id="B-mismatch"),
        pytest.param({**ok, "chunk_mean": torch.randn(1, 5, 2, 8)}, ValueError, "chunk_mean must have shape", id="H-mismatch"),
        pytest.param({**ok, "k": 0}, ValueError, r"k must be in \[1, 64\]", id="k0"),
        pytest.param({**ok, "k": 65}, ValueError, r"k must be in \[1, 64\]", id="k65"),
        pytest.param({**ok, "k": 2.0}, TypeError, "k must be an int", id="k-float"),
        pytest.param({**ok, "k": True}, TypeError, "k must be an int", id="k-bool"),
        pytest.param({**ok, "q_mean": torch.randn(1, 2, 3, 0), "chunk_mean": torch.randn(1, 5, 3, 0)}, ValueError, "D must be in", id="D0"),
        pytest.param({**ok, "chunk_valid": torch.ones(1, 5)}, TypeError, "chunk_valid must be a bool", id="valid-float"),
        pytest.param({**ok, "chunk_valid": torch.ones(1, 4, dtype=torch.bool)}, ValueError, r"chunk_valid must have shape \[1, 5\]", id="valid-shape"),
        pytest.param({**ok, "causal_limit": torch.ones(1, 2)}, TypeError, "causal_limit must be an integer", id="limit-float"),
        pytest.param({**ok, "causal_limit": torch.ones(2, 1, dtype=torch.long)}, ValueError, r"causal_limit must have shape \[1, 2\]", id="limit-shape"),
        pytest.param({**ok, "chunk_valid": torch.ones(1, 5, dtype=torch.bool, device="meta")}, ValueError, "chunk_valid must be on cpu", id="valid-device"),
        pytest.param({**ok, "backend": "triton"}, ValueError, "backend must be one of", id="backend-triton"),
        pytest.param({**ok, "backend": "cuda"}, (ValueError, RuntimeError), "cuda", id="backend-cuda-on-cpu"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_inputs())
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        lk.moc_route(kwargs.pop("q_mean"), kwargs.pop("chunk_mean"), kwargs.pop("k"), **kwargs)


@needs_ext
def test_direct_op_checks_do_not_crash():
    q, c = torch.randn(1, 2, 3, 8), torch.randn(1, 5, 3, 8)
    with pytest.raises(ValueError, match="k must be in"):
        torch.ops.lol_C.moc_route(q, c, 65)
    with pytest.raises(ValueError, match="chunk_valid must be"):
        torch.ops.lol_C.moc_route(q, c, 2, torch.ones(1, 4, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="chunk_mean must be"):
        torch.ops.lol_C.moc_route(q, c[:, :, :2], 2)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "auto", "torch"])
def test_torch_compile_fullgraph(backend):
    q, c, valid, limit = make_inputs(2, 5, 3, 50, 16, torch.bfloat16)
    fn = torch.compile(lambda q, c, v, lim: lk.moc_route(q, c, 7, chunk_valid=v, causal_limit=lim,
                                                         backend=backend), fullgraph=True)
    assert torch.equal(fn(q, c, valid, limit), moc_route_reference(q, c, 7, chunk_valid=valid,
                                                                   causal_limit=limit))


@needs_ext
def test_direct_op_fake_kernel_under_compile():
    q, c = torch.randn(1, 4, 2, 8), torch.randn(1, 30, 2, 8)
    fn = torch.compile(lambda q, c: torch.ops.lol_C.moc_route(q, c, 3), fullgraph=True)
    assert torch.equal(fn(q, c), moc_route_reference(q, c, 3))


@pytest.fixture
def failed_extension(monkeypatch):
    """Simulate an extension that cannot be loaded (as with LOL_NO_EXTENSION=1 at build)."""
    def fail():
        raise ImportError("lol_kernels._C is not built (simulated)")

    monkeypatch.setattr(dispatch, "load_extension", fail)
    dispatch.extension_error.cache_clear()
    dispatch.warn_extension_fallback.cache_clear()
    yield
    dispatch.extension_error.cache_clear()
    dispatch.warn_extension_fallback.cache_clear()


def test_fallback_warns_once_and_cpp_raises(failed_extension):
    q, c, valid, limit = make_inputs(1, 3, 2, 20, 8, torch.float32)
    ref = moc_route_reference(q, c, 4, chunk_valid=valid, causal_limit=limit)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            out = lk.moc_route(q, c, 4, chunk_valid=valid, causal_limit=limit)
            assert torch.equal(out, ref)
    fallback = [w for w in rec if issubclass(w.category, route.ExtensionFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in rec]
    assert "falls back to the PyTorch reference" in str(fallback[0].message)
    assert "simulated" in str(fallback[0].message)
    with pytest.raises(RuntimeError, match=r"backend='cpp'.*could not be loaded.*simulated"):
        lk.moc_route(q, c, 4, backend="cpp")
    assert torch.equal(lk.moc_route(q, c, 4, backend="torch"), moc_route_reference(q, c, 4))


def test_fp16_conversion_exhaustive_in_plain_gxx(tmp_path):
    """router_core.h compiles with plain g++ (no CUDA, -Wall -Wextra -Werror) and converts all
    65,536 fp16 and bf16 bit patterns exactly like torch."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ missing")
    src = tmp_path / "conv.cpp"
    src.write_text(
        '#include "moc/router_core.h"\n#include <cstdio>\n'
        "int main() {\n"
        "  for (unsigned i = 0; i < 65536; ++i) {\n"
        "    const uint32_t a = lol::moc::float_bits(lol::moc::half_to_float(uint16_t(i)));\n"
        "    const uint32_t b = lol::moc::float_bits(lol::moc::bf16_to_float(uint16_t(i)));\n"
        "    fwrite(&a, 4, 1, stdout); fwrite(&b, 4, 1, stdout);\n"
        "  }\n  return 0;\n}\n")
    exe = tmp_path / "conv"
    subprocess.run([gxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    f"-I{CSRC}", str(src), "-o", str(exe)], check=True, capture_output=True)
    raw = subprocess.run([str(exe)], check=True, capture_output=True).stdout
    got = torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(-1, 2).view(torch.float32)
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for col, dt in ((0, torch.float16), (1, torch.bfloat16)):
        want = bits.view(dt).float()
        g = got[:, col]
        both_nan = want.isnan() & g.isnan()
        assert torch.equal(g[~both_nan].view(torch.int32), want[~both_nan].view(torch.int32)), dt
        assert torch.equal(want.isnan(), g.isnan())


EMU_SRC = os.path.join(ROOT, "tests", "support", "cuda_emu", "moc_route_emu.cpp")


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    """The CUDA kernel source compiled by g++ with warps emulated by threads (no GPU here)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ missing")
    exe = tmp_path_factory.mktemp("emu") / "moc_route_emu"
    res = subprocess.run([gxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra",
                          "-Wno-unknown-pragmas", "-Werror", "-ffp-contract=off", f"-I{CSRC}",
                          EMU_SRC, "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    def run(q, c, k, valid=None, limit=None):
        B, T, H, D = q.shape
        C = c.shape[1]
        code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[c.dtype]
        hdr = torch.tensor([B, T, H, C, D, k, code, valid is not None, limit is not None])
        raw = c.contiguous().view(torch.float32 if code == 0 else torch.int16)
        parts = [hdr.numpy().tobytes(), q.float().contiguous().numpy().tobytes(),
                 raw.numpy().tobytes()]
        if valid is not None:
            parts.append(valid.to(torch.uint8).numpy().tobytes())
        if limit is not None:
            parts.append(limit.long().numpy().tobytes())
        out = subprocess.run([str(exe)], input=b"".join(parts), capture_output=True, check=True)
        return torch.frombuffer(bytearray(out.stdout), dtype=torch.int32).reshape(B, T, H, k)

    return run


EMU_CASES = [  # B, T, H, C, D, k: k = 32 / 33 switch the warp list from 1 to 2 keys a lane
    pytest.param(1, 2, 2, 5, 7, 8, id="C5-k8"),
    pytest.param(2, 1, 2, 300, 33, 1, id="C300-k1"),
    pytest.param(1, 2, 1, 2100, 16, 32, id="C2100-k32"),
    pytest.param(1, 1, 2, 2100, 12, 33, id="C2100-k33"),
    pytest.param(2, 1, 1, 900, 8, 64, id="C900-k64"),
]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("B,T,H,C,D,k", EMU_CASES)
def test_cuda_kernel_emulated_equals_torch(cuda_emulator, B, T, H, C, D, k, dtype):
    q, c, valid, limit = make_inputs(B, T, H, C, D, DTYPES[dtype])
    ref = moc_route_reference(q, c, k, chunk_valid=valid, causal_limit=limit)
    assert torch.equal(cuda_emulator(q, c, k, valid, limit), ref)
    qi = torch.randint(-2, 3, (B, T, H, D)).to(DTYPES[dtype])  # exact scores, many ties
    ci = torch.randint(-2, 3, (B, C, H, D)).to(DTYPES[dtype])
    assert torch.equal(cuda_emulator(qi, ci, k), moc_route_reference(qi, ci, k))


@pytest.mark.parametrize("k", [1, 31, 64])
def test_cuda_kernel_emulated_adversarial(cuda_emulator, k):
    """Ascending scores make every batch of every warp beat the list; NaN rows and invalid
    chunks mixed in."""
    C = 1500
    c = torch.arange(C, dtype=torch.float32)[None, :, None, None].expand(1, C, 2, 8).contiguous()
    c[0, 7, 1] = float("nan")
    q = torch.ones(1, 3, 2, 8)
    q[0, 1] = -1.0  # descending for this tile
    valid = torch.rand(1, C) > 0.1
    limit = torch.tensor([[C, 1400, 0]])
    ref = moc_route_reference(q, c, k, chunk_valid=valid, causal_limit=limit)
    assert torch.equal(cuda_emulator(q, c, k, valid, limit), ref)


NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)


def _nvcc(args, tmp_path):
    res = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-O3", "--Werror", "all-warnings",
                          "-Xcompiler", "-Wall,-Wextra,-Werror", f"-I{CSRC}", *args],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def _resource_usage(obj):
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    return subprocess.run([tool, "--dump-resource-usage", str(obj)], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc missing")
def test_cuda_kernel_compiles_sm90_standalone(tmp_path):
    """The kernel needs only router_core.h: compile every (dtype, list size) instantiation."""
    src = tmp_path / "kernel.cu"
    lines = ['#include "moc/router_kernel.cuh"', "namespace lol { namespace moc {"]
    for e, s in (("F32", "float"), ("F16", "uint16_t"), ("BF16", "uint16_t")):
        lines.append(f"template cudaError_t launch_moc_route<{e}>(const float*, const {s}*, "
                     "const uint8_t*, const int64_t*, int32_t*, int64_t, int64_t, int64_t, "
                     "int64_t, int, int, cudaStream_t);")
    lines.append("}}")
    src.write_text("\n".join(lines) + "\n")
    _nvcc(["-c", str(src), "-o", str(tmp_path / "kernel.o")], tmp_path)
    usage = _resource_usage(tmp_path / "kernel.o")
    if usage is not None:
        kernels = [ln for ln in usage.splitlines() if "REG:" in ln]
        assert len(kernels) == 12, usage
        assert all("LOCAL:0" in ln for ln in kernels), usage  # no register spills


@pytest.mark.skipif(NVCC is None, reason="nvcc missing")
def test_cuda_binding_compiles_sm90(tmp_path):
    """router_cuda.cu as setup.py builds it with a CUDA torch (TORCH_LIBRARY_IMPL included)."""
    from torch.utils.cpp_extension import include_paths

    inc = [a for p in include_paths() for a in ("-isystem", p)]
    _nvcc([*inc, "-c", os.path.join(CSRC, "moc", "router_cuda.cu"), "-o",
           str(tmp_path / "router_cuda.o")], tmp_path)
