"""Paged sink + window attention with RoPE applied to un-rotated keys at read time."""

from .dense import rope_attention
from .op import paged_attention, triton_available, validate_paged_inputs
from .reference import gather_keys, paged_attention_reference, paged_attention_torch

__all__ = ["gather_keys", "paged_attention", "paged_attention_reference", "paged_attention_torch",
           "rope_attention", "triton_available", "validate_paged_inputs"]
