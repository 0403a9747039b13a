"""CausalWanModel: parity with diffusers' WanTransformer3DModel, streaming == block-causal full
forward, position policies, dtypes and input errors (tiny random models on the CPU)."""

import contextlib
import math

import pytest
import torch

import lol_kernels as lk
from lol_kernels.cache.slowfast import SlowFastCache
from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel
from lol_model.model.weights import load_weights
from tests.support.wan_reference import diffusers_model, fp64_diffusers

CFG = ModelConfig.preset("tiny")


def random_model(dtype=torch.float64, cfg=CFG) -> CausalWanModel:
    m = CausalWanModel(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)],
                         ids=["fp32", "fp64"])
def test_parity_with_diffusers(dtype, tol):
    """Whole clip as one block over an empty cache, sigma = 0: same output as diffusers."""
    B, Fr, H, W, L = 2, 3, 6, 10, 7
    ref = diffusers_model(CFG, dtype)
    model = load_weights(CausalWanModel(CFG).to(dtype), ref.state_dict()).eval()
    x = torch.randn(B, CFG.in_channels, Fr, H, W, dtype=dtype)
    t = torch.rand(B, dtype=dtype) * 1000
    ctx = torch.randn(B, L, CFG.text_dim, dtype=dtype)
    with torch.no_grad():
        with fp64_diffusers() if dtype == torch.float64 else contextlib.nullcontext():
            want = ref(x, t, ctx, return_dict=False)[0]
        cache = model.new_cache(frame_tokens=(H // 2) * (W // 2), sink_frames=1,
                                window_frames=2, block_frames=Fr, batch_size=B)
        got = model(x, t, model.encode_text(ctx), cache, lk.cache.read_cache(cache, Fr),
                    backend="torch")
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got, want) < tol
    # per-frame timesteps that are equal within a sample are diffusers' single timestep
    with torch.no_grad():
        got_f = model(x, t[:, None].expand(B, Fr), model.encode_text(ctx), cache,
                      lk.cache.read_cache(cache, Fr), backend="torch")
    assert torch.equal(got_f, got)
    # one prompt's text K/V (batch 1) is shared by every sample of the batch
    with torch.no_grad():
        one = model(x, t, model.encode_text(ctx[:1]), cache, lk.cache.read_cache(cache, Fr))
        many = model(x, t, model.encode_text(ctx[:1].expand(B, -1, -1)), cache,
                     lk.cache.read_cache(cache, Fr))
    assert rel_err(one, many) < tol


