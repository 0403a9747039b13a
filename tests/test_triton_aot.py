"""Ahead-of-time sm_90 compile of the Triton kernels (docs/design.md §5), no GPU needed.

Every config the paged-attention autotuner may pick, in fp16 and bf16 at D = 64 and 128 (and
the narrow ones it keeps for fp32 inputs at D = 64), the apply_rope kernel and the split-KV
merge kernel go through ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``; the
cubin is read with the ``cuobjdump`` shipped in the triton wheel: no stack or local memory
(no spills, no local arrays from libdevice trig) and tensor-core ``HGMMA`` for the attention
products. The kernel module is imported afresh with ``TRITON_INTERPRET=0``, so this works in a
session whose other tests run the kernels in the interpreter. About 2 minutes on 2 cores.
"""

import os

import pytest

from lol_kernels.common import aot
from lol_kernels.common.triton_attention import CONFIGS

pytestmark = pytest.mark.skipif(not os.path.exists(aot.tool("cuobjdump")),
                                reason="triton wheel without the NVIDIA backend binaries")


@pytest.fixture(scope="module")
def report():
    return aot.sm90_report(("fp16", "bf16"), (64, 128), rope=True, fp32_d64=True)


def _name(r):
    cfg = (f"M{r['BLOCK_M']}-N{r['BLOCK_N']}-w{r['num_warps']}-s{r['num_stages']}"
           if "BLOCK_M" in r else f"R{r['BLOCK_R']}")
    return f"{r['kernel']}[{r['dtype']}-D{r['head_dim']}-{cfg}]"


def test_every_config_compiles_for_sm90(report):
    attn = [r for r in report if r["kernel"] == "paged_rope_attn_fwd" and r["dtype"] != "fp32"]
    assert len(attn) == 2 * 2 * len(CONFIGS)
    assert any(r["dtype"] == "fp32" for r in report)  # the 3xTF32 configs kept for fp32 at D=64
    assert {r["kernel"] for r in report} == {"paged_rope_attn_fwd", "apply_rope_fwd",
                                             "combine_splits"}


def test_no_spills_no_local_memory(report):
    bad = [f"{_name(r)}: stack {r['stack']} B, local {r['local']} B, {r['local_ldst']} LDL/STL"
           for r in report if r["stack"] or r["local"] or r["local_ldst"]]
    assert not bad, "\n".join(bad)


def test_attention_uses_hgmma_and_no_calls(report):
    for r in report:
        assert r["calls"] == 0, f"{_name(r)} calls a function (libdevice slow path?)"
        assert r["registers"] <= 255
        if r["kernel"] == "paged_rope_attn_fwd":
            assert r["hgmma"] > 0, f"{_name(r)} has no HGMMA"
            assert r["shared"] <= 232448, f"{_name(r)} needs {r['shared']} B of shared memory"
