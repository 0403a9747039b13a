"""The GPU-only branch of every Triton kernel, run whenever a CUDA GPU is present (skipped
elsewhere): the kernels are compiled, not interpreted, and take the MUFU sin/cos branch
(``FAST_TRIG``) instead of the interpreter's portable polynomials."""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the kernels are compiled only on one (elsewhere they run in the "
           "interpreter)")


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
