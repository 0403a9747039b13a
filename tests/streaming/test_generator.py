"""Streaming generator: sampling math, cache configurations in constant memory, prompt
switches (recache, KV flush + RoPE cut), errors."""

import pytest
import torch

from lol_kernels.cache import PagedKVCache, read_cache, token_positions
from lol_model.streaming.driver import run
from lol_model.streaming.presets import CACHES, GrowingKVCache, get_cache_config
from lol_model.streaming.sampling import (
    denoise_block,
    sampling_sigmas,
    shift_sigma,
    sigmas_from_timesteps,
    write_block,
)
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream, sample_block
from tests.support.cache_checks import assert_same_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sigmas_are_the_shifted_base_sigmas():
    s = sampling_sigmas(4, 5.0)
    assert [round(1000 * x, 2) for x in s] == [1000.0, 937.5, 833.33, 625.0]
    base = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(torch.tensor(s, dtype=torch.float64), shift_sigma(base, 5.0))
    assert sampling_sigmas(2, 1.0) == [1.0, 0.5]
    assert sigmas_from_timesteps([1000, 500]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="steps"):
        sampling_sigmas(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sigmas_from_timesteps([500, 1000])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sigmas_from_timesteps([1200])


class _Cfg:
    patch_size = (1, 2, 2)


class OracleModel:
    """Predicts ``(x - c) / sigma`` so that every step's x0 is exactly ``c``; records calls."""

    cfg = _Cfg()

    def __init__(self, c):
        self.c, self.calls = c, []

    def __call__(self, x, t, text_kv, cache, read, write=None):
        self.calls.append((x.clone(), t.clone(), write))
        s = t[:, :, None, None, None].permute(0, 2, 1, 3, 4) / 1000.0
        return torch.where(s > 0, (x - self.c) / s.clamp_min(1e-12), torch.zeros_like(x))


def test_denoise_renoises_x0_with_fresh_noise_then_writes_clean():
    B, C, F, H, W = 1, 4, 3, 4, 4
    c = torch.randn(B, C, F, H, W, dtype=torch.float64)
    model = OracleModel(c)
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=8, frame_tokens=4,
                         sink_frames=1, window_frames=3, block_frames=3, page_size=16)
    read = read_cache(cache, F)
    sig = sampling_sigmas(4)
    x0 = denoise_block(model, (B, C, F, H, W), None, cache, read, sig,
                       torch.Generator().manual_seed(7), dtype=torch.float64, device="cpu")
    # the oracle reads sigma back from the fp32 timestep: agreement to ~1e-7, not exactly
    torch.testing.assert_close(x0, c, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(7)
    for i, (x, t, w) in enumerate(model.calls):
        noise = torch.randn(B, C, F, H, W, generator=g).double()
        want = noise if i == 0 else (1 - sig[i]) * c + sig[i] * noise  # fresh noise each step
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
        assert torch.equal(t, torch.full((B, F), 1000 * sig[i])) and w is None
    blk = write_block(model, x0, None, cache, read)
    x, t, w = model.calls[-1]
    assert torch.equal(x, x0) and not t.any() and w is blk
    assert [fr.t for fr in blk.frames] == [0, 1, 2] and cache.num_frames == 3


def _cache_tensors(cache):
    return [*cache.k, *cache.v, *cache.summary, cache.pos, cache.page_len]


@pytest.mark.parametrize("name", ["sink-window", "relativistic", "slow-fast", "moc"])
def test_cache_configs_stream_in_constant_memory(name):
    win = {"sink-window": 3, "relativistic": 2, "slow-fast": 2, "moc": 2}[name]
    st = new_stream(StreamSettings(blocks=6, cache=name, window_frames=win, seed=1))
    before = [(t.data_ptr(), tuple(t.shape)) for t in _cache_tensors(st.cache)]
    mem = st.cache.memory_bytes()
    outs = []
    for _ in range(6):
        outs.append(advance(st))
        assert [(t.data_ptr(), tuple(t.shape)) for t in _cache_tensors(st.cache)] == before
        assert st.cache.memory_bytes() == mem
        assert len(st.latents) == st.cache.num_frames  # kept latents follow the cache
    assert st.cache.num_frames <= st.cache.max_frames - st.cache.block_frames
    assert all(torch.isfinite(o).all() and o.std() > 0 for o in outs)
    assert not torch.equal(outs[-1], outs[-2])


def test_growing_baseline_grows_and_never_evicts():
    st = new_stream(StreamSettings(blocks=4, cache="growing"))
    assert isinstance(st.cache, GrowingKVCache)
    mems = []
    for _ in range(4):
        sample_block(st)
        mems.append(st.cache.memory_bytes())
    assert st.cache.num_frames == 12 and [fr.t for fr in st.cache.frames()] == list(range(12))
    assert mems == sorted(mems) and mems[-1] > mems[0]


def test_growing_state_dict_round_trip_grows_the_copy():
    def make():
        return GrowingKVCache(num_layers=2, num_kv_heads=2, head_dim=8, frame_tokens=4,
                              sink_frames=1, block_frames=2, page_size=16)

    def push(cache, t):
        blk = cache.append_frames(token_positions(torch.arange(t, t + 2), 2, 2))
        for layer in range(2):
            cache.write(layer, blk, torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8))

    a, b = make(), make()
    for t in range(0, 10, 2):
        push(a, t)
    b.load_state_dict(a.state_dict())
    assert b.num_pages == a.num_pages > make().num_pages
    for t in range(10, 14, 2):
        for c in (a, b):
            torch.manual_seed(t)
            push(c, t)
    assert_same_state(a, b)
    assert [fr.t for fr in b.frames()] == list(range(14))


