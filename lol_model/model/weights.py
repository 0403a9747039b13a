"""Load Wan2.1 weights into :class:`CausalWanModel` from either key layout, with LoRA merging.

Layouts (auto-detected):

* **original** Wan / Self-Forcing / CausVid / LongLive (the model's own parameter names):
  ``blocks.i.self_attn.q``, ``blocks.i.norm3``, ``blocks.i.ffn.0``, ``head.head``, ... Trainer
  checkpoints (Self-Forcing, LongLive) are ``torch.load(path)["generator"]`` with a ``model.``
  prefix on every key; ``ema=True`` (CLI ``--ema``) takes ``["generator_ema"]`` instead.
* **diffusers** ``WanTransformer3DModel``: ``blocks.i.attn1.to_q``, ``blocks.i.norm2``,
  ``blocks.i.ffn.net.0.proj``, ``proj_out``, ``condition_embedder.*``, ... as one
  ``.safetensors`` file, shards with ``diffusion_pytorch_model.safetensors.index.json``, or a
  model (or pipeline) directory.

Wrapper module names are removed wherever they occur in a key: FSDP's
``_fsdp_wrapped_module.`` (nested once per wrapped layer: ``model.blocks.0._fsdp_wrapped_module.
self_attn.q.weight`` in an EMA shadow), activation checkpointing's
``_checkpoint_wrapped_module.``, ``torch.compile``'s ``_orig_mod.`` and DDP's ``module.``.

LoRA (LongLive: rank 256 = alpha on every Linear of every block): peft-style keys
``<module>.lora_A[.<adapter>].weight`` / ``<module>.lora_B[...].weight`` (or kohya-style
``lora_down`` / ``lora_up`` with an optional ``<module>.alpha``) in either layout, from a file
(``torch.load(path)["generator_lora"]`` as LongLive saves it, or safetensors) or a peft adapter
folder, are merged at load: ``W += scale * B @ A`` with ``scale = alpha / rank``. The rank is
``A``'s row count; alpha is, first to apply: the caller's ``lora_alpha`` (``--lora-alpha``), a
kohya ``.alpha`` tensor, the file's ``lora_alpha`` (peft ``adapter_config.json`` beside the
file, or diffusers' ``lora_adapter_metadata`` in the safetensors header, with their
``alpha_pattern``), else the rank (scale 1). LongLive's ``lora.pt`` carries no alpha: its
config ships alpha = rank = 256, the default here.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping

import torch

from ..errors import first_line
from .config import ModelConfig
from .tensor_files import load_tensor_file
from .transformer import CausalWanModel

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
# wrapper module names, dropped wherever they occur in a key (FSDP nests them per layer)
_WRAPPERS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod",
                       "module"})
# prefixes dropped when every key has them (trainer wrappers, peft, diffusers pipelines)
_PREFIXES = ("base_model.model.", "model.", "diffusion_model.", "transformer.")
_CKPT_KEYS = ("generator", "generator_ema", "model", "state_dict", "module")
_EMA_KEY = "generator_ema"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def diffusers_to_original_key(key: str) -> str:
    """Rename one diffusers ``WanTransformer3DModel`` key to the original Wan layout."""
    for pat, rep in _DIFFUSERS_TO_ORIGINAL:
        key = re.sub(pat, rep, key)
    return key


def detect_layout(keys) -> str:
    """``"diffusers"`` or ``"original"`` from the key names (prefixes already stripped)."""
    return "diffusers" if any(m in k for k in keys for m in _DIFFUSERS_MARKERS) else "original"


def strip_wrappers(key: str) -> str:
    """``key`` without wrapper module names (``_fsdp_wrapped_module``, ``_orig_mod``,
    ``_checkpoint_wrapped_module``, ``module``) anywhere before its last part."""
    parts = key.split(".")
    return ".".join([p for p in parts[:-1] if p not in _WRAPPERS] + parts[-1:])


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper names anywhere, then prefixes shared by every key (``model.``, ...)."""
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for k, v in sd.items():
        s = strip_wrappers(k)
        if s in out:
            raise ValueError(f"keys {source[s]!r} and {k!r} name the same weight {s!r} once "
                             f"wrapper names ({', '.join(sorted(_WRAPPERS))}) are removed")
        out[s], source[s] = v, k
    changed = True
    while changed and out:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return out


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


