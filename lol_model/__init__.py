"""lol_model: a thin Wan2.1 streaming video generator on top of lol_kernels.

The names below load on first use, so that ``lol`` starts (and a Ctrl-C while torch loads is
handled by :func:`lol_model.cli.main`) before torch is imported.
"""

import importlib

_NAMES = {"PRESETS": "config", "ModelConfig": "config", "CausalWanModel": "model",
          "TextKV": "model", "load_model": "weights", "load_weights": "weights",
          "training_forward": "train", "training_loss": "train"}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
