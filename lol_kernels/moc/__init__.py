"""Mixture of Contexts: the chunk router (C++/CUDA in csrc/moc, torch reference) and the
block-sparse attention over routed chunks (reference, CPU path, Triton)."""

from .moc_attention_cpu import moc_attention_torch
from .moc_attention_op import moc_attention, moc_route_tiles, tile_means
from .moc_route_op import ExtensionFallbackWarning, extension_error, extension_has_cuda, moc_route
from .reference import moc_attention_reference, moc_route_reference, moc_scores_reference

__all__ = ["ExtensionFallbackWarning", "extension_error", "extension_has_cuda", "moc_route",
           "moc_route_reference", "moc_scores_reference"]
__all__ += ["moc_attention", "moc_attention_reference", "moc_attention_torch", "moc_route_tiles",
            "tile_means"]
