"""Segmented outputs stay playable: the mp4 writer survives a kill and joins its segments, and
the latent writer's segments load back as one tensor."""

import os

import imageio.v3 as iio
import pytest
import torch

from lol_model.streaming.video import LatentWriter, SegmentedVideoWriter, load_latents


def test_segmented_writer_survives_a_kill_and_joins(tmp_path):
    out = str(tmp_path / "v.mp4")
    w = SegmentedVideoWriter(out)
    g = torch.Generator().manual_seed(0)

    def frames(n):
        return torch.randint(0, 255, (n, 32, 48, 3), generator=g, dtype=torch.uint8)

    w.append(frames(5))
    w.close_segment()
    w.append(frames(4))
    w.close_segment()
    w.append(frames(3))  # open segment: a kill here leaves (at most) a .part file behind
    seg = tmp_path / "v.mp4.segments"
    names = sorted(os.listdir(seg))
    assert names[:3] == ["list.txt", "seg_00000.mp4", "seg_00001.mp4"]
    assert names[3:] in ([], ["seg_00002.part.mp4"])
    assert [iio.imread(seg / f"seg_0000{i}.mp4").shape[0] for i in range(2)] == [5, 4]
    w._gen.close()  # the killed process's encoder goes away; its .part file stays
    w2 = SegmentedVideoWriter(out)  # a resumed process
    w2.truncate(1)
    assert sorted(os.listdir(seg)) == ["list.txt", "seg_00000.mp4"]
    w2.append(frames(6))
    assert w2.finalize() == out and not seg.exists()
    v = iio.imread(out)
    assert v.shape == (11, 32, 48, 3) and v.dtype.name == "uint8"
    with pytest.raises(ValueError, match="missing"):
        SegmentedVideoWriter(out).truncate(2)
    with pytest.raises(ValueError, match=".mp4"):
        SegmentedVideoWriter(str(tmp_path / "v.avi"))
    with pytest.raises(ValueError, match="uint8"):
        SegmentedVideoWriter(out).append(torch.zeros(2, 8, 8, 3))


def test_latent_writer_segments(tmp_path):
    w = LatentWriter(str(tmp_path / "lat"))
    zs = [torch.randn(1, 16, 3, 2, 2) for _ in range(3)]
    w.append(zs[0])
    w.append(zs[1])
    w.close_segment()
    w.append(zs[2])
    w.close_segment()
    got = load_latents(str(tmp_path / "lat"))
    assert torch.equal(got, torch.cat(zs, dim=2).transpose(1, 2))  # [B, F, C, h, w]
