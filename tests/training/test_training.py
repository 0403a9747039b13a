"""Training forward of CausalWanModel (lol_model.training): teacher and diffusion forcing equal the
streaming generator's cache reads (sink/window eviction, RoPE jitter), AdamW lowers the
flow-matching loss, gradients reach every parameter, bad arguments are named, bf16 trains.
Tiny random models on the CPU, fp32."""

import math

import pytest
import torch

import lol_kernels as lk
from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel
from lol_model.streaming.presets import get_cache_config
from lol_model.streaming.sampling import write_block
from lol_model.training import (
    add_noise,
    block_context,
    flow_matching_loss,
    sample_block_timesteps,
    training_forward,
    training_loss,
)

CFG = ModelConfig.preset("tiny")
pytestmark = pytest.mark.usefixtures("one_thread_module")

# (preset, overrides): every sink + window configuration at absolute positions, sized so that
# a 2-frame block evicts from its third block on (growing: never evicts)
CACHES = [("sink-window", dict(sink_frames=1, local_attn_size=5)),
          ("longlive", dict(sink_size=2, local_attn_size=5)),
          ("self-forcing-rolling", dict(local_attn_size=4)),
          ("growing", {})]
CACHE_IDS = [name for name, _ in CACHES]


def random_model(dtype=torch.float32, sigma=0.6) -> CausalWanModel:
    m = CausalWanModel(CFG).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    m.configure_rope(jitter_sigma=sigma, seed=3)
    return m


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def text(model, B, grad=False):
    ctx = torch.randn(B, 5, CFG.text_dim, dtype=model.dtype)
    with torch.set_grad_enabled(grad):
        return model.encode_text(ctx)