def _is_tensor_dict(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _contents(obj: Mapping) -> str:
    """What a checkpoint holds, for error messages."""
    if _is_tensor_dict(obj):
        return f"a plain state dict of {len(obj)} tensors ({_few(list(obj), 3)})"
    return f"the entries {_few(list(obj))}"


def _entry(key: str | None, ema: bool) -> str | None:
    """The checkpoint entry to read: ``key``, or ``generator_ema`` for ``ema``."""
    if ema and key not in (None, _EMA_KEY):
        raise ValueError(f"ema=True reads the entry {_EMA_KEY!r}; it excludes key={key!r}")
    return _EMA_KEY if ema else key


def _select(obj: Mapping, key: str | None, where: str) -> dict[str, torch.Tensor]:
    """Pick the state dict out of a trainer checkpoint (``["generator"]`` etc.)."""
    if key is not None:
        if key not in obj or _is_tensor_dict(obj):
            what = " (no EMA weights)" if key == _EMA_KEY else ""
            raise ValueError(f"{where} has no entry {key!r}{what}; it holds {_contents(obj)}")
        obj = obj[key]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where}: entry {key!r} is a {type(obj).__name__}, expected a "
                             f"state dict")
    elif not _is_tensor_dict(obj):
        for k in _CKPT_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise ValueError(f"{where} is not a state dict and has none of the entries "
                             f"{list(_CKPT_KEYS)}; it holds {_contents(obj)}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {_few(bad)}")
    return dict(obj)


