"""The typed seams of a stream (lol_model.streaming.interfaces): every stand-in the package
ships meets the protocol it stands in for, and a stream's fields hold them."""

import dataclasses
import typing

import torch

from lol_model.model.text import TextEncoder
from lol_model.model.transformer import CausalWanModel
from lol_model.model.vae import StreamingDecoder, tiny_vae
from lol_model.streaming import interfaces as I
from lol_model.streaming.driver import run_to_outputs
from lol_model.streaming.forward import BlockForward
from lol_model.streaming.outputs import FrameCollector, attach_outputs
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import Stream, new_stream
from lol_model.streaming.video import LatentWriter, SegmentedVideoWriter


def test_stream_fields_are_typed():
    """No field of Stream is ``object`` or untyped."""
    hints = typing.get_type_hints(Stream)
    assert set(hints) == {f.name for f in dataclasses.fields(Stream)}
    assert not [n for n, t in hints.items() if t is object], hints


def test_shipped_stand_ins_meet_their_protocols(tmp_path):
    st = new_stream(StreamSettings(blocks=1, decode=True))
    attach_outputs(st, str(tmp_path / "x.mp4"), save_latents=True)
    assert isinstance(st.model, CausalWanModel) and isinstance(st.model, I.StreamModel)
    assert isinstance(st.forward, BlockForward) and isinstance(st.forward, I.CacheForward)
    assert isinstance(st.text_encoder, TextEncoder) and isinstance(st.text_encoder,
                                                                    I.PromptEncoder)
    assert isinstance(st.decoder, StreamingDecoder) and isinstance(st.decoder, I.Decoder)
    assert isinstance(st.video, SegmentedVideoWriter) and isinstance(st.video, I.FrameSink)
    assert isinstance(st.latent_writer, LatentWriter) and isinstance(st.latent_writer,
                                                                      I.LatentSink)
    assert isinstance(FrameCollector(), I.FrameSink)


def test_frames_kept_in_memory_equal_the_decoder_output():
    """attach_outputs(collect=True): the same VAE decode, frames kept as uint8 chunks."""
    s = StreamSettings(blocks=2, decode=True)
    vae = tiny_vae(seed=s.seed)
    st = new_stream(s)
    attach_outputs(st, None, vae=vae, collect=True)
    assert isinstance(st.video, FrameCollector)
    assert run_to_outputs(st, progress=False) is None
    frames = torch.cat(st.video.chunks)
    assert frames.dtype == torch.uint8 and frames.shape[0] == st.frames_out == 1 + 4 * 5
    assert frames.shape[-1] == 3


def test_a_class_missing_a_method_is_not_a_frame_sink():
    """The protocol check can fail."""

    class NoFinalize:
        def append(self, frames):
            pass

        def close_segment(self):
            pass

    assert not isinstance(NoFinalize(), I.FrameSink)
