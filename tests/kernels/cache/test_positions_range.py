"""Every public entry point that takes frame times refuses the values int32 cannot hold (the
kernels store and read positions as int32) with a ValueError naming the argument, checked
before any cast could wrap them; the values just inside the range are accepted."""
import pytest
import torch

from lol_kernels._checks import POS_LIMIT
from lol_kernels.cache import (
    PagedKVCache,
    SlowFastCache,
    bounded,
    cut,
    read_cache,
    relativistic,
    token_positions,
)
from lol_kernels.cache.read import build_read

# out of range: past int32, past the cache's +-2^30, wrapping to a small time, int64's edge
BAD = [2**31, -(2**31) - 1, 2**32 + 5, 2**63 - 1, -(2**63), POS_LIMIT + 1, -POS_LIMIT - 1]
GOOD = [POS_LIMIT, -POS_LIMIT, 0]  # the edges just inside, and zero
FORMS = {"tensor": lambda v: torch.tensor([v], dtype=torch.int64), "list": lambda v: [v]}


def small_cache(**kw):
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8, frame_tokens=4, sink_frames=1,
                window_frames=2, block_frames=1, page_size=16)
    return PagedKVCache(**(args | kw))


def cached(t=0):
    c = small_cache()
    c.append_frames(token_positions([t], 2, 2))
    return c


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", BAD)
def test_token_positions_refuses(bad, form):
    with pytest.raises(ValueError, match="frame_t"):
        token_positions(FORMS[form](bad), 2, 2)


def test_token_positions_refuses_beyond_int64():
    with pytest.raises(ValueError, match="frame_t"):
        token_positions([2**70], 2, 2)


@pytest.mark.parametrize("good", GOOD)
def test_token_positions_and_append_accept_the_edges(good):
    pos = token_positions(torch.tensor([good]), 2, 2)
    assert pos[0, :, 0].tolist() == [good] * 4
    assert small_cache().append_frames(pos).frames[0].t == good


@pytest.mark.parametrize("bad", BAD)
def test_append_frames_refuses(bad):
    pos = torch.zeros(1, 4, 3, dtype=torch.int64)
    pos[..., 0] = bad
    with pytest.raises(ValueError, match="pos"):
        small_cache().append_frames(pos)


@pytest.mark.parametrize("which", ["read_t", "q_t"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", BAD)
def test_build_read_refuses(bad, form, which):
    c = cached()
    args = {"read_t": [0], "q_t": [1]} | {which: FORMS[form](bad)}
    with pytest.raises(ValueError, match=which):
        build_read(c, c.frames(), args["read_t"], args["q_t"])


@pytest.mark.parametrize("good", GOOD)
def test_build_read_accepts_the_edges(good):
    c = cached()
    rd = build_read(c, c.frames(), [good], [good])
    assert rd.q_t.tolist() == [good] and rd.frame_t.tolist() == [good]


def test_build_read_refuses_a_shift_past_the_limit():
    c = cached(-POS_LIMIT)  # read at +POS_LIMIT: a shift of 2^31, past int32
    with pytest.raises(ValueError, match="read_t - stored t"):
        build_read(c, c.frames(), [POS_LIMIT], [0])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", BAD)
def test_reassign_refuses(bad, form):
    c = cached()
    with pytest.raises(ValueError, match=r"\bt\b"):
        c.reassign(c.frames(), FORMS[form](bad), [5])


@pytest.mark.parametrize("good", GOOD)
def test_reassign_accepts_the_edges(good):
    c = cached()
    c.reassign(c.frames(), [good], [5])
    assert c.frames()[0].t == good


@pytest.mark.parametrize("bad", [2**31, 2**32 + 5, 2**63 - 1, POS_LIMIT + 2])
def test_policies_refuse(bad):
    c = cached()
    with pytest.raises(ValueError, match="max_frames"):
        relativistic(c, 1, max_frames=bad)
    with pytest.raises(ValueError, match="max_frames"):
        read_cache(c, 1, "relativistic", max_frames=bad)
    with pytest.raises(ValueError, match="limit"):
        bounded(c, 1, limit=bad)
    with pytest.raises(ValueError, match="limit"):
        read_cache(c, 1, "bounded", limit=bad)
    with pytest.raises(ValueError, match="start"):
        cut(read_cache(c, 1), start=bad)


def test_policies_accept_the_edges():
    c = cached()
    assert relativistic(c, 1, max_frames=POS_LIMIT + 1).q_t.tolist() == [POS_LIMIT]
    assert bounded(c, 1, limit=POS_LIMIT + 1).q_t.tolist() == [POS_LIMIT]
    assert cut(read_cache(c, 1), start=POS_LIMIT).q_t.tolist() == [POS_LIMIT]


def test_absolute_read_past_the_limit_names_q_t():
    c = cached(POS_LIMIT)  # the next block would start at POS_LIMIT + 1
    with pytest.raises(ValueError, match="q_t"):
        read_cache(c, 1)


@pytest.mark.parametrize("bad", [2**31, 2**32 + 5, 2**63 - 1, POS_LIMIT + 2])
def test_slowfast_read_refuses_limit(bad):
    c = SlowFastCache(num_layers=1, num_kv_heads=1, head_dim=8, frame_tokens=4, sink_frames=1,
                      slow_frames=2, window_frames=2, block_frames=1, page_size=16)
    c.append_frames(token_positions([0], 2, 2))
    with pytest.raises(ValueError, match="limit"):
        c.read(1, limit=bad)
    assert c.read(1, limit=POS_LIMIT + 1).q_t.tolist() == [POS_LIMIT]
