"""Triton building blocks shared by the kernels of every op folder, by public name.

* :mod:`.triton_rope`: exact fixed-point RoPE angles and the in-register rotation (jit);
* :mod:`.triton_attention`: the key-tile steps of the paged and MoC attention kernels (tile
  loads, rotated scores, online softmax, epilogue), their one autotune list and fp32 precision;
* :mod:`.triton_utils`: host-side launch helpers (interpreter detection, device and stride
  checks);
* :mod:`.aot`: the ahead-of-time sm_90 compile and SASS report of every kernel, no GPU needed.

The submodules are imported where they are used, so ``import lol_kernels`` imports no Triton.
"""
