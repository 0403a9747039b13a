"""The GPU-only branches of the attention kernels, run whenever a CUDA GPU is present (skipped
elsewhere). Under the interpreter the kernels take the portable polynomials instead of the MUFU
sin/cos (``FAST_TRIG``), products in fp16/fp32 only (its bf16 ``tl.dot`` is wrong), fixed tiles
instead of the autotuner, and one split-KV part (``num_splits_for`` needs the SM count). Here
each of those runs on the GPU against the float64 reference:

* the MUFU fast trig in the paged kernel at positions moved by 2^24;
* bf16 tensor-core products (paged and dense attention);
* autotuned launches whose split-KV part count comes from the device's SM count;
* the rotate-once prologue and key loop next to the fused path, bf16, autotuned;
* the fused Triton backward of ``rope_attention`` in bf16, autotuned, through autograd.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the fast-trig, bf16-product and autotuned split-KV branches need "
           "one (the interpreter covers the rest)")

import lol_kernels as lk  # noqa: E402
from tests.support import assert_close_rule, max_err  # noqa: E402
from tests.support.triton_cases import (  # noqa: E402
    call_paged,
    cast_case,
    make_case,
    run_and_check,
)
from tests.support.triton_grad_cases import make_case as dense_case  # noqa: E402
from tests.support.triton_grad_cases import reference_grads  # noqa: E402

BF16 = torch.bfloat16


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
    o2, _ = call_paged(lk.paged_attention, cast_case(c2, BF16))
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
