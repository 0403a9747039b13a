"""Where a stream's blocks go: the streaming VAE decoder into a segmented mp4, the latent
segments, or frames kept in memory; closing them, and saying what was kept after a failure.
"""

from __future__ import annotations

import os

import torch

from ..model.vae import StreamingDecoder, load_vae
from .stream import Stream
from .video import LatentWriter, SegmentedVideoWriter


class FrameCollector:
    """A :class:`~lol_model.streaming.interfaces.FrameSink` that keeps the decoded frames in
    memory (``chunks``: ``uint8 [Fv, H, W, 3]`` per block)."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def append(self, frames: torch.Tensor) -> None:
        self.chunks.append(frames)

    def close_segment(self) -> None:  # nothing to close: frames stay in memory
        pass

    def finalize(self, *, keep_segments: bool = False) -> None:
        return None


def attach_outputs(st: Stream, out: str | None, *, save_latents: bool = False, vae=None,
                   collect: bool = False) -> None:
    """Give ``st`` its outputs, when ``settings.decode`` is on: a streaming decoder of ``vae``
    (default: the one ``settings.vae`` names, loaded in fp32) into a segmented mp4 at ``out``,
    or with ``collect`` into a :class:`FrameCollector` (``out`` then ``None``). No video when
    ``out`` is ``None`` and ``collect`` is off. With ``save_latents`` the clean latents go to
    ``<out stem>.latents/``."""
    if st.settings.decode and (out is not None or collect):
        if vae is None:
            vae = load_vae(st.settings.vae, seed=st.settings.seed, device=st.device)
        st.decoder = StreamingDecoder(vae)
        st.video = FrameCollector() if out is None else \
            SegmentedVideoWriter(out, fps=st.settings.fps)
    if save_latents:
        st.latent_writer = LatentWriter(latents_folder(out))


def latents_folder(out: str | None) -> str:
    """Where ``--save-latents`` writes: ``<out without .mp4>.latents``."""
    return (os.path.splitext(out)[0] if out else "latents") + ".latents"


def close_segments(st: Stream) -> None:
    """Close the open mp4 and latent segments; :class:`~lol_model.errors.SegmentError` if one
    cannot be closed (it is discarded and not recorded)."""
    if st.video is not None:
        st.video.close_segment()
    if st.latent_writer is not None:
        st.latent_writer.close_segment()


def finish(st: Stream, *, keep_segments: bool = False) -> str | None:
    """Close outputs; join the mp4 segments into the final file (see
    :meth:`~lol_model.streaming.video.SegmentedVideoWriter.finalize` for ``keep_segments``)."""
    if st.latent_writer is not None:
        st.latent_writer.close_segment()
    if st.video is None:
        return None
    return st.video.finalize(keep_segments=keep_segments)
