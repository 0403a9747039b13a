"""Load Wan2.1 weights into :class:`CausalWanModel` from either key layout, with LoRA merging.

Layouts (auto-detected):

* **original** Wan / Self-Forcing / CausVid / LongLive (the model's own parameter names):
  ``blocks.i.self_attn.q``, ``blocks.i.norm3``, ``blocks.i.ffn.0``, ``head.head``, ... Trainer
  checkpoints are ``torch.load(path)["generator"]`` (or ``"generator_ema"``) with a ``model.``
  prefix on every key.
* **diffusers** ``WanTransformer3DModel``: ``blocks.i.attn1.to_q``, ``blocks.i.norm2``,
  ``blocks.i.ffn.net.0.proj``, ``proj_out``, ``condition_embedder.*``, ... as one
  ``.safetensors`` file, shards with ``diffusion_pytorch_model.safetensors.index.json``, or a
  model (or pipeline) directory.

LoRA (LongLive: rank 256 = alpha on every Linear of every block): peft-style keys
``<module>.lora_A[.<adapter>].weight`` / ``<module>.lora_B[...].weight`` (or kohya-style
``lora_down`` / ``lora_up`` with an optional ``<module>.alpha``) in either layout, from a file
(``torch.load(path)["generator_lora"]`` or safetensors) are merged at load:
``W += scale * B @ A`` with ``scale = alpha / rank`` (alpha defaults to the rank, as LongLive).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping

import torch

from .config import ModelConfig
from .files import first_line, load_tensor_file
from .model import CausalWanModel

# diffusers -> original, applied in order to each key
_DIFFUSERS_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"^blocks\.(\d+)\.(self_attn|cross_attn)\.to_out\.0\.", r"blocks.\1.\2.o."),
    (r"^blocks\.(\d+)\.(self_attn|cross_attn)\.to_([qkv])\.", r"blocks.\1.\2.\3."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]
_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", ".attn1.", ".attn2.", "ffn.net.",
                      "scale_shift_table")
_PREFIXES = ("_orig_mod.", "module.", "base_model.model.", "model.", "diffusion_model.",
             "transformer.")
_CKPT_KEYS = ("generator", "generator_ema", "model", "state_dict", "module")
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def diffusers_to_original_key(key: str) -> str:
    """Rename one diffusers ``WanTransformer3DModel`` key to the original Wan layout."""
    for pat, rep in _DIFFUSERS_TO_ORIGINAL:
        key = re.sub(pat, rep, key)
    return key


def detect_layout(keys) -> str:
    """``"diffusers"`` or ``"original"`` from the key names (prefixes already stripped)."""
    return "diffusers" if any(m in k for k in keys for m in _DIFFUSERS_MARKERS) else "original"


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes shared by every key (``model.``, ``_orig_mod.``, ...)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def to_original_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict in either layout (any wrapper prefix) -> the model's own key names."""
    sd = _strip_prefixes(sd)
    if detect_layout(sd) == "diffusers":
        sd = {diffusers_to_original_key(k): v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------- reading files
def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    return load_tensor_file(path, "weight file")


def _load_index(index_path: str) -> dict[str, torch.Tensor]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"weight index {index_path} is not a JSON object: {first_line(e)}") \
            from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' of tensor name -> shard file")
    root, sd = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        sd.update(_load_safetensors(os.path.join(root, shard)))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise ValueError(f"shards of {index_path} lack tensors listed in its weight_map: "
                         f"{_few(missing)}")
    return sd


def _torch_load(path: str):
    return load_tensor_file(path, "weight file")


def _load_torch(path: str, key: str | None) -> dict[str, torch.Tensor]:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    return _select(obj, key, str(path))


