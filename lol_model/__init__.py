"""lol_model: a thin Wan2.1 streaming video generator on top of lol_kernels.

Layers, each a subpackage that imports only the ones below it (docs/design.md §2)::

    cli/            the ``lol`` command (nothing imports it)
    training, parallel/, integrations/diffusers/
    streaming/      settings, cache presets, sampler, the stream, outputs, checkpoints, driver
    model/          config, transformer, weights, text encoder, VAE
    errors          exceptions and one-line failure texts

The names below load on first use, so that ``lol`` starts (and a Ctrl-C while torch loads is
handled by :func:`lol_model.cli.main`) before torch is imported.
"""

import importlib

_NAMES = {"PRESETS": "model.config", "ModelConfig": "model.config",
          "CausalWanModel": "model.transformer", "TextKV": "model.transformer",
          "load_model": "model.weights", "load_weights": "model.weights",
          "training_forward": "training", "training_loss": "training",
          "StreamSettings": "streaming.settings", "new_stream": "streaming.stream",
          "run": "streaming.driver", "run_to_outputs": "streaming.driver",
          "LolStreamingPipeline": "integrations.diffusers.pipeline",
          "apply_lol": "integrations.diffusers.processor",
          "remove_lol": "integrations.diffusers.processor"}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
