"""Paged sink + window attention with RoPE applied to un-rotated keys at read time."""

from .._dispatch import triton_available
from .attention_cpu import paged_attention_torch, rope_attention_torch
from .paged_attention_op import paged_attention, validate_paged_inputs
from .reference import gather_keys, paged_attention_reference
from .rope_attention_op import rope_attention

__all__ = ["gather_keys", "paged_attention", "paged_attention_reference", "paged_attention_torch",
           "rope_attention", "rope_attention_torch", "triton_available", "validate_paged_inputs"]
