"""Triton paged RoPE attention against the float64 reference, in the interpreter.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1``, set below before any
kernel module is imported (the variable is read when ``@triton.jit`` decorates, so it stays set
for the rest of the session; every Triton test file on a CPU machine needs it anyway). bf16 is
not tested here: ``tl.dot`` on bf16 is wrong under the interpreter (docs/design.md §8); the sm_90
compile in ``tests/kernels/common/test_triton_aot.py`` covers it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the first @triton.jit decoration

import pytest

import lol_kernels as lk
from lol_kernels.attention import attention_triton as tk
from lol_kernels.common.triton_utils import is_interpreted
from tests.support import max_err
from tests.support.host_syncs import count_syncs
from tests.support.triton_cases import call_paged, cast_case, make_case, run_and_check

T12H = 172_800  # latent frames in 12 h of video


def test_kernel_runs_here():
    """The kernel is interpreted on a CPU-only machine (else every call below would fail)."""
    assert torch.cuda.is_available() or is_interpreted(tk.paged_rope_attn_fwd)


@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
@pytest.mark.parametrize("D,S,M", [(64, 16, 5), (128, 64, 3)], ids=["D64-S16", "D128-S64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_parity_gqa_jitter_shift(dtype, D, S, M, causal):
    """GQA 4/2, jitter, shuffled partial pages, a -1 entry, page_shift, new keys; N = 45 is
    not a multiple of the 32-row tile; S = 16 < BLOCK_N (tiles span pages) and S = 64 > it."""
    c, dt = make_case(D=D, S=S, M=M, dtype=dtype)
    run_and_check(c, dt, causal=causal)


@pytest.mark.parametrize("config", [{"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 64,
                                                                     "BLOCK_N": 64}],
                         ids=["tiles16", "tiles64"])
def test_parity_no_jitter_cache_only(config):
    """No jitter, no page_shift, no new keys: the plain sink + window read, other tile sizes."""
    c, dt = make_case(B=1, N=37, Hq=6, Hkv=2, sigma=0.0, new=False, shift=False, S=32, P=6,
                      M=4)
    run_and_check(c, dt, config=config)


def test_parity_no_gqa_fp32_causal():
    c, dt = make_case(B=1, N=33, Hq=2, Hkv=2, dtype=torch.float32, S=16, M=3, P=4)
    run_and_check(c, dt, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_absolute_12h_sink_at_zero(dtype):
    """Absolute policy after 12 h: sink keys at t = 0, window keys and queries near 172,800.
    The kernel must match the float64-angle reference (the fp32 ``pos * omega`` would not)."""
    c, dt = make_case(B=1, N=40, Hq=4, Hkv=2, D=64, S=16, P=6, M=6, dtype=dtype,
                      shift=False, empty=False, q_base=T12H)
    c["page_table"] = torch.arange(6, dtype=torch.int32).view(1, 6)
    c["cache_pos"][2:, :, 0] += T12H - 80  # pages 0, 1: sink at t < 64; pages 2..5: window
    run_and_check(c, dt)


def test_relativistic_rebase_by_page_shift():
    """Block-relativistic policy: pages stored at hour-scale positions, re-based to a small
    window by a large negative ``page_shift``; queries at small positions."""
    c, dt = make_case(B=2, N=30, D=64, S=16, dtype=torch.float16, k_base=1_000_000)
    c["page_shift"][..., 0] -= 1_000_000
    run_and_check(c, dt, causal=True)


def test_shift_invariance_2pow24():
    """Shifting every position by 2^24 changes the output by < 1e-3 relative
    (docs/design.md §5)."""
    c, dt = make_case(B=1, N=35, D=128, S=32, P=5, M=4, dtype=torch.float32)
    o1, l1 = run_and_check(c, dt)
    c2 = dict(c)
    c2["q_pos"] = c["q_pos"].clone()
    c2["cache_pos"] = c["cache_pos"].clone()
    c2["q_pos"][..., 0] += 2**24
    c2["cache_pos"][..., 0] += 2**24
    o2, l2 = call_paged(tk.paged_attention_triton, cast_case(c2, dt))
    rel = max_err(o1, o2.cpu()) / o1.abs().max().item()
    assert rel < 1e-3, rel
    assert max_err(l1, l2.cpu()) < 1e-3


def test_rows_without_keys_give_zero_and_neg_inf():
    """Batch row 1 has only empty entries and there are no new keys: out 0, lse -inf there."""
    c, dt = make_case(B=2, N=20, new=False, dtype=torch.float32)
    c["page_table"][1] = -1
    o, l = run_and_check(c, dt)
    assert (o[1] == 0).all() and torch.isneginf(l[1]).all()
    assert torch.isfinite(l[0]).all()


def test_public_op_dispatches_to_triton():
    """lk.paged_attention(backend="triton") goes through the custom op to this kernel."""
    c, dt = make_case(B=1, N=20, dtype=torch.float16)
    cd = cast_case(c, dt)
    o1, l1 = call_paged(lk.paged_attention, cd, backend="triton")
    o2, l2 = call_paged(tk.paged_attention_triton, cd)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_autotune_key_has_no_token_counts():
    """Per-block token counts (and strides that scale with them) never force a recompile or a
    re-tune: they are outside the autotune key and not specialized by the JIT."""
    from lol_kernels.common.aot import compiled_module
    from lol_kernels.common.triton_attention import AUTOTUNE_KEY

    counts = {"N", "N_new", "M"}
    assert not counts & set(AUTOTUNE_KEY)
    fn = compiled_module("lol_kernels.attention.attention_triton").paged_rope_attn_fwd
    nospec = {p.name for p in fn.params if p.do_not_specialize}
    assert counts | {"stride_qpb", "stride_npb", "stride_lb", "stride_lh"} <= nospec


def test_config_pruning():
    """The autotune list offered per dtype and head dim (one shared-memory estimate, sm_90's
    227 KiB without a device): fp16/bf16 keep every config up to D = 128 and the two that
    spill least at D = 256; fp32 keeps narrow key tiles; fp32 at D = 256 fits nowhere and is
    refused before any launch (a ValueError naming shared memory, not OutOfResources)."""
    from lol_kernels.common import triton_attention as ta
    cfgs = ta.autotune_configs()
    half = ta.prune_configs(cfgs, {}, Q=torch.empty(1, dtype=torch.float16), HEAD_DIM=128)
    assert len(half) == len(ta.CONFIGS)
    fp32 = ta.prune_configs(cfgs, {}, Q=torch.empty(1), HEAD_DIM=64)
    assert fp32 and all(c.kwargs["BLOCK_N"] <= 32 for c in fp32)
    wide = ta.prune_configs(cfgs, {}, Q=torch.empty(1, dtype=torch.bfloat16), HEAD_DIM=256)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in wide] == \
        [(128, 32, 8), (64, 64, 8)]  # narrow key tiles, or a 64-word accumulator
    with pytest.raises(ValueError, match="shared memory"):
        ta.prune_configs(cfgs, {}, Q=torch.empty(1), HEAD_DIM=256)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # every offered config fits
        for d in (16, 32, 64, 128, 256):
            for bm, bn, _, st in ta.offered_configs(dtype, d):
                assert ta.shared_memory_bytes(bm, bn, st, d, dtype.itemsize) \
                    <= ta.SM90_SHARED_MEMORY


def test_one_fp32_dot_precision_in_both_kernels():
    """The paged and MoC launchers take DOT_PREC from ``launch_constants`` (``dot_precision``:
    3xTF32 tensor-core products for fp32, never "ieee" FMA products); no kernel file sets a
    precision of its own. The sm_90 compile shows HGMMA in both at fp32 (test_triton_aot)."""
    import inspect

    from lol_kernels.common import triton_attention as ta
    from lol_kernels.moc import moc_attention_triton as mt

    assert ta.dot_precision(torch.float32) == "tf32x3"
    for mod in (tk, mt):
        src = inspect.getsource(mod)
        assert "ta.launch_constants(" in src and "input_precision" not in src, mod.__name__
        assert "ieee" not in src and "tf32" not in src, mod.__name__


REFUSED = [(torch.float32, 256)]  # every (dtype, D) the kernels take but no config fits


def test_refused_inputs_are_exactly_fp32_d256():
    from lol_kernels.common import triton_attention as ta
    refused = [(dt, d) for dt in (torch.float16, torch.bfloat16, torch.float32)
               for d in (16, 32, 64, 128, 256) if ta.launch_refusal(dt, d) is not None]
    assert refused == REFUSED
    assert "394660 bytes" in ta.launch_refusal(torch.float32, 256)


@pytest.mark.parametrize("op", ["paged", "dense"])
def test_unlaunchable_input_runs_torch_path_with_warning(op):
    """fp32 at D = 256 with backend="triton": one KernelFallbackWarning, the torch path's
    result; the Triton kernel is never launched."""
    from lol_kernels.common import triton_attention as ta
    c, dt = make_case(B=1, N=20, Hq=2, Hkv=1, D=256, S=16, P=4, M=3, dtype=torch.float32)
    cd = cast_case(c, dt)
    ta.warn_kernel_fallback.cache_clear()

    def call(backend):
        if op == "paged":
            return call_paged(lk.paged_attention, cd, backend=backend)
        k = cd["k_new"]
        return lk.rope_attention(cd["q"], k, cd["v_new"], cd["q_pos"], cd["q_pos"], cd["table"],
                                 return_lse=True, backend=backend)
    with pytest.warns(ta.KernelFallbackWarning, match="shared memory"):
        o1, l1 = call("triton")
    o2, l2 = call("torch")
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("growth", [0.6, 4.0], ids=["stale-max", "max-moves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_running_max_rises_across_tiles(dtype, growth):
    """Key norms grow page by page, so each key tile raises the row max: by less than the lazy
    rescale's slack (``stale-max``: the old max is kept, p > 1) or by far more (``max-moves``:
    the accumulator is rescaled on most tiles). Pages visited in order, 16-key tiles."""
    c, dt = make_case(B=1, N=20, Hq=2, Hkv=2, D=64, S=16, P=8, M=8, dtype=dtype, shift=False,
                      empty=False, new=False, sigma=0.0)
    c["page_table"] = torch.arange(8, dtype=torch.int32).view(1, 8)
    c["page_len"][:] = 16
    scale = (1.0 + growth * torch.arange(8.0)).view(8, 1, 1, 1)
    c["cache_k"] = c["cache_k"] * scale
    c["q"] = c["q"].abs()  # queries aligned with the growing keys: the growth shows in q.k
    c["cache_k"] = c["cache_k"].abs()
    run_and_check(c, dt, config={"BLOCK_M": 16, "BLOCK_N": 16})


@pytest.mark.parametrize("causal", [False, True], ids=["block", "causal"])
@pytest.mark.parametrize("splits", [2, 7])
def test_split_kv_parts_merge_to_the_same_result(splits, causal):
    """Split-KV: each program's key tiles (cached, then the block's own) cut in ``splits``
    parts, merged by the combine kernel. 7 parts leave some parts with no tile at all (their
    lse is -inf and weighs nothing); causal tiles have different tile counts per query tile."""
    c, dt = make_case(B=2, N=45, Hq=2, Hkv=1, D=32, S=16, M=5, dtype=torch.float32)
    o1, l1 = run_and_check(c, dt, causal=causal, config={"num_splits": splits})
    o0, l0 = call_paged(tk.paged_attention_triton, cast_case(c, dt), causal=causal)
    assert max_err(o1, o0.cpu()) < 1e-5 and max_err(l1, l0.cpu()) < 1e-5


def test_split_kv_rows_without_keys():
    """A batch row whose entries are all empty and no new keys: every part is empty."""
    c, dt = make_case(B=2, N=20, new=False, dtype=torch.float32)
    c["page_table"][1] = -1
    o, l = run_and_check(c, dt, config={"num_splits": 3})
    assert (o[1] == 0).all() and torch.isneginf(l[1]).all()


def test_num_splits_heuristic():
    """Wave-filling split counts: the Wan block (444 programs of M = 128 on 132 SMs, 3.36
    waves) -> 2 parts (0.84 -> 0.96); one latent frame (156 programs, 1.18 waves) -> 5;
    a grid of whole waves or a short key range -> 1; no GPU -> 1."""
    from lol_kernels.attention.attention_triton_split import num_splits_for
    assert num_splits_for(444, 293 + 74, 132) == 2
    assert num_splits_for(156, 293 + 25, 132) == 5
    assert num_splits_for(264, 300, 132) == 1
    assert num_splits_for(156, 12, 132) == 1
    assert num_splits_for(444, 300, 0) == 1


# ---------------------------------------------------------------------------------------------
# rotate once per call: keys rotated and packed by a prologue, a plain key loop
# ---------------------------------------------------------------------------------------------

ONCE_CASES = {
    "gqa-jitter-shift-S16-causal": (dict(D=64, S=16, M=5), True, None),
    "S64-split3": (dict(B=1, N=45, Hq=2, Hkv=1, D=32, S=64, M=3), False, {"num_splits": 3}),
    "tiles16-cache-only": (dict(B=1, N=20, Hq=2, Hkv=2, D=32, S=16, P=4, M=3, new=False,
                                shift=False), False, {"BLOCK_M": 16, "BLOCK_N": 16}),
}


@pytest.mark.parametrize("case", list(ONCE_CASES), ids=list(ONCE_CASES))
def test_rotate_once_parity_and_matches_fused(case):
    """The rotate-once path against the float64 reference (docs/design.md §5 rule, NaN-filled
    outputs) and against the fused path: the same rotated key operands, so the two differ
    only by the softmax's summation order (one fp16 rounding of the output)."""
    kw, causal, cfg = ONCE_CASES[case]
    c, dt = make_case(dtype=torch.float16, **kw)
    cfg = cfg or {}
    o1, l1 = run_and_check(c, dt, causal=causal, config={**cfg, "rope_keys": "once"})
    o2, l2 = call_paged(tk.paged_attention_triton, cast_case(c, dt), causal=causal,
                   config={**cfg, "rope_keys": "fused"})
    assert max_err(o1, o2.cpu()) <= 2e-3 and max_err(l1, l2.cpu()) <= 1e-5