def test_sink_window_keeps_sink_and_newest_frames():
    st = new_stream(StreamSettings(blocks=5, cache="sink-window", window_frames=3))
    run(st, progress=False)
    assert [fr.t for fr in st.cache.frames()] == [0, 1, 2, 12, 13, 14]


def test_jitter_composes_with_caches():
    a = sample_block(new_stream(StreamSettings(blocks=1, cache="relativistic")))
    b = sample_block(new_stream(StreamSettings(blocks=1, cache="relativistic", jitter_sigma=0.8)))
    c = sample_block(new_stream(StreamSettings(blocks=1, cache="relativistic")))
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_recache_recomputes_kv_keeps_positions():
    st = new_stream(StreamSettings(blocks=4, cache="sink-window", prompt="a cat[2] | a dog"))
    for _ in range(2):
        advance(st)
    frames = st.cache.frames()
    t_before = [fr.t for fr in frames]
    k_before = st.cache.k[1].clone()
    pos_before = st.cache.pos.clone()
    advance(st)  # block 2 starts "a dog": recache, then sample
    assert st.segment == 1
    assert [fr.t for fr in st.cache.frames()][:6] == t_before
    pages = torch.cat([fr.pages.reshape(-1) for fr in frames])
    # the old frames' keys were recomputed under the new prompt, in the same pages
    assert not torch.allclose(st.cache.k[1][pages], k_before[pages])
    assert torch.equal(st.cache.pos[pages], pos_before[pages])


@pytest.mark.parametrize("name, q_t", [("sink-window", [33, 34, 35]),
                                       ("relativistic", [45, 46, 47])])
def test_hard_cut_flushes_and_jumps(name, q_t):
    st = new_stream(StreamSettings(blocks=4, cache=name, window_frames=6,
                                   prompt="a cat[3] | a dog[#]"))
    for _ in range(3):
        advance(st)
    sink = [fr.fid for fr in st.cache.sink]
    advance(st)
    frames = st.cache.frames()
    assert [fr.fid for fr in frames[: len(sink)]] == sink
    assert len(frames) == len(sink) + 2 + 3  # flush kept the newest 2 window frames
    assert [fr.t for fr in frames[-3:]] == q_t


