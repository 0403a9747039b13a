"""Public alias of :mod:`lol_model.integrations.diffusers.pipeline` (``LolStreamingPipeline``)."""

from .integrations.diffusers.pipeline import (  # noqa: F401
    COMPONENTS,
    OUTPUT_TYPES,
    WAN_TEXT_LEN,
    LolStreamingPipeline,
    check_folder,
    load_folder_encoders,
    model_config,
    read_transformer_config,
)
