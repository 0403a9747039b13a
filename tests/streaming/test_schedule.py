"""Prompt schedules: parsing, durations, switches, and clear errors for bad schedules."""

import pytest

from lol_model.streaming.prompts import Segment, parse_schedule


def test_parse_seconds_blocks_and_cuts():
    s = parse_schedule("a cat[10s] | a dog [2#] | a bird[1.5s] | the end")
    # 10 s * 4 latent frames/s / 3 frames a block = 13.33 -> 13 blocks
    assert s.segments == (Segment("a cat", 13, False), Segment("a dog", 2, True),
                          Segment("a bird", 2, False), Segment("the end", None, False))
    assert s.total_blocks is None
    assert [s.segment_index(b) for b in range(20)] == [0] * 13 + [1, 1, 2, 2, 3, 3, 3]


def test_single_prompt_and_block_frames():
    s = parse_schedule("  just a prompt  ")
    assert s.segments == (Segment("just a prompt", None),) and s.total_blocks is None
    assert s.segment_index(10**6) == 0
    s = parse_schedule("x[3s] | y[6b#]", block_frames=1)
    assert s.segments == (Segment("x", 12), Segment("y", 6, True)) and s.total_blocks == 18


def test_last_segment_cut_without_duration():
    s = parse_schedule("x[2] | y[#]")
    assert s.segments[1] == Segment("y", None, True)


@pytest.mark.parametrize("text, match", [
    ("", "empty prompt"),
    ("a cat[10s] | ", "empty prompt"),
    ("[10s]", "empty prompt"),
    ("a cat | a dog[3]", "needs a duration"),
    ("a cat[3#] | a dog", "first segment"),
    ("a cat[0] | a dog", "positive"),
    ("a cat[1.5] | a dog", "integer"),
    ("a cat[10x] | a dog", "bad duration tag"),
    ("a [cat] dog", "bad duration tag"),
    ("a cat[10s | a dog", "bad duration tag"),
])
def test_bad_schedules(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text)


def test_bad_arguments():
    with pytest.raises(TypeError, match="must be a str"):
        parse_schedule(None)
    with pytest.raises(ValueError, match="block_frames"):
        parse_schedule("x", block_frames=0)
    with pytest.raises(ValueError, match="block must be >= 0"):
        parse_schedule("x").segment_index(-1)
