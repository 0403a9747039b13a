"""Public alias of :mod:`lol_model.integrations.diffusers.processor` (``apply_lol``,
``remove_lol``, ``lol_settings``, ``LolWanAttnProcessor``)."""

from .integrations.diffusers.processor import (  # noqa: F401
    BACKENDS,
    LolState,
    LolWanAttnProcessor,
    VideoGrid,
    apply_lol,
    check_wan_rope,
    lol_settings,
    remove_lol,
    self_attentions,
    video_positions,
    wan_transformers,
)