def test_rotate_once_shift_invariance_2pow24_and_empty_rows():
    """fp32, every position shifted by 2^24: < 1e-3 relative change (docs/design.md §5); a
    batch row whose entries are all empty gets out 0, lse -inf."""
    c, dt = make_case(B=2, N=35, Hq=2, Hkv=1, D=128, S=32, P=5, M=4, dtype=torch.float32,
                      new=False)
    c["page_table"][1] = -1
    cfg = {"rope_keys": "once"}
    o1, l1 = run_and_check(c, dt, config=cfg)
    assert (o1[1] == 0).all() and torch.isneginf(l1[1]).all()
    c2 = dict(c, q_pos=c["q_pos"].clone(), cache_pos=c["cache_pos"].clone())
    c2["q_pos"][..., 0] += 2**24
    c2["cache_pos"][..., 0] += 2**24
    o2, l2 = call_paged(tk.paged_attention_triton, cast_case(c2, dt), config=cfg)
    assert max_err(o1, o2.cpu()) / o1.abs().max().item() < 1e-3
    assert max_err(l1[0], l2[0].cpu()) < 1e-3


def test_rotate_once_dense_rope_attention():
    """rope_attention (no cache: only the block's own keys, N_new != N) on the rotate-once
    path equals the fused path up to one fp16 rounding."""
    from lol_kernels.attention.attention_triton import rope_attention_triton
    c, dt = make_case(B=1, N=24, Hq=2, Hkv=1, D=32, dtype=torch.float16)
    cd = cast_case(c, dt)
    k, v, kpos = cd["k_new"][:, :17], cd["v_new"][:, :17], cd["q_pos"][:, 5:22]
    outs = [rope_attention_triton(cd["q"], k, v, cd["q_pos"], kpos, cd["table"], causal=True,
                                  config={"rope_keys": p}) for p in ("once", "fused")]
    assert max_err(outs[0][0], outs[1][0]) <= 2e-3
    assert max_err(outs[0][1], outs[1][1]) <= 1e-5


