"""Streaming Wan VAE decode equals one full decode; its state round-trips mid-stream and stays
constant in size; frames to uint8; a VAE loads from a diffusers folder."""


import pytest
import torch

from lol_model.model.vae import StreamingDecoder, tiny_vae, to_uint8_frames


@pytest.fixture(scope="module")
def vae64():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_vae(seed=3, dtype=torch.float64)
    torch.set_num_threads(n)


@pytest.mark.parametrize("splits", [[3, 3, 1], [1, 1, 2, 3], [7]], ids=["3-3-1", "1-1-2-3", "7"])
def test_blockwise_decode_equals_full_decode(vae64, splits):
    z = torch.randn(1, 16, 7, 4, 6, dtype=torch.float64)
    dec = StreamingDecoder(vae64)
    with torch.no_grad():
        ref = vae64.decode(z / dec.inv_std.double() + dec.mean.double()).sample
    parts, f = [], 0
    for n in splits:
        parts.append(dec.decode(z[:, :, f : f + n]))
        f += n
    out = torch.cat(parts, dim=2)
    assert out.shape == ref.shape == (1, 3, 1 + 4 * 6, 32, 48)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_decoder_state_roundtrip_mid_stream(vae64):
    z = torch.randn(1, 16, 6, 4, 4, dtype=torch.float64)
    a = StreamingDecoder(vae64)
    a.decode(z[:, :, :3])
    meta, tensors = a.state()
    assert set(meta["feat"]) <= {None, "Rep", "tensor"} and tensors
    b = StreamingDecoder(vae64)
    b.load_state(meta, {k: v.clone() for k, v in tensors.items()})
    assert torch.equal(a.decode(z[:, :, 3:]), b.decode(z[:, :, 3:]))
    with pytest.raises(ValueError, match="causal convs"):
        b.load_state({"feat": meta["feat"][:-1], "frames_in": 3}, tensors)


def test_decoder_rejects_bad_latents(vae64):
    with pytest.raises(ValueError, match="z_dim=16"):
        StreamingDecoder(vae64).decode(torch.randn(1, 8, 2, 4, 4))


def test_uint8_frames():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 1, 4).expand(1, 3, 1, 1, 4)
    f = to_uint8_frames(v)
    assert f.shape == (1, 1, 1, 4, 3) and f[0, 0, 0, :, 0].tolist() == [0, 128, 255, 255]


def test_load_vae_from_a_diffusers_folder(tmp_path, vae64):
    from lol_model.model.vae import load_vae

    vae = tiny_vae(seed=5)
    vae.save_pretrained(str(tmp_path / "wan" / "vae"))
    loaded = load_vae(str(tmp_path / "wan"))
    z = torch.randn(1, 16, 2, 2, 2)
    assert torch.equal(StreamingDecoder(vae).decode(z), StreamingDecoder(loaded).decode(z))
    with pytest.raises(ValueError, match="AutoencoderKLWan folder"):
        load_vae(str(tmp_path / "nope"))


def test_decoder_feature_cache_is_constant_size(vae64):
    dec = StreamingDecoder(vae64)
    sizes = []
    for _ in range(4):
        dec.decode(torch.randn(1, 16, 3, 2, 2, dtype=torch.float64))
        sizes.append(sum(f.numel() for f in dec.feat_map if isinstance(f, torch.Tensor)))
    assert sizes[1] == sizes[2] == sizes[3] > 0
