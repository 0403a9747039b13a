"""Mixture of Contexts: the chunk router (C++/CUDA in csrc/moc, torch reference)."""

from .reference import moc_route_reference, moc_scores_reference
from .route import ExtensionFallbackWarning, extension_error, extension_has_cuda, moc_route

__all__ = ["ExtensionFallbackWarning", "extension_error", "extension_has_cuda", "moc_route",
           "moc_route_reference", "moc_scores_reference"]
