"""``rope_frequencies`` refuses seeds ``torch.Generator.manual_seed`` cannot take with a
ValueError naming ``seed`` (torch's own error names no argument); the edges are accepted."""
import pytest
import torch

import lol_kernels as lk
from lol_kernels._checks import SEED_RANGE

BAD_SEEDS = [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1, 2**70, -(2**70)]
GOOD_SEEDS = [SEED_RANGE[0], SEED_RANGE[1], 0, 2**63 - 1]


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_rope_frequencies_refuses_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        lk.rope_frequencies(8, 2, jitter_sigma=0.5, seed=seed)


@pytest.mark.parametrize("seed", GOOD_SEEDS)
def test_rope_frequencies_accepts_the_edges(seed):
    t = lk.rope_frequencies(8, 2, jitter_sigma=0.5, seed=seed)
    assert torch.equal(t.freqs, lk.rope_frequencies(8, 2, jitter_sigma=0.5, seed=seed).freqs)


@pytest.mark.parametrize("seed", [1.5, "3", None])
def test_rope_frequencies_refuses_a_seed_not_an_int(seed):
    with pytest.raises(TypeError, match="seed"):
        lk.rope_frequencies(8, 2, seed=seed)