def _select(obj: Mapping, key: str | None, where: str) -> dict[str, torch.Tensor]:
    """Pick the state dict out of a trainer checkpoint (``["generator"]`` etc.)."""
    if key is not None:
        if key not in obj:
            raise ValueError(f"{where} has no entry {key!r}; top-level keys: {_few(list(obj))}")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _CKPT_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise ValueError(f"{where} is not a state dict and has none of the entries "
                             f"{list(_CKPT_KEYS)}; top-level keys: {_few(list(obj))}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {_few(bad)}")
    return dict(obj)


def read_state_dict(path, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a file or directory (see the module docstring), as stored."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for sub in ("", "transformer"):
            d = os.path.join(path, sub)
            for name in (_INDEX, "diffusion_pytorch_model.safetensors", "model.safetensors"):
                if os.path.isfile(os.path.join(d, name)):
                    return read_state_dict(os.path.join(d, name), key=key)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(files) == 1:
            return read_state_dict(os.path.join(path, files[0]), key=key)
        raise ValueError(f"{path}: no {_INDEX}, diffusion_pytorch_model.safetensors or single "
                         f".safetensors file (found {files})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".json"):
        return _load_index(path)
    if path.endswith(".safetensors"):
        sd = _load_safetensors(path)
        return _select(sd, key, path) if key is not None else sd
    return _load_torch(path, key)


# ---------------------------------------------------------------------- loading
def _few(keys, n: int = 8) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


@torch.no_grad()
def load_weights(model: CausalWanModel, path_or_state_dict, *, strict: bool = True,
                 key: str | None = None, lora=None, lora_alpha: float | None = None,
                 lora_scale: float | None = None) -> CausalWanModel:
    """Copy weights into ``model`` (layout auto-detected), optionally merging a LoRA.

    Args:
        model: the model to fill (its dtype/device are kept).
        path_or_state_dict: a state dict or a path (see :func:`read_state_dict`).
        strict: missing or unexpected keys raise ``ValueError`` naming them (shape mismatches
            always raise).
        key: entry of a trainer checkpoint to use (default: ``generator``, then
            ``generator_ema``, ``model``, ``state_dict``).
        lora, lora_alpha, lora_scale: see :func:`merge_lora`.

    Returns:
        ``model``.
    """
    sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        sd = read_state_dict(sd, key=key)
    elif key is not None or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = _select(sd, key, "state dict")
    sd = to_original_layout(sd)
    if lora is not None:
        sd = merge_lora(sd, lora, alpha=lora_alpha, scale=lora_scale)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys "
                         f"[{_few(missing)}]; unexpected keys [{_few(unexpected)}]")
    bad = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"shape mismatch (wrong preset/config?): {_few(bad, 5)}")
    for k, t in own.items():
        if k in sd:
            t.copy_(sd[k])
    return model


def _lora_state(lora, key: str | None) -> dict[str, torch.Tensor]:
    if isinstance(lora, Mapping):
        return _select(lora, key, "lora state dict") if key or not all(
            isinstance(v, torch.Tensor) for v in lora.values()) else dict(lora)
    path = os.fspath(lora)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a LoRA state dict")
    if key is None and "generator_lora" in obj:
        key = "generator_lora"
    return _select(obj, key, path) if key or not all(
        isinstance(v, torch.Tensor) for v in obj.values()) else dict(obj)


_LORA_RE = re.compile(r"^(.*)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")


