"""The GPU-only branches, run whenever a CUDA GPU is present (issue 13; skipped elsewhere).

Under the interpreter the kernels take the portable polynomials instead of the MUFU sin/cos
(``FAST_TRIG``), products in fp16/fp32 only (its bf16 ``tl.dot`` is wrong), fixed tiles
instead of the autotuner, one split-KV part (``num_splits_for`` needs the SM count), and the
router runs its C++ build. Here each of those runs on the GPU against the float64 reference:

* the MUFU fast trig at positions up to 2^30 (``apply_rope``, the paged kernel);
* bf16 tensor-core products (paged, dense and MoC attention);
* autotuned launches whose split-KV part count comes from the device's SM count;
* the CUDA router (``csrc/moc/router_cuda.cu``) against the C++ build and the reference;
* the rotate-once prologue and key loop (issue 14) next to the fused path, bf16, autotuned;
* the fused Triton backward of ``rope_attention`` (issue 17) in bf16, autotuned, through
  autograd.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the fast-trig, bf16-product, autotuned split-KV and CUDA-router "
           "branches need one (the interpreter and C++ build cover the rest)")

from conftest import assert_close_rule, max_err  # noqa: E402
from test_paged_attention_triton import _call, _cast, make_case, run_and_check  # noqa: E402

import lol_kernels as lk  # noqa: E402
from lol_kernels.moc import moc_route_op as route  # noqa: E402
from lol_kernels.moc import moc_route_reference  # noqa: E402
from lol_kernels.rope import apply_rope_torch  # noqa: E402
from lol_kernels.rope.reference import apply_rope_reference  # noqa: E402

BF16 = torch.bfloat16


def test_kernels_compile_for_the_gpu_with_fast_trig():
    """The kernels are compiled (not interpreted) and take the MUFU branch."""
    from lol_kernels.attention import attention_triton as tk
    from lol_kernels.attention import attention_triton_rotate as tr
    from lol_kernels.attention import rope_attention_triton_backward as tb
    from lol_kernels.common.triton_utils import fast_trig, is_interpreted
    from lol_kernels.moc.moc_attention_triton import moc_attn_fwd
    from lol_kernels.rope.rope_triton import apply_rope_fwd

    for k in (tk.paged_rope_attn_fwd, moc_attn_fwd, apply_rope_fwd, tr.rotate_keys_fwd,
              tr.paged_attn_rotated_fwd, tb.rope_attn_bwd_dq, tb.rope_attn_bwd_dkdv):
        assert not is_interpreted(k) and fast_trig(k)


@pytest.mark.parametrize("base", [0, 2**24, 2**30 - 512], ids=["t0", "t2^24", "t2^30"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_fast_trig_apply_rope_large_positions(dtype, base):
    """MUFU sin/cos after the exact fixed-point reduction: as accurate as the float64
    reference at any position the kernels accept (docs/design.md §5 rule)."""
    table = lk.rope_frequencies(128, 4, jitter_sigma=0.8, seed=3)
    x = torch.randn(2, 300, 4, 128)
    pos = torch.randint(0, 40, (2, 300, 3))
    pos[..., 0] += base + torch.randint(0, 500, (2, 300))
    ref64 = apply_rope_reference(x.double(), pos, table)
    ref_lo = apply_rope_torch(x.to(dtype), pos, table)  # the CPU path in the same dtype
    out = lk.apply_rope(x.to(dtype).cuda(), pos.cuda(), table, backend="triton")
    assert_close_rule(out.cpu(), ref_lo, ref64, f"apply_rope at t ~ {base}")


@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
@pytest.mark.parametrize("D,S,M", [(64, 16, 5), (128, 64, 3)], ids=["D64-S16", "D128-S64"])
def test_bf16_paged_parity(D, S, M, causal):
    """bf16 tensor-core products (never run by the interpreter), GQA, jitter, shifts,
    partial pages, a -1 entry; autotuned tiles."""
    c, _ = make_case(D=D, S=S, M=M, dtype=BF16)
    run_and_check(c, BF16, causal=causal)


def test_bf16_dense_and_shift_invariance_2pow24():
    """Dense rope_attention in bf16, and the paged kernel's output unchanged (1e-3 relative)
    when every position moves by 2^24 frames, with the MUFU trig."""
    c, _ = make_case(B=1, N=70, D=128, S=32, P=6, M=5, dtype=BF16)
    o1, _ = run_and_check(c, BF16)
    c2 = dict(c, q_pos=c["q_pos"].clone(), cache_pos=c["cache_pos"].clone())
    c2["q_pos"][..., 0] += 2**24
    c2["cache_pos"][..., 0] += 2**24
    o2, _ = _call(lk.paged_attention, _cast(c2, BF16))
    assert max_err(o1, o2.cpu()) / o1.abs().max().item() < 1e-3
    q, k, v = (torch.randn(1, 90, 4, 64, dtype=BF16, device="cuda") for _ in range(3))
    pos = torch.randint(0, 30, (1, 90, 3), device="cuda")
    table = lk.rope_frequencies(64, 4, jitter_sigma=0.8)
    out = lk.rope_attention(q, k, v, pos, pos, table, causal=True, backend="triton")
    ref = lk.rope_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), pos.cpu(),
                            pos.cpu(), table, causal=True, backend="torch")
    lo = lk.rope_attention(q.cpu(), k.cpu(), v.cpu(), pos.cpu(), pos.cpu(), table, causal=True,
                           backend="torch")
    assert_close_rule(out.cpu(), lo, ref, "dense bf16")


def test_autotuned_split_kv_from_the_sm_count():
    """A short query block over a long cache: the launcher picks several split-KV parts from
    the device's SM count (never under the interpreter); the merged result obeys the parity
    rule and matches one part."""
    from lol_kernels.attention.attention_triton_split import device_sms, num_splits_for

    c, _ = make_case(B=1, N=150, Hq=4, Hkv=2, D=64, S=64, P=72, M=70, dtype=BF16)
    key_tiles = -(-70 * 64 // 64) + -(-150 // 64)
    splits = num_splits_for(-(-150 // 128) * 4, key_tiles, device_sms("cuda"))
    assert splits > 1, "the case must exercise split-KV"
    o_auto, l_auto = run_and_check(c, BF16)  # autotuned, splits from the heuristic
    o_one, l_one = run_and_check(c, BF16, config={"num_splits": 1})  # autotuned, one part
    assert max_err(l_auto, l_one) < 1e-2


@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
def test_rotate_once_and_fused_paths_bf16(causal):
    """Keys rotated once by the prologue (MUFU trig) then the plain key loop, and the fused
    path, both autotuned in bf16: each obeys the parity rule and they agree (same operands)."""
    c, _ = make_case(B=2, N=300, Hq=4, Hkv=2, D=128, S=64, P=8, M=6, dtype=BF16)
    o_once, l_once = run_and_check(c, BF16, causal=causal, config={"rope_keys": "once"})
    o_fused, l_fused = run_and_check(c, BF16, causal=causal, config={"rope_keys": "fused"})
    assert max_err(l_once, l_fused) < 1e-2


@pytest.mark.parametrize("hq,hkv", [(12, 4), (12, 12)], ids=["gqa12-4", "mha12"])
def test_fused_backward_bf16_through_autograd(hq, hkv):
    """``rope_attention(backend="triton")`` forward and fused backward in bf16 with the
    autotuner and the MUFU trig, against float64 autograd by the parity rule."""
    from test_attention_grad_triton import make_case as dense_case
    from test_attention_grad_triton import reference_grads

    c = dense_case(B=2, N=150, Nk=170, Hq=hq, Hkv=hkv, D=128)
    for causal in (False, True):
        ref64 = reference_grads(c, torch.float64, causal)
        ref_lo = reference_grads(c, BF16, causal)
        xs = [c[n].to("cuda", BF16).requires_grad_() for n in "qkv"]
        out, lse = lk.rope_attention(*xs, c["q_pos"].cuda(), c["k_pos"].cuda(), c["table"],
                                     causal=causal, backend="triton", return_lse=True)
        torch.autograd.backward([out, lse], [c["grad_out"].to("cuda", BF16),
                                             c["grad_lse"].cuda()])
        for name, x, lo, hi in zip(("dq", "dk", "dv"), xs, ref_lo, ref64):
            assert_close_rule(x.grad.cpu(), lo, hi, f"{name} causal={causal}")


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
