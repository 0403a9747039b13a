"""The seeded tiny builders refuse seeds ``torch.manual_seed`` cannot take with a ValueError
naming ``seed``, before building anything."""
import pytest

from lol_kernels.rope import SEED_RANGE, check_seed
from lol_model.model.text import TextEncoder
from lol_model.model.vae import tiny_vae

BAD_SEEDS = [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1, 2**70, -(2**70)]


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_tiny_builders_refuse_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        TextEncoder.tiny(16, seed=seed)
    with pytest.raises(ValueError, match="seed"):
        tiny_vae(seed=seed)


@pytest.mark.parametrize("seed", [SEED_RANGE[0], SEED_RANGE[1], 0])
def test_check_seed_accepts_the_edges(seed):
    assert check_seed("seed", seed) == seed


@pytest.mark.parametrize("seed", [True, 1.0, "1"])
def test_check_seed_refuses_a_non_int(seed):
    with pytest.raises(TypeError, match="jitter_seed"):
        check_seed("jitter_seed", seed)
