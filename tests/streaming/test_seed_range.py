"""``new_stream`` refuses a ``seed`` or ``jitter_seed`` torch cannot take with a ValueError
naming it, before building the model; the edges are accepted by the generator."""
import pytest
import torch

from lol_model.streaming.settings import SEED_RANGE, StreamSettings
from lol_model.streaming.stream import new_stream

BAD_SEEDS = [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1, 2**70, -(2**70)]


@pytest.mark.parametrize("name", ["seed", "jitter_seed"])
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_new_stream_refuses(seed, name):
    with pytest.raises(ValueError, match=name):
        new_stream(StreamSettings(blocks=1, **{name: seed}))


@pytest.mark.parametrize("seed", [SEED_RANGE[0], SEED_RANGE[1]])
def test_the_edges_seed_a_generator(seed):
    torch.Generator().manual_seed(seed)  # the range is exactly what torch accepts
