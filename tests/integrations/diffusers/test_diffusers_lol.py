"""``lol_model.diffusers.apply_lol`` on tiny random diffusers Wan models and pipelines.

* sigma 0: the stock ``WanAttnProcessor``'s output within 1e-6 (fp32), layer and model;
* sigma 0.8: this project's float64 reference attention with the jittered table (RoPE by
  ``lol_kernels.rope.reference``, a plain softmax), under the parity rule of docs/design.md §5
  (with a 1e-6 slack instead of 1e-5), at the attention layer, the whole transformer and a
  whole ``WanPipeline`` run;
* ``torch.compile``, ``remove_lol`` (bit-identical outputs), pipelines (``transformer_2``,
  the I2V image branch left to diffusers) and argument errors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

import lol_kernels as lk
from lol_kernels.rope.reference import rope_cos_sin, rotate_pairs
from lol_model.integrations.diffusers.processor import (
    STATE_ATTR,
    LolWanAttnProcessor,
    VideoGrid,
    apply_lol,
    lol_settings,
    remove_lol,
    self_attentions,
    video_positions,
)
from tests.support import assert_close_rule, max_err
from tests.support.tiny_wan import TRANSFORMER, seeded, tiny_pipeline, tiny_transformer

H, D = TRANSFORMER["num_attention_heads"], TRANSFORMER["attention_head_dim"]
SIGMA = 0.8


class ReferenceProcessor:
    """This project's reference attention as a diffusers processor: Wan's projections, RoPE
    with ``table`` by the reference formulas, plain softmax, all in the layer's dtype (float64
    for a float64 model: the ground truth)."""

    def __init__(self, table, grid):
        self.table, self.grid = table, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        q, k = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, attn.to_v(hidden_states)))
        cos, sin = rope_cos_sin(self.grid.pos, self.table, q.dtype)  # [B, N, H, D/2]
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        p = (torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5).softmax(-1)
        out = torch.einsum("bhnm,bmhd->bnhd", p, v).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def with_reference(model, table):
    """``model`` (changed in place) with :class:`ReferenceProcessor` on every self-attention."""
    grid = VideoGrid(tuple(model.config.patch_size))
    model.rope.register_forward_pre_hook(grid.record)
    for attn in self_attentions(model).values():
        attn.set_processor(ReferenceProcessor(table, grid))
    return model


def jittered_table(sigma=SIGMA, seed=0):
    return lk.rope_frequencies(D, H, jitter_sigma=sigma, seed=seed)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(seed=0)


def model_inputs(B=2, F=3, h=6, w=10, L=7):
    """Latents ``[B, 16, F, h, w]`` (an awkward 3 x 3 x 5 token grid), timesteps, context."""
    return (torch.randn(B, 16, F, h, w), torch.rand(B) * 1000,
            torch.randn(B, L, TRANSFORMER["text_dim"]))


def forward(model, x, t, ctx, **kw):
    with torch.no_grad():
        return model(x.to(model.dtype), t, ctx.to(model.dtype), **kw).sample


def layer_input(model, B=2, F=3, gh=3, gw=5):
    """A self-attention layer of ``model`` with its grid set for ``F x gh x gw`` tokens and a
    random ``[B, N, dim]`` input."""
    grid = VideoGrid(tuple(model.config.patch_size))
    grid.record(None, (torch.empty(B, 16, F, 2 * gh, 2 * gw),))
    return grid, torch.randn(B, F * gh * gw, H * D)


# ------------------------------------------------------------------------------ sigma 0
def test_positions_and_table_match_diffusers_rope(model):
    """Token order and the unjittered table reproduce diffusers' rotary_emb for the grid."""
    x = torch.randn(1, 16, 3, 6, 10)
    cos, sin = model.rope(x)  # [1, N, 1, D], each frequency repeated over its channel pair
    pos = video_positions(3, 3, 5)
    assert torch.equal(pos, lk.token_positions(torch.arange(3), 3, 5))
    table = jittered_table(0.0)
    ang = pos.double().index_select(-1, table.pair_axis) * table.freqs[0]
    # diffusers stores cos/sin rounded to fp32 (2^-24 ~ 6e-8)
    assert max_err(cos[0, :, 0, 0::2], ang[0].cos()) < 1e-7
    assert max_err(sin[0, :, 0, 1::2], ang[0].sin()) < 1e-7


def test_sigma0_layer_equals_stock(model):
    attn = model.blocks[0].attn1
    grid, h = layer_input(model)
    rotary = model.rope(torch.empty(2, 16, 3, 6, 10))
    with torch.no_grad():
        ref = WanAttnProcessor()(attn, h, None, None, rotary)
        got = LolWanAttnProcessor(jittered_table(0.0), grid, backend="torch")(attn, h)
    assert max_err(got, ref) <= 1e-6