def test_rope_keys_policy():
    """auto: rotate once when more than one 128-query tile reads every key and the scratch
    fits; fused for one query tile (each key tile read once anyway) or a huge scratch; any
    other value is refused naming the option."""
    from lol_kernels.attention.attention_triton_rotate import SCRATCH_LIMIT, choose_rope_keys
    assert choose_rope_keys("auto", 4680, 1, 12, 19200 + 4736, 128, 2) == "once"
    assert choose_rope_keys("auto", 128, 1, 12, 19200, 128, 2) == "fused"
    assert choose_rope_keys("auto", 4680, 1, 12, SCRATCH_LIMIT, 128, 2) == "fused"
    assert choose_rope_keys("fused", 4680, 1, 12, 19200, 128, 2) == "fused"
    assert choose_rope_keys("once", 8, 1, 12, 19200, 128, 2) == "once"
    with pytest.raises(ValueError, match="rope_keys"):
        choose_rope_keys("twice", 8, 1, 1, 1, 16, 2)


def test_rotated_kernel_token_counts_not_specialized():
    """Token counts and strides that scale with them stay runtime scalars in both
    rotate-once kernels (no recompile per block)."""
    from lol_kernels.common.aot import compiled_module
    mod = compiled_module("lol_kernels.attention.attention_triton_rotate")
    for fn, names in ((mod.paged_attn_rotated_fwd, {"N", "N_new", "M", "stride_rb",
                                                    "stride_wb", "stride_lb"}),
                      (mod.rotate_keys_fwd, {"M", "N_new", "Lc", "stride_rb", "stride_rob"})):
        assert names <= {p.name for p in fn.params if p.do_not_specialize}, fn


def test_rotate_once_makes_no_host_sync():
    """The rotate-once launch (packed-row offsets, scratch, two kernels) reads no tensor value
    on the host (the counter of tests/support/host_syncs.py), so a block step stays capturable."""
    c, dt = make_case(B=1, N=20, Hq=2, Hkv=1, D=32, S=16, P=4, M=3, dtype=torch.float32)
    cd = cast_case(c, dt)
    _, counter = count_syncs(call_paged, tk.paged_attention_triton, cd,
                             config={"rope_keys": "once"})
    assert counter.total == 0, dict(counter.events)
