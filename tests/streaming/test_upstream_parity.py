"""Parity of lol_model's streaming generator with a float64 reference of upstream's streaming
(``tests/support/upstream_reference.py``: LongLive 1.0, Self-Forcing), block for block.

Both sides use the same weights (the tiny preset), the same prompt contexts, the same sigmas and
the same noise draws; every block's clean latents ``x0`` are compared. In float64 the sides agree
to ~1e-15. A one-frame change of the attended set moves ``x0`` by ~1e-2, a wrong recache by
~1e-3 (negative controls below), so ``TOL64`` sits many decades away from both.
"""

from __future__ import annotations

import pytest
import torch

from lol_model.model.config import ModelConfig
from lol_model.model.text import encode_prompt
from lol_model.model.transformer import CausalWanModel
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream
from tests.support.upstream_reference import UpstreamStream

TOL64 = 1e-10  # float64: measured ~1e-15
TOL32 = 2e-5  # float32 lol_model against the float64 reference: measured ~5e-7
BLOCKS = 12
LATENT = (4, 8)  # latent height x width: a 2 x 4 token grid (h != w catches a transposed axis)
SWITCH_LATE = "a cat[5] | a dog[5] | a bird"  # switches at frames 15 and 30 (> L = 12)
SWITCH_EARLY = "a cat[2] | a dog[2] | a bird"  # switches at frames 6 and 12 (<= L)


pytestmark = pytest.mark.usefixtures("one_thread")


def side_by_side(settings: StreamSettings, refs: dict, *, blocks: int = BLOCKS):
    """Run lol_model's stream and each reference for ``blocks`` blocks.

    ``refs``: name -> keyword arguments of :class:`UpstreamStream`, plus ``"recache_prompt":
    "old"`` for a control that recaches under the previous prompt. Returns ``(errors, streams)``:
    per reference the max abs difference of ``x0`` per block, and the reference objects.
    """
    st = new_stream(settings)
    grid = st.model.grid(*LATENT)
    ctx = [encode_prompt(st.text_encoder, sg.prompt, batch_size=settings.batch_size, index=i)
           for i, sg in enumerate(st.schedule.segments)]
    streams, texts, old_prompt, gens = {}, {}, {}, {}
    for name, kw in refs.items():
        kw = dict(kw)
        old_prompt[name] = kw.pop("recache_prompt", "new") == "old"
        streams[name] = UpstreamStream(st.model, grid, batch_size=settings.batch_size, **kw)
        texts[name] = [streams[name].encode_text(c) for c in ctx]
        gens[name] = torch.Generator().manual_seed(settings.seed)
    errors = {name: [] for name in refs}
    seg = 0
    for b in range(blocks):
        x0 = advance(st).double()
        new_seg = st.schedule.segment_index(b)
        for name, ref in streams.items():
            if new_seg != seg:
                ref.recache_after_switch(texts[name][seg if old_prompt[name] else new_seg])
            y = ref.generate_block(texts[name][new_seg], st.latent_shape, st.sigmas, gens[name])
            errors[name].append(float((x0 - y).abs().max()))
        seg = new_seg
    return errors, streams


def settings(cache: str, prompt: str = "a cat", dtype: str = "float64", **kw) -> StreamSettings:
    return StreamSettings(prompt=prompt, blocks=BLOCKS, cache=cache, dtype=dtype,
                          latent_height=LATENT[0], latent_width=LATENT[1], decode=False, **kw)


def fmt(errs) -> str:
    return " ".join(f"{e:.1e}" for e in errs)