def test_timestep_sinusoid_is_upstream_float64():
    """Wan / Self-Forcing / LongLive: t cast to float64, omega_i = 10000 ** (-i / half),
    [cos, sin] of the outer product, cast last. Angles written out in Python floats here."""
    from diffusers.models.embeddings import get_timestep_embedding

    from lol_model.model.transformer import timestep_sinusoid

    dim, half = 256, 128
    t = torch.cat([torch.tensor([0.0, 0.5, 1.0, 250.0, 937.5, 999.0, 1000.0]),
                   torch.rand(57) * 1000])
    ang = torch.tensor([[ti * 10000.0 ** (-i / half) for i in range(half)]
                        for ti in t.double().tolist()], dtype=torch.float64)
    # fp64: same angles bit for bit (cos/sin through torch: libm and torch differ by 1 ulp)
    assert torch.equal(timestep_sinusoid(t, dim, torch.float64),
                       torch.cat([ang.cos(), ang.sin()], dim=-1))
    # cast to fp32: equal bit for bit to Python's libm cos/sin, from fp32 or bf16 timesteps
    want = torch.tensor([[math.cos(a) for a in row] + [math.sin(a) for a in row]
                         for row in ang.tolist()], dtype=torch.float64).float()
    got = timestep_sinusoid(t, dim, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    tb = t.to(torch.bfloat16)
    assert torch.equal(timestep_sinusoid(tb, dim, torch.float32),
                       timestep_sinusoid(tb.double(), dim, torch.float32))
    # diffusers' fp32 table rounds the angle t * omega in fp32: up to ~5e-5 off at t ~ 1000
    table = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert 1e-5 < float((got - table).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="dim"):
        timestep_sinusoid(t, 7, torch.float32)


# ---------------------------------------------------------------------------- streaming
def stream(model, x0, noisy, t, tk, blocks, *, sink=1, window=None, policy="absolute",
           causal=False):
    """Generator-style loop: per block a denoising forward on ``noisy`` at ``t`` and the write
    pass on the clean ``x0`` at t = 0. Returns (predictions, write-pass outputs)."""
    B, _, Fr, H, W = x0.shape
    gh, gw = model.grid(H, W)
    cache = model.new_cache(frame_tokens=gh * gw, sink_frames=sink,
                            window_frames=window or Fr, block_frames=max(blocks), batch_size=B)
    preds, clean, s = [], [], 0
    for j, n in enumerate(blocks):
        read = lk.cache.read_cache(cache, n, policy)
        preds.append(model(noisy[:, :, s:s + n], t[j], tk, cache, read,
                           causal_within_block=causal, backend="torch"))
        blk = cache.append_frames(lk.token_positions(read.q_t, gh, gw, B))
        clean.append(model(x0[:, :, s:s + n], torch.zeros(B, n), tk, cache, read, write=blk,
                           causal_within_block=causal, backend="torch"))
        s += n
    return preds, clean


@pytest.mark.parametrize("sigma", [0.0, 0.6], ids=["plain", "jitter"])
@pytest.mark.parametrize("blocks", [(1, 2, 1), (2, 2, 2)], ids=["1-2-1", "2-2-2"])
def test_streaming_equals_block_causal_full_forward(blocks, sigma):
    model = random_model()
    model.configure_rope(jitter_sigma=sigma, seed=3)
    B, Fr, H, W = 2, sum(blocks), 4, 6
    x0 = torch.randn(B, CFG.in_channels, Fr, H, W, dtype=torch.float64)
    noisy = torch.randn_like(x0)
    t = [torch.rand(B, dtype=torch.float64) * 1000 for _ in blocks]
    with torch.no_grad():
        tk = model.encode_text(torch.randn(B, 5, CFG.text_dim, dtype=torch.float64))
        preds, clean = stream(model, x0, noisy, t, tk, blocks)
        # write pass == one block-causal forward over the clean clip at t = 0
        full = model.forward_full(x0, torch.zeros(B, Fr), tk, block_frames=blocks)
        assert rel_err(torch.cat(clean, dim=2), full) < 1e-12
        # denoising pass == block-causal forward over [clean past, noisy block], per-frame t
        s = 0
        for j, n in enumerate(blocks):
            xin = torch.cat([x0[:, :, :s], noisy[:, :, s:s + n]], dim=2)
            tin = torch.cat([torch.zeros(B, s, dtype=torch.float64),
                             t[j][:, None].expand(B, n)], dim=1)
            want = model.forward_full(xin, tin, tk, block_frames=blocks[:j + 1])[:, :, s:]
            assert rel_err(preds[j], want) < 1e-12
            s += n
        # the mask matters: without it the first block would see the future
        free = model.forward_full(x0, torch.zeros(B, Fr), tk)
        assert rel_err(free[:, :, :blocks[0]], full[:, :, :blocks[0]]) > 1e-3


def test_token_causal_streaming_equals_masked_full_forward():
    model = random_model()
    blocks, B, H, W = (2, 1, 2), 1, 4, 6
    x0 = torch.randn(B, CFG.in_channels, sum(blocks), H, W, dtype=torch.float64)
    t = [torch.rand(B, dtype=torch.float64) * 1000 for _ in blocks]
    with torch.no_grad():
        tk = model.encode_text(torch.randn(B, 5, CFG.text_dim, dtype=torch.float64))
        _, clean = stream(model, x0, torch.randn_like(x0), t, tk, blocks, causal=True)
        want = model.forward_full(x0, torch.zeros(B, x0.shape[2]), tk, block_frames=blocks,
                                  causal_within_block=True)
        block_causal = model.forward_full(x0, torch.zeros(B, x0.shape[2]), tk,
                                          block_frames=blocks)
    assert rel_err(torch.cat(clean, dim=2), want) < 1e-12
    assert rel_err(want, block_causal) > 1e-3


def test_relativistic_equals_absolute_without_sink():
    """With no sink, a window read re-based to 0..n-1 (page_shift) is a uniform shift of the
    absolute positions, so RoPE gives the same output; with a sink it is not."""
    model = random_model()
    B, Fr, H, W = 1, 6, 4, 4
    blocks = (1,) * Fr
    x0 = torch.randn(B, CFG.in_channels, Fr, H, W, dtype=torch.float64)
    noisy = torch.randn_like(x0)
    t = [torch.rand(B, dtype=torch.float64) * 1000 for _ in blocks]
    with torch.no_grad():
        tk = model.encode_text(torch.randn(B, 5, CFG.text_dim, dtype=torch.float64))
        runs = {(p, sink): stream(model, x0, noisy, t, tk, blocks, sink=sink, window=2,
                                  policy=p)[0]
                for p in ("absolute", "relativistic") for sink in (0, 1)}
    for j in range(Fr):
        assert rel_err(runs["relativistic", 0][j], runs["absolute", 0][j]) < 1e-12
    assert rel_err(runs["relativistic", 1][-1], runs["absolute", 1][-1]) > 1e-6


@pytest.mark.parametrize("policy", ["absolute", "relativistic", "bounded", "cut"])
def test_every_policy_streams_with_eviction(policy):
    model = random_model(torch.float32)
    B, Fr, H, W = 1, 8, 4, 4
    gh, gw = model.grid(H, W)
    tk = model.encode_text(torch.randn(B, 5, CFG.text_dim))
    cache = model.new_cache(frame_tokens=gh * gw, sink_frames=1, window_frames=3,
                            block_frames=2, batch_size=B)
    with torch.no_grad():
        for _ in range(Fr // 2):
            if policy == "cut":
                read = lk.cache.cut(lk.cache.read_cache(cache, 2), start=cache.next_t + 40)
            else:
                read = lk.cache.read_cache(cache, 2, policy)
            x = torch.randn(B, CFG.in_channels, 2, H, W)
            y = model(x, torch.full((B, 2), 500.0), tk, cache, read)
            assert y.shape == x.shape and torch.isfinite(y).all()
            blk = cache.append_frames(lk.token_positions(read.q_t, gh, gw, B))
            model(x, torch.zeros(B, 2), tk, cache, read, write=blk)
    assert cache.num_frames == 4


def test_routed_slow_fast_with_every_chunk_equals_dense_read():
    """MoC over slow memory with top-k = all chunks attends exactly the dense read's keys; with
    top-k = 1 it attends fewer (and differs). The MoC op merges its parts with fp32 lse, so
    fp64 agreement is about 1e-8, not 1e-15."""
    model = random_model()
    B, H, W, n = 1, 4, 8, 10
    gh, gw = model.grid(H, W)
    cache = model.new_cache(frame_tokens=gh * gw, sink_frames=1, window_frames=2,
                            block_frames=1, cache_cls=SlowFastCache, slow_frames=4, tau=1.0)
    with torch.no_grad():
        tk = model.encode_text(torch.randn(B, 5, CFG.text_dim, dtype=torch.float64))
        for _ in range(n):  # random frames are novel: slow memory fills up
            read = cache.read(1, routed=False)
            x = torch.randn(B, CFG.in_channels, 1, H, W, dtype=torch.float64)
            blk = cache.append_frames(lk.token_positions(read.q_t, gh, gw, B))
            model(x, torch.zeros(B, 1), tk, cache, read, write=blk)
        assert len(cache.slow) == 4
        x = torch.randn(B, CFG.in_channels, 1, H, W, dtype=torch.float64)
        t = torch.full((B, 1), 600.0)
        dense = model(x, t, tk, cache, cache.read(1, routed=False))
        routed = {k: model(x, t, tk, cache, cache.read(1, routed=True), moc_topk=k,
                           moc_tile_size=16) for k in (4, 1)}
    assert rel_err(routed[4], dense) < 1e-6
    assert rel_err(routed[1], dense) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_streaming_close_to_fp64(dtype):
    model64 = random_model()
    model = CausalWanModel(CFG).to(dtype)
    model.load_state_dict(model64.state_dict())
    blocks, B, H, W = (2, 1), 1, 4, 6
    x0 = torch.randn(B, CFG.in_channels, 3, H, W, dtype=torch.float64)
    noisy = torch.randn_like(x0)
    t = [torch.full((B,), 800.0), torch.full((B,), 300.0)]
    ctx = torch.randn(B, 5, CFG.text_dim)
    with torch.no_grad():
        p64, _ = stream(model64, x0, noisy, t, model64.encode_text(ctx.double()), blocks)
        p, _ = stream(model, x0.to(dtype), noisy.to(dtype), t, model.encode_text(ctx), blocks)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for a, b in zip(p, p64, strict=True):
        assert a.dtype == dtype and rel_err(a, b) < tol


def test_forward_rejects_bad_inputs():
    model = random_model(torch.float32)
    tk = model.encode_text(torch.randn(1, 3, CFG.text_dim))
    cache = model.new_cache(frame_tokens=4, sink_frames=1, window_frames=2, block_frames=2)
    read = lk.cache.read_cache(cache, 2)
    x = torch.randn(1, CFG.in_channels, 2, 4, 4)
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(1, 3, 2, 4, 4), torch.zeros(1, 2), tk, cache, read)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(1, 3), tk, cache, read)
    with pytest.raises(ValueError, match="q_t"):
        model(x, torch.zeros(1, 2), tk, cache, lk.cache.read_cache(cache, 1))
    with pytest.raises(ValueError, match="tokens per frame"):
        model(torch.randn(1, CFG.in_channels, 2, 6, 4), torch.zeros(1, 2), tk, cache, read)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, CFG.in_channels, 2, 5, 4), torch.zeros(1, 2), tk, cache, read)
    cache64 = model.new_cache(frame_tokens=4, sink_frames=1, window_frames=2, block_frames=2,
                              dtype=torch.float64)
    with pytest.raises(TypeError, match="cache dtype"):
        model(x, torch.zeros(1, 2), tk, cache64, read)
    with pytest.raises(ValueError, match="text_dim"):
        model.encode_text(torch.randn(1, 3, CFG.text_dim + 1))
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig.preset("tiny", dim=60, num_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("wan-7b")
