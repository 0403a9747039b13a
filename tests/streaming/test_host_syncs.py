"""A whole cached forward of the model makes no host sync (the counter of
tests/support/host_syncs.py) outside the ops' bodies, the write pass included: what a CUDA
graph captures around the kernels, so a block step can be compiled whole and captured."""

import pytest
import torch

import lol_kernels as lk
from lol_model.model.transformer import cache_pools
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream
from tests.support.host_syncs import count_syncs


@pytest.mark.parametrize("cache", ["longlive", "moc"])
def test_model_step_makes_no_host_sync(cache):
    """A whole cached forward (all layers, the write pass included) outside the ops' bodies:
    what a CUDA graph captures around the kernels."""
    st = new_stream(StreamSettings(blocks=6, cache=cache, decode=False))
    for _ in range(5):
        advance(st)
    rd = st.cache_cfg.read(st.cache, 3)
    x = torch.randn(st.latent_shape)
    t = torch.full((1, 3), 500.0)
    inputs = st.model.prepare(x, st.text_kv, st.cache, rd)
    pools = cache_pools(st.cache)
    _, c = count_syncs(st.model.step, x, t, st.text_kv.k, st.text_kv.v, pools, inputs,
                       enter_ops=False)
    assert c.total == 0, dict(c.events)
    blk = st.cache.append_frames(lk.token_positions(rd.q_t, 4, 4))
    inputs = st.model.prepare(x, st.text_kv, st.cache, rd, write=blk)
    _, c = count_syncs(st.model.step, x, t * 0, st.text_kv.k, st.text_kv.v, pools, inputs,
                       enter_ops=False)
    assert c.total == 0, dict(c.events)
