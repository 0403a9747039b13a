"""The diffusers integration refuses seeds torch cannot take and positions int32 cannot hold,
naming the argument: ``apply_lol`` (seed), ``LolStreamingPipeline.__call__`` (seed,
jitter_seed) and ``video_positions`` (frames, grid_h, grid_w)."""
import pytest

from lol_kernels.rope import SEED_RANGE
from lol_model.integrations.diffusers.pipeline import LolStreamingPipeline
from lol_model.integrations.diffusers.processor import apply_lol, video_positions
from lol_model.streaming.settings import MAX_LATENT_FRAMES
from tests.support.tiny_wan import TEXT_LEN, tiny_pipeline

BAD_SEEDS = [SEED_RANGE[1] + 1, SEED_RANGE[0] - 1, 2**70]

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def wan():
    return tiny_pipeline(seed=0)


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_apply_lol_refuses_seed(wan, seed):
    with pytest.raises(ValueError, match="seed"):
        apply_lol(wan.transformer, 0.5, seed=seed)


def test_apply_lol_accepts_the_edge_seeds(wan):
    for seed in SEED_RANGE:
        assert apply_lol(wan.transformer, 0.5, seed=seed).lol_state.seed == seed


@pytest.mark.parametrize("name", ["seed", "jitter_seed"])
@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_pipeline_call_refuses(wan, seed, name):
    pipe = LolStreamingPipeline.from_pretrained(wan, text_len=TEXT_LEN)
    with pytest.raises(ValueError, match=name):
        pipe("a fox", num_blocks=1, height=32, width=48, progress=False, **{name: seed})


@pytest.mark.parametrize("arg", [0, 1, 2])
@pytest.mark.parametrize("bad", [MAX_LATENT_FRAMES + 1, 2**31, 2**32 + 5, -1])
def test_video_positions_refuses(arg, bad):
    sizes = [2, 2, 2]
    sizes[arg] = bad
    with pytest.raises(ValueError, match=["frames", "grid_h", "grid_w"][arg]):
        video_positions(*sizes)


def test_video_positions_accepts_small_sizes():
    assert video_positions(2, 1, 3).shape == (1, 6, 3)