# name: (lol_model settings, reference arguments)
CASES = {
    # Self-Forcing local_attn_size=-1 as LongLive runs it past 21 frames: the whole video cached,
    # the newest 32760 tokens (21 frames) attended; Self-Forcing itself stops at 21 frames
    "self-forcing-global": (dict(cache="self-forcing"),
                            dict(sink_size=0, local_attn_size=-1, total_frames=3 * BLOCKS)),
    "self-forcing-rolling": (dict(cache="self-forcing-rolling"),
                             dict(sink_size=0, local_attn_size=9, flavor="self-forcing")),
    "longlive": (dict(cache="longlive"), dict(sink_size=3, local_attn_size=12)),
    "sink-window-3-12": (dict(cache="sink-window", sink_frames=3, local_attn_size=12),
                         dict(sink_size=3, local_attn_size=12)),
    "longlive-switch-global-sink": (dict(cache="longlive", prompt=SWITCH_LATE, global_sink=True),
                                    dict(sink_size=3, local_attn_size=12, global_sink=True)),
    "longlive-switch-local-sink": (dict(cache="longlive", prompt=SWITCH_LATE, global_sink=False),
                                   dict(sink_size=3, local_attn_size=12, global_sink=False)),
    "longlive-switch-early-global-sink": (
        dict(cache="longlive", prompt=SWITCH_EARLY, global_sink=True),
        dict(sink_size=3, local_attn_size=12, global_sink=True)),
    "longlive-switch-early-local-sink": (
        dict(cache="longlive", prompt=SWITCH_EARLY, global_sink=False),
        dict(sink_size=3, local_attn_size=12, global_sink=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_upstream_reference_float64(case):
    lol, ref = CASES[case]
    errors, _ = side_by_side(settings(**lol), {"ref": ref})
    errs = errors["ref"]
    assert max(errs) <= TOL64, f"{case}: max |x0 - ref| per block: {fmt(errs)}"


def test_matches_upstream_reference_float32():
    """fp32 lol_model (LongLive, a prompt switch) against the float64 reference."""
    lol, ref = CASES["longlive-switch-global-sink"]
    errors, _ = side_by_side(settings(dtype="float32", **lol), {"ref": ref})
    assert max(errors["ref"]) <= TOL32, f"max |x0 - ref| per block: {fmt(errors['ref'])}"


def test_self_forcing_global_cache_is_21_frames_then_stops():
    """Self-Forcing's own global cache (32760 tokens = 21 frames) equals the preset for the 7
    blocks it can make; its 8th block overflows upstream's buffer (upstream fails there)."""
    errors, refs = side_by_side(settings("self-forcing"), {
        "sf": dict(sink_size=0, local_attn_size=-1, flavor="self-forcing")}, blocks=7)
    assert max(errors["sf"]) <= TOL64, fmt(errors["sf"])
    sf = refs["sf"]
    assert [r[2] for r in sf.reads[::5]] == [tuple(range(3 * b + 3)) for b in range(7)]
    text = sf.encode_text(torch.zeros(1, sf.cfg.text_len, sf.cfg.text_dim))
    with pytest.raises(ValueError, match="overflow"):
        sf.generate_block(text, (1, 16, 3, *LATENT), [1.0], torch.Generator())


@pytest.mark.parametrize("wrong_L", [11, 13, 15], ids=lambda L: f"L{L}")
def test_negative_control_wrong_window_fails(wrong_L):
    """A reference attending one frame fewer / more, or a block more, than LongLive's 12 differs
    from block 4 on (the first block that rolls) by far more than the tolerance."""
    errors, _ = side_by_side(settings("longlive"), {
        "right": dict(sink_size=3, local_attn_size=12),
        "wrong": dict(sink_size=3, local_attn_size=wrong_L)})
    assert max(errors["right"]) <= TOL64, fmt(errors["right"])
    wrong = errors["wrong"]
    assert max(wrong[:3]) <= TOL64, fmt(wrong)  # blocks 0-2 attend everything either way
    assert min(wrong[4:]) > 1e4 * TOL64, fmt(wrong)


@pytest.mark.parametrize("control", ["old-prompt", "global-sink-flipped", "block-causal"])
def test_negative_control_wrong_recache_fails(control):
    """The blocks after a switch (frame 15 > L) see a wrong recache: the recache under the old
    prompt, the other ``global_sink``, or lol_model's block-causal recache."""
    lol, ref = CASES["longlive-switch-local-sink" if control == "global-sink-flipped"
                     else "longlive-switch-global-sink"]
    if control == "block-causal":
        lol = dict(lol, recache="block-causal")
    wrong = dict(ref, recache_prompt="old") if control == "old-prompt" else \
        dict(ref, global_sink=not ref["global_sink"]) if control == "global-sink-flipped" else ref
    errors, _ = side_by_side(settings(**lol), {"wrong": wrong})
    errs = errors["wrong"]
    assert max(errs[:5]) <= TOL64, fmt(errs)  # identical before the first switch
    assert errs[5] > 1e4 * TOL64, fmt(errs)  # the first block after it


def reads_of(sink: int, L: int, *, switches=(), global_sink: bool = True, **kw):
    """The reference alone over ``BLOCKS`` blocks, recaching before the blocks in ``switches``:
    ``(kind, start frame, frames, frames attended)`` of each block and recache (layer 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalWanModel(ModelConfig.preset("tiny")).double().eval()
    ref = UpstreamStream(model, model.grid(*LATENT), sink_size=sink, local_attn_size=L,
                         global_sink=global_sink, **kw)
    text = ref.encode_text(torch.randn(1, model.cfg.text_len, model.cfg.text_dim))
    sigmas, gen, reads = [1.0, 0.5], torch.Generator().manual_seed(0), []
    for b in range(BLOCKS):
        if b in switches:
            ref.reads.clear()
            ref.recache_after_switch(text)
            reads.append(("recache", *ref.reads[0]))
        ref.reads.clear()
        ref.generate_block(text, (1, 16, 3, *LATENT), sigmas, gen)
        assert len({r[2] for r in ref.reads}) == 1  # every step and the clean pass alike
        reads.append(("block", *ref.reads[0]))
    return reads


def test_reference_attends_what_upstream_attends():
    """The reference's own frame sets, upstream's: LongLive 3 sink + 6 cached + 3 new;
    Self-Forcing rolling 6 + 3; global the newest 21; the recache at frame 15 recomputes
    frames 3..14, attending the old sink + 6..14 (global_sink) or 3..14, whose 3..5 become the
    sink (no global sink)."""
    def window(b, S, L):
        return tuple(range(S)) + tuple(range(max(S, 3 * b + 3 - (L - S)), 3 * b + 3))

    blocks = [r for r in reads_of(3, 12) if r[0] == "block"]
    assert [r[1:] for r in blocks] == [(3 * b, 3, window(b, 3, 12)) for b in range(BLOCKS)]
    assert [r[3] for r in reads_of(0, 9)] == [window(b, 0, 9) for b in range(BLOCKS)]
    assert [r[3] for r in reads_of(0, -1, total_frames=3 * BLOCKS)] == \
        [window(b, 0, 21) for b in range(BLOCKS)]
    glob = reads_of(3, 12, switches=(5, 10))
    assert glob[5] == ("recache", 3, 12, (0, 1, 2, *range(6, 15)))
    assert glob[6] == ("block", 15, 3, (0, 1, 2, *range(9, 18)))
    local = reads_of(3, 12, switches=(5, 10), global_sink=False)
    assert local[5] == ("recache", 3, 12, tuple(range(3, 15)))
    assert local[6] == ("block", 15, 3, (3, 4, 5, *range(9, 18)))
    assert local[11] == ("recache", 18, 12, tuple(range(18, 30)))
    assert local[12] == ("block", 30, 3, (18, 19, 20, *range(24, 33)))


def test_reference_recache_at_or_below_L_recomputes_the_sink():
    """cur <= L: one pass over frames 0..cur-1 from frame 0 (nothing protected), so the sink is
    recomputed under the new prompt whatever ``global_sink``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalWanModel(ModelConfig.preset("tiny")).double().eval()
    for global_sink in (True, False):
        ref = UpstreamStream(model, model.grid(*LATENT), sink_size=3, local_attn_size=12,
                             global_sink=global_sink)
        text = ref.encode_text(torch.randn(1, model.cfg.text_len, model.cfg.text_dim))
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            ref.generate_block(text, (1, 16, 3, *LATENT), [1.0], gen)
        before = ref.kv[-1].k.clone()  # layer 0's K precede any cross-attention
        ref.reads.clear()
        ref.recache_after_switch(ref.encode_text(torch.randn(1, model.cfg.text_len,
                                                              model.cfg.text_dim)))
        assert ref.reads == [(0, 12, tuple(range(12)))]
        assert ref.kv[0].frame.view(12, -1)[:, 0].tolist() == list(range(12))
        changed = (ref.kv[-1].k - before).abs().flatten(2).amax(-1)[0].view(12, -1).amax(-1)
        assert bool((changed > 1e-6).all()), changed  # sink frames 0..2 included