def test_sigma0_model_equals_stock(model):
    x, t, ctx = model_inputs()
    ref = forward(model, x, t, ctx)
    apply_lol(model, 0.0)
    try:
        got = forward(model, x, t, ctx)
    finally:
        remove_lol(model)
    assert max_err(got, ref) <= 1e-6


def test_sigma0_pipeline_equals_stock():
    """A whole WanPipeline run (2 Euler steps, no CFG: CFG scales the difference by 2 g + 1)."""
    pipe = tiny_pipeline(seed=1)
    kw = dict(prompt="a red fox", height=32, width=48, num_frames=9, num_inference_steps=2,
              guidance_scale=1.0, output_type="latent", max_sequence_length=16)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    apply_lol(pipe, 0.0)
    got = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    assert max_err(got, ref) <= 1e-6


# ------------------------------------------------------------------------------ sigma 0.8
def test_sigma08_layer_matches_float64_reference(model):
    table = jittered_table()
    attn = model.blocks[1].attn1
    grid, h = layer_input(model)
    attn64 = copy.deepcopy(attn).double()
    with torch.no_grad():
        got = LolWanAttnProcessor(table, grid)(attn, h)
        ref64 = ReferenceProcessor(table, grid)(attn64, h.double())
        ref32 = ReferenceProcessor(table, grid)(attn, h)
        stock = WanAttnProcessor()(attn, h, None, None, model.rope(torch.empty(2, 16, 3, 6, 10)))
    assert_close_rule(got, ref32, ref64, "attn1 at sigma 0.8", slack=1e-6)
    assert max_err(got, stock) > 1e-3  # the jitter changes the layer


def test_sigma08_model_matches_float64_reference(model):
    table = jittered_table(seed=3)
    x, t, ctx = model_inputs()
    ref64 = forward(with_reference(copy.deepcopy(model).double(), table), x, t, ctx)
    ref32 = forward(with_reference(copy.deepcopy(model), table), x, t, ctx)
    apply_lol(model, SIGMA, seed=3)
    try:
        got = forward(model, x, t, ctx)
    finally:
        remove_lol(model)
    assert_close_rule(got, ref32, ref64, "transformer at sigma 0.8", slack=1e-6)


def test_sigma08_pipeline_matches_float64_reference():
    """End to end: a WanPipeline run with classifier-free guidance, against the same pipeline
    with a float64 transformer running the reference attention."""
    table = jittered_table()
    kw = dict(prompt="a red fox", negative_prompt="rain", height=32, width=32, num_frames=9,
              num_inference_steps=2, output_type="latent", max_sequence_length=16)

    def run(pipe):
        return pipe(generator=torch.Generator().manual_seed(0), **kw).frames.double()

    pipe = tiny_pipeline(seed=2)
    stock = pipe.transformer
    ref64 = run(tiny_pipeline(2, with_reference(copy.deepcopy(stock).double(), table)))
    ref32 = run(tiny_pipeline(2, with_reference(copy.deepcopy(stock), table)))
    got = run(apply_lol(pipe, SIGMA))
    assert_close_rule(got, ref32, ref64, "WanPipeline latents at sigma 0.8",
                      slack=1e-6)


# ------------------------------------------------------------------------------ compile, remove
def test_torch_compile_fullgraph(model):
    """The processors and the grid hook trace in one graph and give the eager result."""
    x, t, ctx = model_inputs(B=1)
    apply_lol(model, SIGMA)
    try:
        eager = forward(model, x, t, ctx)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = forward(compiled, x, t, ctx)
        assert torch.equal(got, eager)
        apply_lol(compiled, 0.0)  # a compiled model is accepted too
        assert lol_settings(model)["jitter_sigma"] == 0.0
    finally:
        remove_lol(model)
        torch._dynamo.reset()


def test_remove_restores_stock_bit_identical(model):
    x, t, ctx = model_inputs(B=1, F=2)
    stock = {n: a.processor for n, a in model.named_modules() if hasattr(a, "processor")}
    ref = forward(model, x, t, ctx)
    apply_lol(model, SIGMA, seed=5)
    apply_lol(model, 0.3)  # applying again replaces the settings, remembering the stock ones
    assert lol_settings(model) == {"jitter_sigma": 0.3, "seed": 0, "backend": "auto"}
    assert not torch.equal(forward(model, x, t, ctx), ref)
    remove_lol(model)
    remove_lol(model)  # a model without LoL is left as it is
    now = {n: a.processor for n, a in model.named_modules() if hasattr(a, "processor")}
    assert now.keys() == stock.keys() and all(now[n] is stock[n] for n in stock)
    assert not model.rope._forward_pre_hooks and not hasattr(model, STATE_ATTR)
    assert torch.equal(forward(model, x, t, ctx), ref)


