"""Prompt schedules: ``"a cat[10s] | a dog[20s#] | a bird"``.

Grammar (segments separated by ``|``)::

    segment  := prompt [ "[" duration? "#"? "]" ]
    duration := number "s"        seconds of video (float)
              | integer "b"?      blocks

* The duration says how long the prompt lasts. Every segment but the last needs one; the last
  runs to the end of the stream when it has none (and is extended when the stream is longer).
* ``#`` marks a **hard cut** at the switch into that segment: Infinity-RoPE KV Flush (keep the
  sink and the newest 2 frames) plus RoPE Cut (the next block jumps forward in time). Without
  ``#`` a switch is a LongLive-style **recache**: the cached frames' K/V are recomputed with the
  new prompt from their clean latents, so the scene carries on under the new prompt.
* Seconds become blocks at the Wan rate of 4 latent frames a second (16 fps, temporal VAE
  stride 4): ``blocks = max(1, round(seconds * 4 / block_frames))``, 10 s -> 13 blocks of 3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LATENT_FPS = 4.0  # 16 video fps / VAE temporal stride 4
MAX_DURATION = 1e12  # seconds or blocks of a segment: beyond any run, far inside float

_TAG = re.compile(r"\[\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[sb]?))?\s*(?P<cut>#)?\s*\]\s*$")


@dataclass(frozen=True)
class Segment:
    """One prompt of a schedule: ``blocks`` long (``None``: to the end), ``cut`` at its start."""

    prompt: str
    blocks: int | None
    cut: bool = False


@dataclass(frozen=True)
class PromptSchedule:
    segments: tuple[Segment, ...]

    @property
    def total_blocks(self) -> int | None:
        """Blocks the schedule spans, ``None`` when the last segment is open-ended."""
        if self.segments[-1].blocks is None:
            return None
        return sum(s.blocks for s in self.segments)

    def segment_index(self, block: int) -> int:
        """Index of the segment that block ``block`` (0-based) is generated under."""
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")
        end = 0
        for i, s in enumerate(self.segments[:-1]):
            end += s.blocks
            if block < end:
                return i
        return len(self.segments) - 1


def parse_schedule(text: str, *, block_frames: int = 3) -> PromptSchedule:
    """Parse a prompt schedule (see the module docstring). Raises ``ValueError`` on bad input."""
    if not isinstance(text, str):
        raise TypeError(f"prompt schedule must be a str, got {type(text).__name__}")
    if not isinstance(block_frames, int) or block_frames < 1:
        raise ValueError(f"block_frames must be an int >= 1, got {block_frames!r}")
    parts = text.split("|")
    segments = []
    for i, raw in enumerate(parts):
        part = raw.strip()
        where = f"prompt schedule segment {i + 1} ({part!r})"
        blocks, cut = None, False
        m = _TAG.search(part)
        if m:
            prompt = part[: m.start()].strip()
            if m.group("num") is not None:
                num = float(m.group("num"))
                if not math.isfinite(num) or num > MAX_DURATION:
                    raise ValueError(f"{where}: duration {m.group('num')[:24]} is out of range "
                                     f"(at most {MAX_DURATION:g})")
                if m.group("unit") == "s":
                    blocks = max(1, round(num * LATENT_FPS / block_frames))
                else:
                    if num != int(num):
                        raise ValueError(f"{where}: a duration in blocks must be an integer "
                                         f"(write '{num}s' for seconds)")
                    blocks = int(num)
                if num <= 0 or blocks < 1:
                    raise ValueError(f"{where}: duration must be positive")
            cut = m.group("cut") is not None
        else:
            prompt = part
        if "[" in prompt or "]" in prompt:
            raise ValueError(f"{where}: bad duration tag; expected 'prompt[10s]', "
                             f"'prompt[12]' (blocks) or 'prompt[10s#]' at the end")
        if not prompt:
            raise ValueError(f"{where}: empty prompt")
        if cut and i == 0:
            raise ValueError(f"{where}: '#' marks a cut at a prompt switch; the first segment "
                             f"has no switch before it")
        if blocks is None and i < len(parts) - 1:
            raise ValueError(f"{where}: every segment but the last needs a duration "
                             f"('{prompt}[10s]')")
        segments.append(Segment(prompt, blocks, cut))
    return PromptSchedule(tuple(segments))
