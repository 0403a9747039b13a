"""The networks: model presets (:mod:`.config`), the causal Wan transformer
(:mod:`.transformer`), weight loading in every upstream layout (:mod:`.weights`,
:mod:`.tensor_files`), the umT5 text encoder (:mod:`.text`) and the Wan VAE with its streaming
decoder (:mod:`.vae`). Imports only :mod:`lol_model.errors` of the project."""

from .config import PRESETS, ModelConfig
from .transformer import CausalWanModel, TextKV
from .weights import load_model, load_weights

__all__ = ["PRESETS", "CausalWanModel", "ModelConfig", "TextKV", "load_model", "load_weights"]
