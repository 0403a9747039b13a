"""``LolStreamingPipeline`` from a tiny diffusers Wan folder written with ``save_pretrained``:
exactly what ``lol generate`` makes with the same weights and seed, from a folder or from a
``WanPipeline``'s components, with a causal checkpoint in the transformer slot, and one clear
error per missing component, wrong folder or incompatible config."""

from __future__ import annotations

import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lol_model.cli import main
from lol_model.integrations.diffusers.pipeline import LolStreamingPipeline
from lol_model.model.vae import StreamingDecoder, load_vae, to_uint8_frames
from lol_model.streaming.video import load_latents
from tests.support.tiny_wan import TEXT_LEN, tiny_pipeline, tiny_text_encoder, write_tiny_folder

# a prompt switch (LongLive recache) and LoL jitter: the paths a plain prompt would not reach
PROMPT = "a red fox running[2b] | a cat in the snow"
RUN = dict(num_blocks=3, cache="lol", height=32, width=48, seed=7, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def cli_run(folder, tmp_path_factory):
    """``lol generate`` on the folder's weights: ``(mp4 path, latents [1, Cz, F, h, w])``."""
    out = str(tmp_path_factory.mktemp("cli") / "cli.mp4")
    threads = torch.get_num_threads()  # the CLI sets 1 for the tiny preset unless told
    rc = main(["generate", "--prompt", PROMPT, "--blocks", "3", "--cache", "lol", "--size",
               "48x32", "--seed", "7", "--preset", "tiny",
               "--checkpoint", os.path.join(folder, "transformer"), "--text-encoder", folder,
               "--vae", folder, "--out", out, "--save-latents", "--threads", str(threads),
               "--quiet"])
    assert rc == 0 and torch.get_num_threads() == threads
    return out, load_latents(out[:-4] + ".latents").transpose(1, 2)


@pytest.fixture(scope="module")
def pipe(folder):
    return LolStreamingPipeline.from_pretrained(folder, text_len=TEXT_LEN)


def copy_folder(folder, tmp_path, drop=()):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    for d in drop:
        p = dst / d
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


# ------------------------------------------------------------------------------ parity
def test_latents_equal_lol_generate(pipe, cli_run):
    got = pipe(PROMPT, output_type="latent", **RUN)
    assert got.shape == (1, 16, 9, 4, 6)
    assert torch.equal(got, cli_run[1])


def test_frames_equal_lol_generate(pipe, folder, cli_run):
    """The frames the mp4 receives: the streaming decode of ``lol generate``'s latents."""
    frames = pipe(PROMPT, output_type="np", **RUN)
    ref = to_uint8_frames(StreamingDecoder(load_vae(folder)).decode(cli_run[1]))[0]
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (1 + 4 * 8, 32, 48, 3)
    assert np.array_equal(frames, ref.numpy())
    assert torch.equal(pipe(PROMPT, output_type="pt", **RUN), ref)


def test_mp4_equals_lol_generate(pipe, cli_run, tmp_path, capfd):
    out = str(tmp_path / "pipe.mp4")
    assert pipe(PROMPT, output_type="mp4", out=out, **{**RUN, "progress": True}) == out
    assert "3/3" in capfd.readouterr().err  # the tqdm bar of lol_model.streaming.driver.run
    assert np.array_equal(iio.imread(out), iio.imread(cli_run[0]))
    assert not os.path.exists(out + ".segments")  # joined into out


def test_from_wan_pipeline_components(pipe):
    """The WanPipeline the folder was saved from gives the same stream as the folder.
    (``WanPipeline.from_pretrained`` itself needs ``accelerate`` for the transformer.)"""
    lol = LolStreamingPipeline.from_pretrained(tiny_pipeline(seed=0), text_len=TEXT_LEN)
    assert torch.equal(lol(PROMPT, output_type="latent", **RUN),
                       pipe(PROMPT, output_type="latent", **RUN))


def test_checkpoint_fills_transformer_slot(folder, pipe, tmp_path):
    """A causal checkpoint (trainer layout, original key names) replaces the folder's
    transformer weights, whose config alone is then needed."""
    from lol_model.model.weights import load_model

    other = LolStreamingPipeline.from_pretrained(folder, text_len=TEXT_LEN)
    sd = {f"model.{k}": torch.randn_like(v) * 0.05 for k, v in other.model.state_dict().items()}
    ckpt = str(tmp_path / "causal.pt")
    torch.save({"generator": sd}, ckpt)
    bare = copy_folder(folder, tmp_path, drop=["transformer/diffusion_pytorch_model.safetensors"])
    lol = LolStreamingPipeline.from_pretrained(bare, ckpt, text_len=TEXT_LEN)
    want = load_model(ckpt, pipe.model.cfg).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in lol.model.state_dict().items())
    assert not torch.equal(lol(PROMPT, output_type="latent", **RUN),
                           pipe(PROMPT, output_type="latent", **RUN))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("drop,msg", [
    (["vae"], "lacks the diffusers Wan component.* vae/"),
    (["tokenizer", "text_encoder"], "text_encoder/, tokenizer/"),
    (["transformer/config.json"], "transformer/config.json"),
    (["transformer/diffusion_pytorch_model.safetensors"], "diffusion_pytorch_model"),
], ids=["vae", "text", "config", "weights"])
def test_missing_component(folder, tmp_path, drop, msg):
    with pytest.raises(ValueError, match=msg):
        LolStreamingPipeline.from_pretrained(copy_folder(folder, tmp_path, drop),
                                             text_len=TEXT_LEN)


def test_wrong_folder(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers Wan folder"):
        LolStreamingPipeline.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a folder"):
        LolStreamingPipeline.from_pretrained(os.path.join(folder, "model_index.json"))
    with pytest.raises(TypeError, match="WanPipeline"):
        LolStreamingPipeline.from_pretrained(42)


@pytest.mark.parametrize("change,msg", [
    (dict(image_dim=1280, added_kv_proj_dim=64), "incompatible.*image conditioning"),
    (dict(_class_name="WanVACETransformer3DModel"), "WanVACETransformer3DModel"),
    (dict(patch_size=[2, 2, 2]), "incompatible.*patch_size"),
    (dict(num_attention_heads=3), "transformer.*shape mismatches"),
], ids=["i2v", "class", "patch", "heads"])
def test_incompatible_transformer_config(folder, tmp_path, change, msg):
    dst = copy_folder(folder, tmp_path)
    path = dst / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=msg) as e:
        LolStreamingPipeline.from_pretrained(dst, text_len=TEXT_LEN)
    assert "transformer" in str(e.value)


def test_incompatible_text_encoder(folder, tmp_path):
    dst = copy_folder(folder, tmp_path, drop=["text_encoder"])
    tiny_text_encoder(d_model=24).save_pretrained(dst / "text_encoder")
    with pytest.raises(ValueError, match="text_encoder has width d_model=24.*text_dim=32"):
        LolStreamingPipeline.from_pretrained(dst, text_len=TEXT_LEN)


def test_bad_call_arguments(pipe):
    with pytest.raises(ValueError, match="output_type"):
        pipe("a cat", output_type="gif")
    with pytest.raises(ValueError, match="out .*output_type='mp4'"):
        pipe("a cat", output_type="mp4")
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        pipe("a cat", height=40)
    with pytest.raises(TypeError, match="cache options"):
        pipe("a cat", sink_size=3)
    with pytest.raises(ValueError, match="cache must be one of"):
        pipe("a cat", cache="nope", **{k: v for k, v in RUN.items() if k != "cache"})
