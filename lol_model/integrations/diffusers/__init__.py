"""LoL in diffusers: :func:`apply_lol` / :func:`remove_lol` put LoL's jittered RoPE attention
on every self-attention of a diffusers Wan transformer (:mod:`.processor`), and
:class:`LolStreamingPipeline` streams from a diffusers Wan folder or pipeline (:mod:`.pipeline`).

The public aliases :mod:`lol_model.diffusers` and :mod:`lol_model.pipeline` name the same
objects.
"""

from .pipeline import LolStreamingPipeline
from .processor import (
    LolState,
    LolWanAttnProcessor,
    VideoGrid,
    apply_lol,
    lol_settings,
    remove_lol,
    video_positions,
)

__all__ = ["LolState", "LolStreamingPipeline", "LolWanAttnProcessor", "VideoGrid", "apply_lol",
           "lol_settings", "remove_lol", "video_positions"]
