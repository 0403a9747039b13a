"""Checkpoints as the trainers and tools around Wan write them: the original Wan key layout
from diffusers keys (:func:`to_original`, by a rename table written independently of
``lol_model.model.weights``), a Self-Forcing / LongLive trainer checkpoint
(:func:`trainer_checkpoint`), peft LoRAs and their merge by hand (:func:`peft_lora`,
:func:`hand_merge`), and a tiny-preset checkpoint with a poisoned entry (:func:`tiny_weights`)."""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel

# the Wan <-> diffusers rename table, written out independently of lol_model.model.weights
DESIGN_TABLE = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    (".attn1.to_out.0.", ".self_attn.o."),
    (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."),
    (".attn1.", ".self_attn."),
    (".attn2.to_", ".cross_attn."),
    (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
]


def to_original(diffusers_sd):
    """diffusers keys -> original Wan keys, one table entry at most per key part."""
    out = {}
    for k, v in diffusers_sd.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.endswith(".scale_shift_table"):
            k = k.replace(".scale_shift_table", ".modulation")
        else:
            for a, b in DESIGN_TABLE:
                if a in k:
                    k = k.replace(a, b)
                    break
        out[k] = v.clone()
    return out


def shifted(sd, by):
    """Other weights of the same shapes (EMA, critic): distinguishable from ``sd``."""
    return {k: v + by for k, v in sd.items()}


def fsdp_name(k):
    """A key as an FSDP-wrapped trainer names it (EMA_FSDP of LongLive / Self-Forcing): the
    wrapper's ``model.`` and an ``_fsdp_wrapped_module.`` (+ activation checkpointing) inside
    each block."""
    m = re.match(r"^(blocks\.\d+\.)(.*)$", k)
    inner = f"{m.group(1)}_fsdp_wrapped_module._checkpoint_wrapped_module.{m.group(2)}" if m \
        else k
    return "model." + inner


def peft_lora(model, rank, names, prefix="base_model.model.", dtype=torch.float32):
    return {f"{prefix}{n}.{ab}.weight": (torch.randn(rank if ab == "lora_A" else out,
                                                     inp if ab == "lora_A" else rank) * 0.1
                                         ).to(dtype)
            for n in names for ab in ("lora_A", "lora_B")
            for out, inp in [model.get_submodule(n).weight.shape]}


def hand_merge(orig, lora, scale, prefix="base_model.model."):
    """``W + scale * B @ A`` for every module of a peft LoRA (fp64, as LongLive's peft forward
    computes ``base(x) + scale * B(A(x))`` once merged)."""
    out = dict(orig)
    for k in lora:
        if ".lora_A." in k:
            n = k[len(prefix):].replace(".lora_A.weight", "")
            A, B = lora[k].double(), lora[k.replace("lora_A", "lora_B")].double()
            s = scale(n, A.shape[0]) if callable(scale) else scale
            out[n + ".weight"] = (orig[n + ".weight"].double() + s * B @ A).float()
    return out


def trainer_checkpoint(d, orig):
    """A Self-Forcing / LongLive trainer checkpoint: generator, critic, EMA, step."""
    ema = shifted(orig, 0.25)
    torch.save({"generator": {"model." + k: v for k, v in orig.items()},
                "critic": {"model." + k: v for k, v in shifted(orig, -1.0).items()},
                "generator_ema": {fsdp_name(k): v for k, v in ema.items()}, "step": 7},
               d / "sf.pt")
    return d / "sf.pt", ema


def tiny_weights(path, *, poison: str | None = None, value=float("nan")) -> str:
    """A tiny-preset checkpoint; ``poison``: a parameter name whose first entry is ``value``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sd = CausalWanModel(ModelConfig.preset("tiny")).state_dict()
    sd = {k: v.clone().contiguous() for k, v in sd.items()}
    if poison is not None:
        sd[poison].view(-1)[0] = value
    save_file(sd, str(path))
    return str(path)
