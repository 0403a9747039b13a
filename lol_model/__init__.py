"""lol_model: a thin Wan2.1 streaming video generator on top of lol_kernels."""

from .config import PRESETS, ModelConfig
from .model import CausalWanModel, TextKV
from .weights import load_model, load_weights

__all__ = ["PRESETS", "CausalWanModel", "ModelConfig", "TextKV", "load_model", "load_weights"]