def test_bad_settings():
    with pytest.raises(ValueError, match="cache must be one of"):
        new_stream(StreamSettings(cache="nope"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        new_stream(StreamSettings(dtype="int8"))
    with pytest.raises(ValueError, match="blocks"):
        new_stream(StreamSettings(blocks=0))
    with pytest.raises(ValueError, match="divisible"):
        new_stream(StreamSettings(latent_height=7))
    with pytest.raises(ValueError, match="needs a duration"):
        new_stream(StreamSettings(prompt="a | b"))
    with pytest.raises(ValueError, match="unknown cache option"):
        get_cache_config("sink-window", windows=3)
    assert {"sink-window", "relativistic", "growing", "slow-fast", "moc"} <= set(CACHES)


def test_tiny_text_encoder_pads_and_is_deterministic():
    from lol_model.model.text import ByteTokenizer, TextEncoder

    enc = TextEncoder.tiny(32, text_len=16, seed=0)
    a = enc(["a cat", "a much longer prompt that is cut at sixteen tokens"])
    assert a.shape == (2, 16, 32) and a.dtype == torch.float32
    assert a[0, :6].abs().sum(-1).min() > 0 and not a[0, 6:].any()  # 5 bytes + EOS, then 0
    assert a[1].abs().sum(-1).min() > 0
    assert torch.equal(a, TextEncoder.tiny(32, text_len=16, seed=0)(["a cat", "a much longer "
                       "prompt that is cut at sixteen tokens"]))
    assert not torch.equal(a[:1], TextEncoder.tiny(32, text_len=16, seed=1)(["a cat"]))
    ids, mask = ByteTokenizer()(["é"], 4)
    assert ids.tolist() == [[0xC3 + 3, 0xA9 + 3, 1, 0]] and mask.tolist() == [[1, 1, 1, 0]]


@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_precomputed_prompt_embeddings(tmp_path, ext):
    from safetensors.torch import save_file

    from lol_model.model.text import encode_prompt, load_text_encoder

    table = {"a cat": torch.randn(5, 32), "1": torch.randn(40, 32)}
    path = str(tmp_path / f"emb.{ext}")
    save_file(table, path) if ext == "safetensors" else torch.save(table, path)
    enc = load_text_encoder(path, text_dim=32, text_len=16)
    a = encode_prompt(enc, "a cat", batch_size=2)
    assert a.shape == (2, 16, 32) and torch.equal(a[1, :5], table["a cat"]) and not a[:, 5:].any()
    b = encode_prompt(enc, "unknown prompt", index=1)
    assert torch.equal(b[0], table["1"][:16])
    with pytest.raises(ValueError, match="no embedding for prompt"):
        encode_prompt(enc, "a dog", index=0)
    with pytest.raises(ValueError, match="text_dim=64"):
        load_text_encoder(path, text_dim=64, text_len=16)
    with pytest.raises(ValueError, match="does not exist"):
        load_text_encoder(str(tmp_path / "none.pt"), text_dim=32, text_len=16)


def test_stream_from_precomputed_embeddings(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "emb.safetensors")
    save_file({"0": torch.randn(7, 32), "1": torch.randn(3, 32)}, path)
    st = new_stream(StreamSettings(blocks=2, prompt="x[1] | y", text_encoder=path))
    run(st, progress=False)
    assert st.segment == 1 and st.block == 2


def test_checkpoint_weights_reproduce_the_random_model(tmp_path):
    from safetensors.torch import save_file

    from lol_model.streaming.stream import build_model

    s = StreamSettings(blocks=2, seed=4, decode=False)
    model = build_model(s, torch.float32, torch.device("cpu"))
    path = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    a = run(new_stream(s), progress=False)
    b = run(new_stream(StreamSettings(blocks=2, seed=4, decode=False, checkpoint=path)),
            progress=False)
    assert torch.equal(a.latents[a.cache.frames()[-1].fid], b.latents[b.cache.frames()[-1].fid])
    with pytest.raises(FileNotFoundError):
        new_stream(StreamSettings(checkpoint=str(tmp_path / "missing.safetensors")))