def merge_lora(sd: Mapping[str, torch.Tensor], lora, *, alpha: float | None = None,
               scale: float | None = None, key: str | None = None) -> dict[str, torch.Tensor]:
    """Return ``sd`` (original layout) with ``W += scale * B @ A`` for every LoRA module.

    Args:
        sd: base weights in the original layout (:func:`to_original_layout`).
        lora: LoRA state dict or path (``.pt`` with ``["generator_lora"]``, or safetensors), in
            either layout, peft (``lora_A/lora_B``) or kohya (``lora_down/lora_up``) names.
        alpha: LoRA alpha; ``scale = alpha / rank`` (per-module ``.alpha`` tensors win).
            Default: alpha = rank, i.e. scale 1 (LongLive: rank = alpha = 256).
        scale: explicit scale, overriding alpha.
        key: entry of a checkpoint to use (default ``generator_lora`` when present).
    """
    raw = _lora_state(lora, key)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        m = _LORA_RE.match(k)
        if m:
            kind = {"lora_down": "A", "lora_up": "B"}.get(m.group(2), m.group(2)[-1])
            pairs.setdefault(m.group(1), {})[kind] = v
        elif k.endswith(".alpha"):
            pairs.setdefault(k[: -len(".alpha")], {})["alpha"] = v
        else:
            raise ValueError(f"LoRA key {k!r} is not a lora_A/lora_B (or lora_down/lora_up) "
                             f"weight or an alpha")
    # module names -> base weight names, through the same prefix stripping and renaming
    names = to_original_layout({m + ".weight": torch.empty(0) for m in pairs})
    out = dict(sd)
    for (mod, p), target in zip(pairs.items(), names, strict=True):
        if "A" not in p or "B" not in p:
            raise ValueError(f"LoRA module {mod!r} needs both lora_A and lora_B weights")
        if target not in out:
            raise ValueError(f"LoRA module {mod!r} targets {target!r}, not a model weight")
        A, B, W = p["A"].double(), p["B"].double(), out[target]
        rank = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != rank or (B.shape[0], A.shape[1]) \
                != tuple(W.shape):
            raise ValueError(f"LoRA {mod!r}: A {list(A.shape)}, B {list(B.shape)} do not fit "
                             f"{target} {list(W.shape)}")
        s = scale
        if s is None:
            a = float(p["alpha"]) if "alpha" in p else (rank if alpha is None else alpha)
            s = a / rank
        # merged in fp64, kept at least fp32 so a small delta is not rounded away in bf16
        out[target] = (W.double() + s * (B @ A)).to(torch.promote_types(W.dtype, torch.float32))
    return out


# keep these small fp32 modules in fp32 when the rest of the model is cast to 16-bit
_KEEP_FP32 = ("time_embedding", "time_projection", "modulation", "norm3", "norm_q", "norm_k")


def load_model(path, preset_or_config: str | ModelConfig = "wan-1.3b", *, lora=None,
               lora_alpha: float | None = None, lora_scale: float | None = None,
               key: str | None = None, strict: bool = True,
               dtype: torch.dtype = torch.float32, device="cpu") -> CausalWanModel:
    """Build a :class:`CausalWanModel` and load a checkpoint into it (see :func:`load_weights`).

    The model is built (on the meta device when ``strict``), filled, cast to ``dtype`` (with the
    time embedding, modulation tables and norm weights kept in fp32 for 16-bit dtypes, as
    diffusers does), moved to ``device`` and put in eval mode with gradients off.
    """
    cfg = ModelConfig.preset(preset_or_config) if isinstance(preset_or_config, str) \
        else preset_or_config
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"preset_or_config must be a preset name or a ModelConfig, got "
                        f"{type(preset_or_config).__name__}")
    # strict: every parameter is loaded, so skip the random init (meta, then empty storage);
    # otherwise missing parameters keep their random init
    with torch.device("meta" if strict else "cpu"):
        model = CausalWanModel(cfg)
    if strict:
        model.to_empty(device="cpu")
    load_weights(model, path, key=key, strict=strict, lora=lora, lora_alpha=lora_alpha,
                 lora_scale=lora_scale)
    half = dtype in (torch.float16, torch.bfloat16)
    for name, p in model.named_parameters():
        keep = half and any(part in _KEEP_FP32 for part in name.split("."))
        p.data = p.data.to(device=device, dtype=torch.float32 if keep else dtype)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the state dict"
        warnings.warn(f"{where}: NaN or inf in {len(bad)} weight tensor(s) ({_few(bad, 4)}); "
                      f"the stream will stop at its first block", stacklevel=2)
    return model.eval().requires_grad_(False)