def read_state_dict(path, *, key: str | None = None, ema: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Read a state dict from a file or directory (see the module docstring), as stored.

    Args:
        path: ``.safetensors``, a shard index ``.json``, a model / pipeline folder, or a
            ``torch.save`` file (a state dict or a trainer checkpoint).
        key: entry of a trainer checkpoint (default: ``generator``, then ``generator_ema``,
            ``model``, ``state_dict``, ``module``, or the file itself if it is a state dict).
        ema: read the EMA weights, ``["generator_ema"]`` (Self-Forcing, LongLive); a file
            without them raises ``ValueError`` listing what it holds.
    """
    key = _entry(key, ema)
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
        sd = _load_index(path)
        return _select(sd, key, path) if key is not None else sd
    if path.endswith(".safetensors"):
        sd = _load_safetensors(path)
        return _select(sd, key, path) if key is not None else sd
    return _load_torch(path, key)


# ---------------------------------------------------------------------- loading
def _few(keys, n: int = 8) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


def _counted(what: str, keys) -> str:
    """``"missing keys (3): [a, b, c]"``: the count, then the first few."""
    keys = list(keys)
    return f"{what} ({len(keys)}): [{_few(keys)}]"


def _check_alpha(name: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@torch.no_grad()
def load_weights(model: CausalWanModel, path_or_state_dict, *, strict: bool = True,
                 key: str | None = None, ema: bool = False, lora=None,
                 lora_alpha: float | None = None, lora_scale: float | None = None
                 ) -> CausalWanModel:
    """Copy weights into ``model`` (layout auto-detected), optionally merging a LoRA.

    Args:
        model: the model to fill (its dtype/device are kept).
        path_or_state_dict: a state dict, a trainer checkpoint dict, or a path (see
            :func:`read_state_dict`).
        strict: missing or unexpected keys raise one ``ValueError`` that counts and names them
            (shape mismatches always raise).
        key: entry of a trainer checkpoint to use (default: ``generator``, then
            ``generator_ema``, ``model``, ``state_dict``, ``module``).
        ema: use the EMA weights ``["generator_ema"]`` (``ValueError`` if there are none).
        lora, lora_alpha, lora_scale: see :func:`merge_lora` (``alpha`` and ``scale``).

    Returns:
        ``model``.
    """
    key = _entry(key, ema)
    sd = path_or_state_dict
    where = "state dict"
    if not isinstance(sd, Mapping):
        where = os.fspath(sd)
        sd = read_state_dict(sd, key=key)
    elif key is not None or not _is_tensor_dict(sd):
        sd = _select(sd, key, where)
    sd = to_original_layout(sd)
    if lora is not None:
        sd = merge_lora(sd, lora, alpha=lora_alpha, scale=lora_scale)
    elif lora_alpha is not None or lora_scale is not None:
        raise ValueError("lora_alpha and lora_scale need lora (the LoRA weights to merge)")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        parts = [_counted(w, ks) for w, ks in (("missing keys", missing),
                                               ("unexpected keys", unexpected)) if ks]
        hint = ""
        if any(_LORA_RE.match(k) for k in unexpected):
            hint = " (LoRA weights? pass them as lora= / --lora)"
        elif len(missing) == len(own):
            hint = " (no key matches: a checkpoint of another model?)"
        raise ValueError(f"{where} does not match {type(model).__name__} "
                         f"({len(own)} weights): {'; '.join(parts)}{hint}")
    bad = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{where}: {len(bad)} shape mismatches (wrong preset/config?): "
                         f"{_few(bad, 5)}")
    for k, t in own.items():
        if k in sd:
            t.copy_(sd[k])
    return model


# ---------------------------------------------------------------------- LoRA
_ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors",
                  "adapter_model.bin")
_LORA_RE = re.compile(r"^(.*)\.(lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")


def _read_lora_config(conf: Mapping, where: str) -> dict:
    """``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora`` of a peft
    ``LoraConfig`` dict (diffusers prefixes its metadata keys with ``transformer.``)."""
    conf = {k.removeprefix("transformer."): v for k, v in conf.items()}
    out = {"r": conf.get("r"), "lora_alpha": conf.get("lora_alpha"),
           "rank_pattern": conf.get("rank_pattern") or {},
           "alpha_pattern": conf.get("alpha_pattern") or {},
           "use_rslora": bool(conf.get("use_rslora", False)), "where": where}
    ranks = [out["r"], *out["rank_pattern"].values()]
    alphas = [out["lora_alpha"], *out["alpha_pattern"].values()]
    if not all(r is None or (isinstance(r, int) and r > 0) for r in ranks) or not all(
            a is None or (isinstance(a, (int, float)) and math.isfinite(a)) for a in alphas):
        raise ValueError(f"{where}: LoRA rank r must be a positive integer and lora_alpha a "
                         f"finite number, got r={out['r']!r}, lora_alpha={out['lora_alpha']!r}")
    return out


def _lora_config_of(path: str) -> dict | None:
    """The LoRA settings a file carries: peft's ``adapter_config.json`` beside it, or
    diffusers' ``lora_adapter_metadata`` in its safetensors header. ``None`` if neither."""
    cfg_path = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                conf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not JSON: {first_line(e)}") from None
        if not isinstance(conf, dict):
            raise ValueError(f"{cfg_path} is not a JSON object")
        return _read_lora_config(conf, cfg_path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            try:
                conf = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: lora_adapter_metadata is not JSON: "
                                 f"{first_line(e)}") from None
            return _read_lora_config(conf, f"{path} (lora_adapter_metadata)")
    return None


def _lora_state(lora, key: str | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(LoRA tensors, the LoRA settings the file carries or ``None``)."""
    if isinstance(lora, Mapping):
        if key is None and "generator_lora" in lora:
            key = "generator_lora"
        sd = _select(lora, key, "lora state dict") if key or not _is_tensor_dict(lora) \
            else dict(lora)
        return sd, None
    path = os.fspath(lora)
    if os.path.isdir(path):
        names = [n for n in _ADAPTER_FILES if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise ValueError(f"LoRA folder {path} has none of {list(_ADAPTER_FILES)}")
        path = os.path.join(path, names[0])
    if path.endswith(".safetensors"):
        return _load_safetensors(path), _lora_config_of(path)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a LoRA state dict")
    if key is None and "generator_lora" in obj:
        key = "generator_lora"
    sd = _select(obj, key, path) if key or not _is_tensor_dict(obj) else dict(obj)
    return sd, _lora_config_of(path)


def _pattern_value(patterns: Mapping, name: str):
    """peft's rule: the first pattern ``p`` that ``name`` matches as a dotted suffix."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?{pat}$", name):
            return value
    return None


def merge_lora(sd: Mapping[str, torch.Tensor], lora, *, alpha: float | None = None,
               scale: float | None = None, key: str | None = None) -> dict[str, torch.Tensor]:
    """Return ``sd`` (original layout) with ``W += scale * B @ A`` for every LoRA module.

    Args:
        sd: base weights in the original layout (:func:`to_original_layout`).
        lora: LoRA state dict, file (``.pt`` with ``["generator_lora"]`` as LongLive saves it,
            or safetensors) or peft adapter folder, in either layout, peft
            (``lora_A/lora_B``) or kohya (``lora_down/lora_up``) names.
        alpha: LoRA alpha, finite and > 0; ``scale = alpha / rank`` per module (``rank`` =
            rows of ``A``). Given, it overrides any alpha the file carries. Default: a kohya
            ``.alpha`` tensor, else the file's ``lora_alpha`` / ``alpha_pattern``, else the
            rank (scale 1, as LongLive: rank = alpha = 256). peft's ``use_rslora`` divides by
            ``sqrt(rank)`` instead.
        scale: explicit scale for every module, overriding alpha.
        key: entry of a checkpoint to use (default ``generator_lora`` when present).

    Raises:
        ValueError: once, listing every problem: keys that are not LoRA weights, modules
            without both halves, modules that target no model weight, shapes that do not fit,
            and ranks that differ from the rank the file declares.
    """
    _check_alpha("lora_alpha", alpha)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"lora_scale must be a finite number, got {scale!r}")
    raw, conf = _lora_state(lora, key)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in raw.items():
        m = _LORA_RE.match(k)
        if m:
            kind = {"lora_down": "A", "lora_up": "B"}.get(m.group(2), m.group(2)[-1])
            pairs.setdefault(m.group(1), {})[kind] = v
        elif k.endswith(".alpha") and v.numel() == 1:
            pairs.setdefault(k[: -len(".alpha")], {})["alpha"] = v
        else:
            unknown.append(k)
    # module names -> base weight names, through the same wrapper stripping and renaming
    own_names = list(_strip_prefixes({m + ".weight": torch.empty(0) for m in pairs}))
    targets = list(to_original_layout({m + ".weight": torch.empty(0) for m in pairs}))
    problems = {"keys that are not lora_A/lora_B (or lora_down/lora_up) weights or an alpha":
                unknown, "modules that need both lora_A and lora_B weights": [],
                "modules whose target is not a model weight": [],
                "modules whose A, B do not fit their weight": [],
                "modules whose rank differs from the file's": []}
    names = list(problems)
    merges = []
    for (mod, p), own, target in zip(pairs.items(), own_names, targets, strict=True):
        if "A" not in p or "B" not in p:
            problems[names[1]].append(mod)
            continue
        if target not in sd:
            problems[names[2]].append(f"{mod} -> {target}")
            continue
        A, B, W = p["A"], p["B"], sd[target]
        rank = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != rank or \
                (B.shape[0], A.shape[1]) != tuple(W.shape):
            problems[names[3]].append(f"{mod}: A {list(A.shape)}, B {list(B.shape)}, "
                                      f"{target} {list(W.shape)}")
            continue
        own = own.removesuffix(".weight")
        if conf is not None:
            want = _pattern_value(conf["rank_pattern"], own) or conf["r"]
            if want is not None and want != rank:
                problems[names[4]].append(f"{mod}: {rank} (file: {want})")
                continue
        s = scale
        if s is None:
            a = alpha
            if a is None and "alpha" in p:
                a = float(p["alpha"])
            if a is None and conf is not None:
                a = _pattern_value(conf["alpha_pattern"], own)
                a = conf["lora_alpha"] if a is None else a
            a = rank if a is None else a
            s = a / (math.sqrt(rank) if conf is not None and conf["use_rslora"] else rank)
        merges.append((target, A, B, s))
    bad = [_counted(what, ks) for what, ks in problems.items() if ks]
    if bad:
        where = conf["where"] if conf else "the LoRA"
        raise ValueError(f"LoRA does not fit the model ({len(pairs)} modules; settings from "
                         f"{where}): {'; '.join(bad)}")
    out = dict(sd)
    for target, A, B, s in merges:
        W = out[target]
        # merged in fp64, kept at least fp32 so a small delta is not rounded away in bf16
        out[target] = (W.double() + s * (B.double() @ A.double())).to(
            torch.promote_types(W.dtype, torch.float32))
    return out


# keep these small fp32 modules in fp32 when the rest of the model is cast to 16-bit
_KEEP_FP32 = ("time_embedding", "time_projection", "modulation", "norm3", "norm_q", "norm_k")


def load_model(path, preset_or_config: str | ModelConfig = "wan-1.3b", *, lora=None,
               lora_alpha: float | None = None, lora_scale: float | None = None,
               key: str | None = None, ema: bool = False, strict: bool = True,
               dtype: torch.dtype = torch.float32, device="cpu") -> CausalWanModel:
    """Build a :class:`CausalWanModel` and load a checkpoint into it (see :func:`load_weights`).

    ``ema=True`` loads a Self-Forcing / LongLive checkpoint's ``["generator_ema"]`` (CLI
    ``--ema``); ``lora_alpha`` (CLI ``--lora-alpha``) sets the LoRA alpha (default: the file's,
    else the rank). The model is built (on the meta device when ``strict``), filled, cast to
    ``dtype`` (with the time embedding, modulation tables and norm weights kept in fp32 for
    16-bit dtypes, as diffusers does), moved to ``device`` and put in eval mode with gradients
    off.
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
    load_weights(model, path, key=key, ema=ema, strict=strict, lora=lora, lora_alpha=lora_alpha,
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
