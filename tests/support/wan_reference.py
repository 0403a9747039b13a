"""diffusers' ``WanTransformer3DModel`` as the reference of ``CausalWanModel``: a random one of
any of our configs (:func:`diffusers_model`), and a context in which an fp64 one really
computes in fp64 (:func:`fp64_diffusers`)."""

import contextlib
import math

import torch
from diffusers import WanTransformer3DModel
from diffusers.models import embeddings

from lol_model.model.config import ModelConfig


@contextlib.contextmanager
def fp64_diffusers():
    """diffusers casts to fp32 with ``.float()`` in its norms, RoPE table and modulation even in
    an fp64 model (about 1e-7 relative error), and builds its timestep frequency table in fp32
    (about 1e-6); inside this context ``.float()`` leaves fp64 tensors alone and the table of
    fp64 timesteps is fp64, so an fp64 diffusers model really computes in fp64."""
    orig = torch.Tensor.float
    orig_table = embeddings.get_timestep_embedding

    def keep64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig(self, *args, **kwargs)

    def table64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1,
                scale=1, max_period=10000):
        if timesteps.dtype != torch.float64:
            return orig_table(timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift,
                              scale, max_period)
        # diffusers' formula, exp(-ln(max_period) i / (half - shift)), evaluated in fp64
        half = embedding_dim // 2
        i = torch.arange(half, dtype=torch.float64, device=timesteps.device)
        ang = scale * timesteps[:, None] * torch.exp(-math.log(max_period) * i
                                                     / (half - downscale_freq_shift))
        parts = [ang.cos(), ang.sin()] if flip_sin_to_cos else [ang.sin(), ang.cos()]
        return torch.cat(parts, dim=-1)

    torch.Tensor.float = keep64
    embeddings.get_timestep_embedding = table64
    try:
        yield
    finally:
        torch.Tensor.float = orig
        embeddings.get_timestep_embedding = orig_table


def diffusers_model(cfg: ModelConfig, dtype) -> WanTransformer3DModel:
    """A random diffusers model of ``cfg``; every parameter drawn from N(0, 0.2^2)."""
    ctx = fp64_diffusers() if dtype == torch.float64 else contextlib.nullcontext()
    with ctx:  # the RoPE buffers are made at construction
        ref = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
            qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024)
    ref = ref.to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref.eval()
