"""A stream that goes wrong, or would not fit:

* a block going non-finite after good ones stops the run (``GenerationError`` naming the
  block); what was written stays playable and the last checkpoint stays resumable;
* the memory estimate refuses a run that cannot fit, naming the options that size it, and
  lets through what fits.
"""

from __future__ import annotations

import pytest
import torch

from lol_model.errors import GenerationError
from lol_model.streaming.checkpoint import load_checkpoint
from lol_model.streaming.driver import run
from lol_model.streaming.outputs import attach_outputs
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import new_stream


def test_nonfinite_block_keeps_what_was_written(tmp_path):
    """A block going non-finite after two good ones: the two blocks stay playable and the
    checkpoint after them stays resumable."""
    import imageio.v3 as iio

    from lol_model.streaming.driver import keep_written

    st = new_stream(StreamSettings(blocks=2, latent_height=8, latent_width=8))
    out, ck = str(tmp_path / "x.mp4"), str(tmp_path / "ck")
    attach_outputs(st, out)
    run(st, checkpoint_dir=ck, checkpoint_every=1, progress=False)
    with torch.no_grad():
        st.model.head.head.weight.fill_(float("nan"))
    st.settings.blocks = 4
    with pytest.raises(GenerationError, match="block 3 of 4: the sampled latents"):
        run(st, checkpoint_dir=ck, checkpoint_every=1, progress=False)
    kept = keep_written(st, ck)
    assert st.block == 2 and f"the last good checkpoint (block 2) in {ck} is intact" in kept
    assert kept.startswith(f"kept: {1 + 4 * 5} video frames in {st.video.seg_dir}"), kept
    assert load_checkpoint(ck)[0]["block"] == 2
    segs = sorted((tmp_path / "x.mp4.segments").glob("seg_?????.mp4"))
    assert len(segs) == 2 and sum(iio.imread(p).shape[0] for p in segs) == 1 + 4 * 5


# --------------------------------------------------------------------------- memory estimate
GiB = 2**30
WAN480 = {"latent_height": 60, "latent_width": 104}
# (id, settings, text of the refusal or None when the run fits in 8 GiB)
MEMORY = [
    ("tiny-default", {}, None),
    ("wan-1.3b-480p-bf16", {"preset": "wan-1.3b", "dtype": "bf16", **WAN480}, None),
    ("wan-1.3b-480p-fp32", {"preset": "wan-1.3b", "dtype": "float32", **WAN480},
     "--preset wan-1.3b and --dtype float32"),
    ("wan-14b-480p-bf16", {"preset": "wan-14b", "dtype": "bf16", **WAN480}, "--preset wan-14b"),
    ("tiny-8192-fits", {"latent_height": 1024, "latent_width": 1024}, None),
    ("tiny-16384", {"latent_height": 2048, "latent_width": 2048}, "--size 16384x16384"),
    ("window", {"cache": "sink-window", "window_frames": 10**6}, "1000000 window frames"),
    ("sink", {"cache": "relativistic", "sink_frames": 10**6}, "1000000 sink"),
    ("growing", {"cache": "growing", "blocks": 10**6}, "1000000 blocks"),
]


@pytest.mark.parametrize("kw,expect", [m[1:] for m in MEMORY], ids=[m[0] for m in MEMORY])
def test_run_beyond_memory_is_refused(monkeypatch, kw, expect):
    """Against a machine with 8 GiB: the estimate refuses what cannot fit, naming the options
    that size it, and lets through what fits."""
    import lol_model.streaming.memory as guard

    monkeypatch.setattr(guard, "available_memory", lambda device: (8 * GiB, "available in RAM"))
    from lol_model.streaming.settings import DTYPES

    s = StreamSettings(**kw)
    need = guard.estimate_memory(s, DTYPES[s.dtype])
    assert set(need) == {"cache", "weights", "activations"} and min(need.values()) > 0
    if expect is None:
        guard.check_memory(s, DTYPES[s.dtype])
        assert sum(need.values()) <= 8 * GiB
        return
    with pytest.raises(ValueError, match="8.0 GiB is available in RAM") as e:
        guard.check_memory(s, DTYPES[s.dtype])
    assert expect in str(e.value) and "--size" in str(e.value) and "\n" not in str(e.value)