def stream(model, cc, context, ctx_t, noisy, t, Fb):
    """The generator's loop (lol_model.streaming.sampling): per block a denoising forward of ``noisy`` at
    ``t`` against the cache read, then the write pass of ``context`` at ``ctx_t`` (the
    generator's ``write_block`` when ``ctx_t`` is 0). Returns (predictions, write outputs)."""
    B, _, Fr, H, W = context.shape
    gh, gw = model.grid(H, W)
    cache = cc.new_cache(model, frame_tokens=gh * gw, block_frames=Fb, batch_size=B)
    tk = text(model, B)
    preds, writes = [], []
    for s in range(0, Fr, Fb):
        own = slice(s, s + Fb)
        read = cc.read(cache, Fb)
        preds.append(model(noisy[:, :, own], t[:, own], tk, cache, read, backend="torch"))
        if not bool(ctx_t.any()):
            blk = write_block(model, context[:, :, own], tk, cache, read)
            writes.append(model(context[:, :, own], ctx_t[:, own], tk, cache, read, write=blk,
                                backend="torch"))
        else:
            blk = cache.append_frames(lk.token_positions(read.q_t, gh, gw, B))
            writes.append(model(context[:, :, own], ctx_t[:, own], tk, cache, read, write=blk,
                                backend="torch"))
        # the cache holds exactly the frames block_context says the next block attends
        assert [fr.serial for fr in cache.frames()] == \
            block_context(Fr + Fb, Fb, cc)[s // Fb + 1]
    return tk, torch.cat(preds, 2), torch.cat(writes, 2)


# --------------------------------------------------------------------------- streaming parity
@pytest.mark.parametrize("ctx_noise", [0.0, 150.0], ids=["clean-ctx", "ctx-noise"])
@pytest.mark.parametrize("name,over", CACHES, ids=CACHE_IDS)
def test_training_forward_equals_streaming(name, over, ctx_noise):
    """Teacher forcing == each block's denoising prediction after the write passes of the
    blocks before it; diffusion forcing == the write passes themselves (each block attending
    the earlier blocks at their own noise level). 5 blocks of 2 frames, jitter on."""
    torch.manual_seed(0)
    model = random_model()
    cc = get_cache_config(name, **over)
    B, Fb, nb, H, W = 2, 2, 5, 4, 6
    Fr = Fb * nb
    clean = torch.randn(B, CFG.in_channels, Fr, H, W)
    noisy = torch.randn_like(clean)
    t = sample_block_timesteps(B, Fr, Fb, generator=torch.Generator().manual_seed(1))
    ctx_t = torch.full((B, Fr), ctx_noise)
    with torch.no_grad():
        tk, preds, writes = stream(model, cc, clean, ctx_t, noisy, t, Fb)
        teacher = training_forward(model, clean, noisy, t, tk, block_frames=Fb, cache=cc,
                                   context_timestep=ctx_t, backend="torch")
        diffusion = training_forward(model, None, clean, ctx_t, tk, block_frames=Fb,
                                     mode="diffusion", cache=cc, backend="torch")
        errs = [rel_err(teacher[:, :, s:s + Fb], preds[:, :, s:s + Fb]) for s in range(0, Fr, Fb)]
        assert max(errs) < 1e-5, errs
        assert rel_err(diffusion, writes) < 1e-5
        if name != "growing":  # the window matters: seeing every earlier frame differs
            ctx = block_context(Fr, Fb, cc)
            assert len(ctx[-1]) < Fr - Fb
            every = training_forward(model, clean, noisy, t, tk, block_frames=Fb,
                                     context_timestep=ctx_t, backend="torch")
            assert rel_err(every[:, :, -Fb:], preds[:, :, -Fb:]) > 1e-3
            assert rel_err(every[:, :, :2 * Fb], preds[:, :, :2 * Fb]) < 1e-5  # no eviction yet


@pytest.mark.parametrize("name,over,Fb", [
    ("longlive", {}, 3), ("lol", {}, 3), ("sink-window", {}, 2), ("self-forcing", {}, 3),
    ("self-forcing-rolling", {}, 3), ("growing", {}, 3), ("sink-window", dict(sink_frames=4), 3)],
    ids=["longlive", "lol", "sink-window-2", "self-forcing", "self-forcing-rolling", "growing",
         "sink-spans-blocks"])
def test_block_context_is_what_the_cache_holds(name, over, Fb):
    """Long streams of the real presets (no model): the frames the cache holds before each
    block are block_context's, in read order."""
    cc = get_cache_config(name, **over)
    model = CausalWanModel(CFG)
    cache = cc.new_cache(model, frame_tokens=4, block_frames=Fb)
    Fr = Fb * 12
    ctx = block_context(Fr, Fb, cc)
    for i in range(Fr // Fb):
        assert [fr.serial for fr in cache.frames()] == ctx[i], i
        assert cc.read(cache, Fb).frame_t.tolist() == ctx[i]  # absolute positions
        cache.append_frames(lk.token_positions(torch.arange(i * Fb, (i + 1) * Fb), 2, 2))
    assert block_context(Fr, Fb) == [list(range(s)) for s in range(0, Fr, Fb)]


# --------------------------------------------------------------------------- training
def synthetic_clip(B, Fr, H, W):
    """Smooth moving waves, one phase per sample: ``[B, 16, F, H, W]`` in [-1, 1]."""
    c, f, h, w, b = (torch.arange(n, dtype=torch.float32) for n in (16, Fr, H, W, B))
    return torch.sin(0.7 * h.view(1, 1, 1, H, 1) + 0.075 * c.view(1, 16, 1, 1, 1)
                     * w.view(1, 1, 1, 1, W) + 0.5 * f.view(1, 1, Fr, 1, 1)
                     + b.view(B, 1, 1, 1, 1) + c.view(1, 16, 1, 1, 1))


@pytest.mark.parametrize("mode", ["teacher", "diffusion"])
def test_adamw_lowers_the_flow_matching_loss(mode):
    torch.manual_seed(0)
    model = CausalWanModel(CFG)
    model.configure_rope(jitter_sigma=0.6, seed=1)
    cc = get_cache_config("sink-window", sink_frames=1, local_attn_size=5)
    x0 = synthetic_clip(2, 6, 4, 4)
    ctx = torch.randn(2, 5, CFG.text_dim, generator=torch.Generator().manual_seed(1))

    def held_out():  # fixed noise and timesteps: the same draw before and after
        with torch.no_grad():
            return float(training_loss(model, x0, model.encode_text(ctx), block_frames=2,
                                       mode=mode, cache=cc,
                                       generator=torch.Generator().manual_seed(123)))

    before = held_out()
    assert held_out() == before  # deterministic: a drop is the optimizer's doing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        loss = training_loss(model, x0, model.encode_text(ctx), block_frames=2, mode=mode,
                             cache=cc, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


@pytest.mark.parametrize("mode", ["teacher", "diffusion"])
def test_gradients_reach_every_parameter(mode):
    model = random_model()
    x0 = torch.randn(1, CFG.in_channels, 4, 4, 4)
    loss = training_loss(model, x0, text(model, 1, grad=True), block_frames=2, mode=mode,
                         cache=get_cache_config("sink-window", sink_frames=1, local_attn_size=4),
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert not zero, zero


def test_context_gets_gradients_in_teacher_forcing():
    """The clean clip is not a constant: the noisy blocks' loss reaches the context frames
    they attend (and not the last block's clean frames, which nothing attends)."""
    model = random_model()
    clean = torch.randn(1, CFG.in_channels, 6, 4, 4, requires_grad=True)
    noisy = torch.randn(1, CFG.in_channels, 6, 4, 4)
    out = training_forward(model, clean, noisy, 500.0, text(model, 1), block_frames=2)
    out.square().sum().backward()
    per_frame = clean.grad.abs().sum(dim=(0, 1, 3, 4))
    assert bool((per_frame[:4] > 0).all()) and bool((per_frame[4:] == 0).all()), per_frame


def test_bad_arguments_name_the_argument():
    model = random_model()
    B, Fr = 1, 4
    clean = torch.randn(B, CFG.in_channels, Fr, 4, 4)
    tk = text(model, B)

    def call(**kw):
        args = dict(clean=clean, noisy=clean, timesteps=500.0, text_kv=tk, block_frames=2)
        return training_forward(model, **{**args, **kw})

    for kw, name in [(dict(mode="teacher-forcing"), "mode"), (dict(block_frames=3), "block_frames"),
                     (dict(block_frames=0), "block_frames"), (dict(clean=None), "clean"),
                     (dict(clean=clean[:, :, :2]), "clean"), (dict(mode="diffusion"), "clean"),
                     (dict(noisy=clean[0]), "noisy"), (dict(timesteps=torch.zeros(B, 3)),
                                                       "timesteps"),
                     (dict(context_timestep=torch.zeros(2)), "context_timestep"),
                     (dict(cache="relativistic"), "cache"), (dict(cache="slow-fast"), "cache"),
                     (dict(cache="moc"), "cache"), (dict(cache="no-such-cache"), "cache"),
                     (dict(cache=get_cache_config("sink-window", local_attn_size=5)),
                      "local_attn_size")]:
        with pytest.raises(ValueError, match=name):
            call(**kw)
    with pytest.raises(TypeError, match="cache"):
        call(cache=3)
    for kw, name in [(dict(min_t=500.0, max_t=100.0), "max_t"), (dict(shift=0.0), "shift")]:
        with pytest.raises(ValueError, match=name):
            sample_block_timesteps(B, Fr, 2, **kw)
    with pytest.raises(ValueError, match="block_frames"):
        sample_block_timesteps(B, Fr, 3)


def test_per_block_noise_levels():
    t = sample_block_timesteps(3, 12, 3, generator=torch.Generator().manual_seed(0), shift=5.0)
    assert t.shape == (3, 12) and t.dtype == torch.float32
    blocks = t.view(3, 4, 3)
    assert bool((blocks == blocks[..., :1]).all())  # one level per block
    assert len(set(blocks[..., 0].reshape(-1).tolist())) == 12  # every block its own
    assert bool(((t >= 20) & (t <= 980)).all())
    one = sample_block_timesteps(2, 6, 3, uniform=True)
    assert bool((one == one[:, :1]).all())
    # x_t = (1 - sigma) x0 + sigma noise; the flow noise - x0 is a zero loss
    x0, n = torch.randn(2, 16, 6, 2, 2), torch.randn(2, 16, 6, 2, 2)
    xt = add_noise(x0, n, torch.full((2, 6), 250.0))
    torch.testing.assert_close(xt, 0.75 * x0 + 0.25 * n)
    assert float(flow_matching_loss(n - x0, x0, n)) == 0.0


@pytest.mark.parametrize("mode", ["teacher", "diffusion"])
def test_bf16_training_step_is_finite(mode):
    model = random_model(torch.bfloat16)
    ref = random_model(torch.float32)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x0 = torch.randn(1, CFG.in_channels, 4, 4, 4)
    ctx = torch.randn(1, 5, CFG.text_dim)
    losses = []
    for m in (model, ref):
        loss = training_loss(m, x0.to(m.dtype), m.encode_text(ctx), block_frames=2, mode=mode,
                             cache="sink-window", generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[0]) and abs(losses[0] - losses[1]) < 0.05 * losses[1], losses
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, n
        assert bool(torch.isfinite(p.grad).all()), n
