"""lol_model.model.weights: both key layouts (diffusers, original Wan / Self-Forcing / LongLive) load to
the same model, LoRA merging, and clear errors for bad checkpoints."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import lol_kernels as lk
from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel
from lol_model.model.weights import load_model, load_weights, read_state_dict
from tests.support.checkpoints import (
    fsdp_name,
    hand_merge,
    peft_lora,
    to_original,
    trainer_checkpoint,
)
from tests.support.wan_reference import diffusers_model

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(1234)
    return diffusers_model(CFG, torch.float32)


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_channels, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 5, CFG.text_dim, generator=g)
    cache = model.new_cache(frame_tokens=6, sink_frames=1, window_frames=2, block_frames=2)
    with torch.no_grad():
        return model(x, torch.tensor([[700.0, 300.0]]), model.encode_text(ctx), cache,
                     lk.cache.read_cache(cache, 2))


def all_block_linears(model):
    return [n for n, mod in model.named_modules()
            if n.startswith("blocks.") and isinstance(mod, torch.nn.Linear)]


# --------------------------------------------------------------------------- every layout
# each writer: (tmp dir, original-layout weights, diffusers model) -> (source, load_model
# options, the weights the model must end up with)
def _wan_safetensors(d, orig, ref):
    save_file(orig, d / "wan.safetensors")
    return d / "wan.safetensors", {}, orig


def _wan_pth(d, orig, ref):
    torch.save(orig, d / "wan.pth")
    return d / "wan.pth", {}, orig


def _wan_state_dict(d, orig, ref):
    return dict(orig), {}, orig


def _diffusers_file(d, orig, ref):
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, d / "dif.safetensors")
    return d / "dif.safetensors", {}, orig


def _diffusers_shards(d, orig, ref):
    ref.save_pretrained(d / "dir", max_shard_size="40KB")
    assert (d / "dir" / "diffusion_pytorch_model.safetensors.index.json").exists()
    return d / "dir", {}, orig


def _diffusers_pipeline(d, orig, ref):
    ref.save_pretrained(d / "pipe" / "transformer")
    return d / "pipe", {}, orig


def _diffusers_manual_index(d, orig, ref):
    sd = ref.state_dict()
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    os.makedirs(d / "manual")
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, d / "manual" / name)
    index = d / "manual" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    return index, {}, orig


def _self_forcing_generator(d, orig, ref):
    return trainer_checkpoint(d, orig)[0], {}, orig


def _self_forcing_ema(d, orig, ref):
    path, ema = trainer_checkpoint(d, orig)
    return path, {"ema": True}, ema


def _self_forcing_ema_by_key(d, orig, ref):
    path, ema = trainer_checkpoint(d, orig)
    return path, {"key": "generator_ema"}, ema


def _ema_only(d, orig, ref):
    torch.save({"generator_ema": {"model." + k: v for k, v in orig.items()}}, d / "ema.pth")
    return d / "ema.pth", {}, orig  # no 'generator': the EMA is taken


def _compiled(d, orig, ref):
    torch.save({"generator": {"_orig_mod.model." + k: v for k, v in orig.items()}}, d / "c.pt")
    return d / "c.pt", {}, orig


def _ddp(d, orig, ref):
    torch.save({"model": {"module." + k: v for k, v in orig.items()}}, d / "ddp.pt")
    return d / "ddp.pt", {}, orig


def _fsdp_compiled_ddp(d, orig, ref):
    sd = {"module._orig_mod." + fsdp_name(k): v for k, v in orig.items()}
    save_file(sd, d / "nested.safetensors")
    return d / "nested.safetensors", {}, orig


def _fsdp_diffusers(d, orig, ref):
    sd = {"_orig_mod." + re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module.", k): v
          for k, v in ref.state_dict().items()}
    assert any("_fsdp_wrapped_module" in k for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "fsdp_dif.safetensors")
    return d / "fsdp_dif.safetensors", {}, orig


def _longlive_base_lora(d, orig, ref):
    """LongLive 1.0: longlive_base.pt (trainer checkpoint) + lora.pt ``{"generator_lora":
    peft state dict over every Linear of every block, "critic_lora", "step"}`` in bf16."""
    base = CausalWanModel(CFG)
    lora = peft_lora(base, 4, all_block_linears(base), dtype=torch.bfloat16)
    torch.save({"generator": {"model." + k: v for k, v in orig.items()}}, d / "base.pt")
    torch.save({"generator_lora": lora, "critic_lora": {"x.lora_A.weight": torch.zeros(1, 1)},
                "step": 3}, d / "lora.pt")
    return d / "base.pt", {"lora": d / "lora.pt"}, hand_merge(orig, lora, 1.0)


def _longlive_ema_lora_alpha(d, orig, ref):
    path, ema = trainer_checkpoint(d, orig)
    base = CausalWanModel(CFG)
    lora = peft_lora(base, 4, all_block_linears(base)[:5])
    torch.save({"generator_lora": lora}, d / "lora.pt")
    return path, {"ema": True, "lora": d / "lora.pt", "lora_alpha": 6.0}, \
        hand_merge(ema, lora, 6.0 / 4)


LAYOUTS = {
    "wan-safetensors": _wan_safetensors, "wan-pth": _wan_pth, "wan-state-dict": _wan_state_dict,
    "diffusers-file": _diffusers_file, "diffusers-shards": _diffusers_shards,
    "diffusers-pipeline": _diffusers_pipeline, "diffusers-index": _diffusers_manual_index,
    "sf-generator": _self_forcing_generator, "sf-ema": _self_forcing_ema,
    "sf-ema-key": _self_forcing_ema_by_key, "ema-only": _ema_only, "compile": _compiled,
    "ddp": _ddp, "fsdp-compile-ddp": _fsdp_compiled_ddp, "fsdp-diffusers": _fsdp_diffusers,
    "longlive-base-lora": _longlive_base_lora, "longlive-ema-lora-alpha": _longlive_ema_lora_alpha,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_key_layout_loads(ref, tmp_path, layout):
    """Each layout, written by the test from tiny random weights, loads to exactly the source
    tensors (to fp32 rounding of the fp64 merge for a LoRA)."""
    orig = to_original(ref.state_dict())
    assert set(orig) == set(CausalWanModel(CFG).state_dict())  # the table covers every weight
    src, options, want = LAYOUTS[layout](tmp_path, orig, ref)
    got = load_model(src, CFG, **options).state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        if "lora" in options:
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(got[k], v), k
    if layout == "wan-safetensors":  # the outputs follow the weights
        assert torch.equal(outputs(load_model(src, CFG)), outputs(load_weights(
            CausalWanModel(CFG), ref.state_dict())))


def test_read_state_dict_selects_the_ema(ref, tmp_path):
    orig = to_original(ref.state_dict())
    path, ema = trainer_checkpoint(tmp_path, orig)
    raw = read_state_dict(path, ema=True)
    assert set(raw) == {fsdp_name(k) for k in orig}
    assert torch.equal(raw[fsdp_name("blocks.1.ffn.2.weight")], ema["blocks.1.ffn.2.weight"])
    assert set(read_state_dict(path)) == {"model." + k for k in orig}  # generator by default


# --------------------------------------------------------------------------- LoRA alpha/rank
def _peft_folder(d, lora, config):
    os.makedirs(d / "adapter")
    save_file(lora, d / "adapter" / "adapter_model.safetensors")
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    return d / "adapter"


def _diffusers_metadata(d, lora, config):
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in config.items()})}
    save_file(lora, d / "pytorch_lora_weights.safetensors", metadata=meta)
    return d / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("case", [
    # (how the LoRA is stored, its config, caller's alpha, scale of q / of ffn.2)
    ("pt", None, None, 1.0, 1.0),  # LongLive: no alpha stored -> alpha = rank
    ("pt", None, 6.0, 1.5, 1.5),
    ("peft", {"r": 4, "lora_alpha": 8}, None, 2.0, 2.0),
    ("peft", {"r": 4, "lora_alpha": 8, "alpha_pattern": {"ffn.2": 2}}, None, 2.0, 0.5),
    ("peft", {"r": 4, "lora_alpha": 8}, 6.0, 1.5, 1.5),  # the caller's alpha wins
    ("peft", {"r": 4, "lora_alpha": 8, "use_rslora": True}, None, 4.0, 4.0),
    ("diffusers", {"r": 4, "lora_alpha": 2}, None, 0.5, 0.5),
    ("safetensors", None, None, 1.0, 1.0),
], ids=["longlive-default", "longlive-alpha", "peft-config", "peft-alpha-pattern",
        "peft-caller-alpha", "peft-rslora", "diffusers-metadata", "plain-safetensors"])
def test_lora_alpha_and_rank_from_the_file(ref, tmp_path, case):
    how, config, alpha, s_q, s_ffn = case
    orig = to_original(ref.state_dict())
    names = ["blocks.0.self_attn.q", "blocks.1.ffn.2"]
    lora = peft_lora(CausalWanModel(CFG), 4, names)
    src = {"pt": lambda: torch.save({"generator_lora": lora}, tmp_path / "l.pt") or
           tmp_path / "l.pt",
           "peft": lambda: _peft_folder(tmp_path, lora, config),
           "diffusers": lambda: _diffusers_metadata(tmp_path, lora, config),
           "safetensors": lambda: save_file(lora, tmp_path / "l.safetensors") or
           tmp_path / "l.safetensors"}[how]()
    got = load_model(orig, CFG, lora=src, lora_alpha=alpha).state_dict()
    want = hand_merge(orig, lora, lambda n, r: s_q if n == names[0] else s_ffn)
    for n in names:
        torch.testing.assert_close(got[n + ".weight"], want[n + ".weight"], rtol=1e-6,
                                   atol=1e-7)
        assert not torch.equal(got[n + ".weight"], orig[n + ".weight"])


def test_lora_layouts_merge_alike(ref, tmp_path):
    """The same LoRA in peft, diffusers (with an adapter name) and kohya names."""
    base = load_weights(CausalWanModel(CFG), ref.state_dict())
    names = ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.2"]
    lora = peft_lora(base, 4, names)
    merged = load_model(ref.state_dict(), CFG, lora=lora, lora_alpha=6.0)
    hand = load_weights(CausalWanModel(CFG), base.state_dict())
    with torch.no_grad():
        for n in names:
            A = lora[f"base_model.model.{n}.lora_A.weight"]
            B = lora[f"base_model.model.{n}.lora_B.weight"]
            hand.get_submodule(n).weight += (6.0 / 4) * B @ A
    for k, v in hand.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    assert not torch.equal(outputs(merged), outputs(base))
    torch.testing.assert_close(outputs(merged), outputs(hand), rtol=1e-5, atol=1e-5)
    dnames = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q",
              "blocks.1.cross_attn.v": "blocks.1.attn2.to_v",
              "blocks.1.ffn.2": "blocks.1.ffn.net.2"}
    dl = {f"transformer.{dnames[n]}.{ab}.default.weight": lora[f"base_model.model.{n}.{ab}.weight"]
          for n in names for ab in ("lora_A", "lora_B")}
    merged2 = load_model(ref.state_dict(), CFG, lora=dl, lora_scale=1.5)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(merged2.state_dict()[k], v, rtol=0, atol=1e-7)
    # kohya names with a per-module alpha tensor: scale = alpha / rank
    n = names[0]
    kohya = {f"{n}.lora_down.weight": lora[f"base_model.model.{n}.lora_A.weight"],
             f"{n}.lora_up.weight": lora[f"base_model.model.{n}.lora_B.weight"],
             f"{n}.alpha": torch.tensor(6.0)}
    merged3 = load_model(ref.state_dict(), CFG, lora=kohya)
    torch.testing.assert_close(merged3.get_submodule(n).weight, merged.get_submodule(n).weight,
                               rtol=0, atol=1e-7)


def test_lora_rank_must_agree_with_the_file(ref, tmp_path):
    orig = to_original(ref.state_dict())
    lora = peft_lora(CausalWanModel(CFG), 4, ["blocks.0.self_attn.q", "blocks.1.ffn.2"])
    lora.update(peft_lora(CausalWanModel(CFG), 2, ["blocks.0.ffn.0"]))
    folder = _peft_folder(tmp_path, lora, {"r": 4, "lora_alpha": 4})
    with pytest.raises(ValueError, match=r"rank differs from the file's \(1\): "
                                         r"\[base_model\.model\.blocks\.0\.ffn\.0: 2 \(file: 4\)"):
        load_model(orig, CFG, lora=folder)
    # peft's rank_pattern declares the odd module's rank: consistent, alpha / 2 there
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 4, "rank_pattern": {"blocks.0.ffn.0": 2}}))
    got = load_model(orig, CFG, lora=folder).state_dict()
    want = hand_merge(orig, lora, lambda n, r: 4 / r)
    torch.testing.assert_close(got["blocks.0.ffn.0.weight"], want["blocks.0.ffn.0.weight"],
                               rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- errors
def test_bf16_load_keeps_modulation_in_fp32(ref):
    model = load_model(ref.state_dict(), CFG, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_embedding[0].weight.dtype == torch.float32
    y, y32 = outputs(model), outputs(load_model(ref.state_dict(), CFG))
    assert y.dtype == torch.float32 and (y - y32).abs().max() < 0.05 * y32.abs().max()


def test_bad_checkpoints_give_clear_errors(ref, tmp_path):
    sd = ref.state_dict()
    model = CausalWanModel(CFG)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn2.to_k.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): \[blocks\.1\.cross_attn\.k\.bias\]"
                                         r"$"):
        load_weights(model, missing)
    load_weights(model, missing, strict=False)  # strict=False tolerates it
    # missing and unexpected keys in ONE error, each counted, the first few named
    both = {**missing, "blocks.0.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"missing keys \(1\): \[blocks\.1\.cross_attn\.k\.bias\];"
                                         r" unexpected keys \(1\): \[blocks\.0\.extra\.weight\]"):
        load_weights(model, both)
    n_own = len(model.state_dict())
    with pytest.raises(ValueError, match=rf"\({n_own} weights\): missing keys \({n_own}\): "
                                         rf"\[.*\.\.\. \(\+{n_own - 8} more\)\]; unexpected keys "
                                         rf"\(1\): \[w\] \(no key matches"):
        load_weights(model, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(2\).*lora_A.*pass them as lora="):
        load_weights(model, {**sd, **peft_lora(model, 2, ["blocks.0.ffn.0"])})
    big = ModelConfig.preset("tiny", ffn_dim=CFG.ffn_dim * 2)
    with pytest.raises(ValueError, match=r"shape mismatch.*ffn\.0\.weight"):
        load_model(sd, big)
    per_block = sum(k.startswith("blocks.0.") for k in model.state_dict())
    with pytest.raises(ValueError, match=rf"missing keys \({per_block}\): \[blocks\.2\."):
        load_model(sd, ModelConfig.preset("tiny", num_layers=CFG.num_layers + 1))
    with pytest.raises(ValueError, match=rf"unexpected keys \({per_block}\): \[blocks\.1\."):
        load_model(sd, ModelConfig.preset("tiny", num_layers=1))
    # two keys that are one weight once the wrapper names are gone
    w = sd["proj_out.weight"]
    with pytest.raises(ValueError, match=r"'_orig_mod\.proj_out\.weight' name the same weight"):
        load_weights(model, {**sd, "_orig_mod.proj_out.weight": w})
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="generator"):
        load_model(tmp_path / "opt.pt", CFG)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        load_model(tmp_path / "junk.pt", CFG)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors", CFG)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        load_model(tmp_path / "empty", CFG)
    with pytest.raises(TypeError, match="preset_or_config"):
        load_model(sd, 3)


def test_no_ema_weights_is_a_clear_error(ref, tmp_path):
    sd = to_original(ref.state_dict())
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}, "critic": {}, "step": 1},
               tmp_path / "g.pt")
    with pytest.raises(ValueError, match=r"g\.pt has no entry 'generator_ema' \(no EMA weights\);"
                                         r" it holds the entries generator, critic, step"):
        load_model(tmp_path / "g.pt", CFG, ema=True)
    with pytest.raises(ValueError, match="no entry 'generator_ema'"):
        load_model(tmp_path / "g.pt", CFG, key="generator_ema")
    save_file(sd, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=rf"no EMA weights\); it holds a plain state dict of "
                                         rf"{len(sd)} tensors"):
        load_model(tmp_path / "w.safetensors", CFG, ema=True)
    ref.save_pretrained(tmp_path / "dir", max_shard_size="40KB")
    with pytest.raises(ValueError, match="no EMA weights"):
        load_model(tmp_path / "dir", CFG, ema=True)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_model(sd, CFG, ema=True)
    with pytest.raises(ValueError, match="excludes key='generator'"):
        load_model(tmp_path / "g.pt", CFG, ema=True, key="generator")


def test_bad_loras_give_one_clear_error(ref, tmp_path):
    sd = ref.state_dict()
    model = CausalWanModel(CFG)
    good = peft_lora(model, 4, ["blocks.0.self_attn.q"])
    bad = {**good,
           **{k.replace("self_attn.q", "self_attn.zz"): v for k, v in good.items()},
           **{k: v for k, v in peft_lora(model, 4, ["blocks.1.ffn.0"]).items() if "lora_A" in k},
           "base_model.model.blocks.0.ffn.2.lora_A.weight": torch.randn(4, CFG.ffn_dim),
           "base_model.model.blocks.0.ffn.2.lora_B.weight": torch.randn(CFG.dim, 3),
           "base_model.model.blocks.0.norm3.weight": torch.zeros(CFG.dim),
           "base_model.model.blocks.0.norm3.bias": torch.zeros(CFG.dim)}
    with pytest.raises(ValueError) as e:
        load_model(sd, CFG, lora=bad)
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith("LoRA does not fit the model (4 modules")
    for part in [r"not lora_A/lora_B \(or lora_down/lora_up\) weights or an alpha \(2\): "
                 r"\[base_model\.model\.blocks\.0\.norm3\.weight, base_model",
                 r"need both lora_A and lora_B weights \(1\): \[base_model\.model\.blocks\.1\."
                 r"ffn\.0\]",
                 r"target is not a model weight \(1\): \[base_model\.model\.blocks\.0\.self_attn"
                 r"\.zz -> blocks\.0\.self_attn\.zz\.weight\]",
                 r"do not fit their weight \(1\): \[base_model\.model\.blocks\.0\.ffn\.2: "
                 rf"A \[4, {CFG.ffn_dim}\], B \[{CFG.dim}, 3\]"]:
        assert re.search(part, msg), (part, msg)
    for alpha in (0.0, -1.0, float("nan"), float("inf"), True, "8"):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number > 0"):
            load_model(sd, CFG, lora=good, lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha and lora_scale need lora"):
        load_model(sd, CFG, lora_alpha=4.0)
    os.makedirs(tmp_path / "adapter")
    with pytest.raises(ValueError, match="has none of"):
        load_model(sd, CFG, lora=tmp_path / "adapter")
    save_file(good, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 0, "lora_alpha": 4}')
    with pytest.raises(ValueError, match=r"adapter_config\.json: LoRA rank r must be a positive"):
        load_model(sd, CFG, lora=tmp_path / "adapter")


@pytest.mark.parametrize("preset,heads", [("wan-1.3b", 12), ("wan-14b", 40)])
def test_presets_match_diffusers_wan_configs(preset, heads):
    """Every parameter of the preset has the name and shape of the diffusers Wan2.1 model of
    the same size (built on the meta device: no memory, no init)."""
    from diffusers import WanTransformer3DModel

    from lol_model.model.weights import to_original_layout

    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        ours = CausalWanModel(cfg)
        ref = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=128,
                                    ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                                    text_dim=4096, freq_dim=256)
    want = {k: tuple(v.shape) for k, v in to_original_layout(ref.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    if preset == "wan-1.3b":
        assert sum(p.numel() for p in ours.parameters()) == 1_418_996_800
