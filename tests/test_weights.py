"""lol_model.weights: both key layouts (diffusers, original Wan / Self-Forcing / LongLive) load to
the same model, LoRA merging, and clear errors for bad checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from test_model import CFG, diffusers_model

import lol_kernels as lk
from lol_model.config import ModelConfig
from lol_model.model import CausalWanModel
from lol_model.weights import load_model, load_weights

# the Wan <-> diffusers rename table, written out independently of lol_model.weights
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


def test_both_layouts_load_to_the_same_model(ref, tmp_path):
    want = load_weights(CausalWanModel(CFG), ref.state_dict())
    sd = ref.state_dict()
    orig = to_original(sd)
    assert set(orig) == set(want.state_dict())  # the table covers every parameter
    # diffusers: single file, model directory with shards + index, hand-made index
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "single.safetensors")
    ref.save_pretrained(tmp_path / "dir", max_shard_size="40KB")
    assert (tmp_path / "dir" / "diffusion_pytorch_model.safetensors.index.json").exists()
    keys = sorted(sd)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    os.makedirs(tmp_path / "manual")
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / "manual" / name)
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "manual" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps(index))
    # original: Self-Forcing trainer checkpoint, bare safetensors
    torch.save({"generator": {"model." + k: v for k, v in orig.items()}, "step": 7},
               tmp_path / "sf.pt")
    torch.save({"generator_ema": {"model." + k: v for k, v in orig.items()}},
               tmp_path / "ema.pth")
    save_file(orig, tmp_path / "orig.safetensors")
    sources = [tmp_path / "single.safetensors", tmp_path / "dir", tmp_path / "manual",
               tmp_path / "manual" / "diffusion_pytorch_model.safetensors.index.json",
               tmp_path / "sf.pt", tmp_path / "ema.pth", tmp_path / "orig.safetensors", orig]
    y = outputs(want)
    for src in sources:
        got = load_model(src, CFG)
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), (src, k)
        assert torch.equal(outputs(got), y), src
    got = load_model(tmp_path / "ema.pth", CFG, key="generator_ema")
    assert torch.equal(outputs(got), y)


def peft_lora(model, rank, names, prefix="base_model.model."):
    return {f"{prefix}{n}.{ab}.weight": torch.randn(rank if ab == "lora_A" else out,
                                                   inp if ab == "lora_A" else rank) * 0.1
            for n in names for ab in ("lora_A", "lora_B")
            for out, inp in [model.get_submodule(n).weight.shape]}


def test_lora_merge_equals_hand_merge(ref, tmp_path):
    base = load_weights(CausalWanModel(CFG), ref.state_dict())
    names = ["blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.1.ffn.2"]
    lora = peft_lora(base, 4, names)
    torch.save({"generator_lora": lora, "step": 3}, tmp_path / "lora.pt")
    torch.save({"generator": {"model." + k: v for k, v in base.state_dict().items()}},
               tmp_path / "base.pt")
    merged = load_model(tmp_path / "base.pt", CFG, lora=tmp_path / "lora.pt", lora_alpha=6.0)
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
    # the same LoRA in diffusers names with a peft adapter name, scale given directly
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
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.1\.cross_attn\.k\.bias\]"):
        load_weights(model, missing)
    load_weights(model, missing, strict=False)  # strict=False tolerates it
    with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.0\.extra\.weight\]"):
        load_weights(model, {**sd, "blocks.0.extra.weight": torch.zeros(2)})
    big = ModelConfig.preset("tiny", ffn_dim=CFG.ffn_dim * 2)
    with pytest.raises(ValueError, match=r"shape mismatch.*ffn\.0\.weight"):
        load_model(sd, big)
    with pytest.raises(ValueError, match="missing keys"):
        load_model(sd, ModelConfig.preset("tiny", num_layers=3))
    torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="generator"):
        load_model(tmp_path / "opt.pt", CFG)
    torch.save({"generator": sd}, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="no entry 'generator_ema'"):
        load_model(tmp_path / "g.pt", CFG, key="generator_ema")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a torch checkpoint"):
        load_model(tmp_path / "junk.pt", CFG)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors", CFG)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no diffusion_pytorch_model"):
        load_model(tmp_path / "empty", CFG)
    lora = peft_lora(model, 4, ["blocks.0.self_attn.q"])
    with pytest.raises(ValueError, match="not a model weight"):
        load_model(sd, CFG, lora={k.replace("self_attn.q", "self_attn.zz"): v
                                  for k, v in lora.items()})
    bad = dict(lora)
    bad["base_model.model.blocks.0.self_attn.q.lora_B.weight"] = torch.randn(CFG.dim, 3)
    with pytest.raises(ValueError, match="do not fit"):
        load_model(sd, CFG, lora=bad)
    with pytest.raises(ValueError, match="needs both"):
        load_model(sd, CFG, lora={k: v for k, v in lora.items() if "lora_A" in k})
    with pytest.raises(TypeError, match="preset_or_config"):
        load_model(sd, 3)


@pytest.mark.parametrize("preset,heads", [("wan-1.3b", 12), ("wan-14b", 40)])
def test_presets_match_diffusers_wan_configs(preset, heads):
    """Every parameter of the preset has the name and shape of the diffusers Wan2.1 model of
    the same size (built on the meta device: no memory, no init)."""
    from diffusers import WanTransformer3DModel

    from lol_model.weights import to_original_layout

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