def test_only_self_attention_changes(model):
    apply_lol(model, SIGMA)
    try:
        for blk in model.blocks:
            assert isinstance(blk.attn1.processor, LolWanAttnProcessor)
            assert type(blk.attn2.processor) is WanAttnProcessor
        assert len(self_attentions(model)) == TRANSFORMER["num_layers"]
    finally:
        remove_lol(model)


def test_pipeline_with_transformer_2():
    """Wan 2.2 pipelines hold two experts: both get LoL, both get their stock processors back."""
    from diffusers import WanPipeline

    p = tiny_pipeline(seed=0)
    pipe = WanPipeline(p.tokenizer, p.text_encoder, p.vae, p.scheduler, p.transformer,
                       tiny_transformer(seed=1), boundary_ratio=0.5)
    assert apply_lol(pipe, SIGMA) is pipe
    for tr in (pipe.transformer, pipe.transformer_2):
        assert all(isinstance(a.processor, LolWanAttnProcessor)
                   for a in self_attentions(tr).values())
    remove_lol(pipe)
    for tr in (pipe.transformer, pipe.transformer_2):
        assert all(type(a.processor) is WanAttnProcessor for a in self_attentions(tr).values())


def test_i2v_image_branch_stays_diffusers():
    """An image-to-video pipeline: attn2 (text + image K/V) keeps diffusers' processor, and at
    sigma 0 the image-conditioned forward equals the stock one."""
    from diffusers import WanImageToVideoPipeline

    p = tiny_pipeline(seed=0)
    tr = tiny_transformer(seed=4, in_channels=36, image_dim=24, added_kv_proj_dim=H * D)
    pipe = WanImageToVideoPipeline(p.tokenizer, p.text_encoder, p.vae, p.scheduler,
                                   transformer=tr)
    x = torch.randn(1, 36, 2, 4, 6)
    t, ctx, img = torch.tensor([700.0]), torch.randn(1, 512, 32), torch.randn(1, 5, 24)
    ref = forward(tr, x, t, ctx, encoder_hidden_states_image=img)
    apply_lol(pipe, 0.0)
    assert all(type(b.attn2.processor) is WanAttnProcessor and b.attn2.add_k_proj is not None
               for b in tr.blocks)
    got = forward(tr, x, t, ctx, encoder_hidden_states_image=img)
    assert max_err(got, ref) <= 1e-6
    remove_lol(pipe)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad,exc,msg", [
    (dict(transformer=torch.nn.Linear(2, 2)), TypeError, "WanTransformer3DModel"),
    (dict(transformer="Wan2.1-T2V-1.3B-Diffusers"), TypeError, "WanTransformer3DModel"),
    (dict(jitter_sigma=1.0), ValueError, r"jitter_sigma must be in \[0, 1\)"),
    (dict(jitter_sigma=-0.1), ValueError, "jitter_sigma"),
    (dict(jitter_sigma=math.nan), ValueError, "jitter_sigma"),
    (dict(jitter_sigma="0.8"), TypeError, "jitter_sigma"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(backend="cuda"), ValueError, "backend"),
], ids=["module", "path", "sigma-1", "sigma-neg", "sigma-nan", "sigma-str", "seed", "backend"])
def test_bad_arguments(model, bad, exc, msg):
    kw = {"transformer": model, **bad}
    with pytest.raises(exc, match=msg):
        apply_lol(kw.pop("transformer"), **kw)
    assert not hasattr(model, STATE_ATTR)  # nothing was changed


def test_pipeline_without_wan_transformer():
    class NotWan:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Wan pipeline"):
        apply_lol(NotWan())
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        remove_lol(NotWan())


def test_other_rope_base_refused():
    m = tiny_transformer(seed=0)
    m.rope = seeded(0, lambda: WanRotaryPosEmbed(D, (1, 2, 2), 64, theta=500.0))
    with pytest.raises(ValueError, match="RoPE buffers"):
        apply_lol(m)


def test_processor_outside_forward(model):
    """Called without the grid of its forward (no hook ran, or another token count)."""
    grid, h = layer_input(model)
    proc = LolWanAttnProcessor(jittered_table(), VideoGrid((1, 2, 2)))
    with torch.no_grad(), pytest.raises(ValueError, match="pre-hook on transformer.rope"):
        proc(model.blocks[0].attn1, h)
    with torch.no_grad(), pytest.raises(ValueError, match="pre-hook"):
        LolWanAttnProcessor(jittered_table(), grid)(model.blocks[0].attn1, h[:, :-1])
    with pytest.raises(ValueError, match="self-attention only"):
        LolWanAttnProcessor(jittered_table(), grid)(model.blocks[0].attn1, h, h)
