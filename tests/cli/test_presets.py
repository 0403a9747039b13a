"""``lol generate``'s cache options: the default is LongLive's semantics, the upstream names
(``--sink-size``, ``--local-attn-size``, ``--recache``, ``--no-global-sink``) and the low-level
ones reach the stream, ``--cache lol`` jitters every head unless told otherwise, and a bad
option is one error line naming it (exit 2)."""

from __future__ import annotations

import pytest
import torch

from lol_kernels import rope_frequencies
from lol_model.cli import build_parser, main
from lol_model.cli.generate import settings_from_args
from lol_model.model.config import ModelConfig
from lol_model.streaming.stream import new_stream


def test_generate_defaults_to_longlive():
    """``lol generate`` with no cache option streams with ``StreamSettings()``'s LongLive (its
    frames: tests/streaming/test_presets.py)."""
    args = build_parser().parse_args(["generate"])
    s = settings_from_args(args)
    assert (s.cache, s.local_attn_size, s.window_frames, s.jitter_sigma) == \
        ("longlive", None, None, None)


def _settings(*argv):
    return settings_from_args(build_parser().parse_args(["generate", *argv]))


def test_cli_cache_options_reach_the_stream():
    s = _settings("--cache", "self-forcing-rolling", "--sink-size", "1", "--local-attn-size",
                  "10", "--recache", "longlive", "--no-global-sink")
    assert (s.sink_frames, s.local_attn_size, s.recache, s.global_sink) == (1, 10, "longlive",
                                                                             False)
    st = new_stream(s)
    assert (st.cache.sink_frames, st.cache.window_frames) == (1, 6)
    assert (st.cache_cfg.recache, st.cache_cfg.global_sink) == ("longlive", False)
    assert _settings("--sink-frames", "2").sink_frames == 2  # the low-level name still works
    assert _settings("--window-frames", "4").window_frames == 4


def test_lol_preset_jitters_every_head_unless_told_otherwise():
    def table(*argv):
        s = _settings("--blocks", "1", *argv)
        return new_stream(s).model.rope_table.freqs

    cfg = ModelConfig.preset("tiny")
    plain = rope_frequencies(cfg.head_dim, cfg.num_heads, theta=cfg.rope_theta).freqs
    lol = rope_frequencies(cfg.head_dim, cfg.num_heads, theta=cfg.rope_theta,
                           jitter_sigma=0.8).freqs
    assert torch.equal(table("--cache", "lol"), lol)
    assert not torch.equal(lol[0], lol[1])  # every head its own base
    assert torch.equal(table("--cache", "lol", "--jitter-sigma", "0"), plain)
    assert torch.equal(table(), plain)
    assert torch.equal(table("--cache", "relativistic", "--jitter-sigma", "0.8"), lol)


@pytest.mark.parametrize("argv, option", [
    (["--local-attn-size", "5"], "--local-attn-size"),
    (["--local-attn-size", "-1"], "--local-attn-size"),
    (["--local-attn-size", "-2"], "--local-attn-size"),
    (["--local-attn-size", "9", "--window-frames", "3"], "--window-frames"),
    (["--cache", "growing", "--local-attn-size", "9"], "--local-attn-size"),
    (["--sink-size", "12"], "--sink-size"),
    (["--sink-size", "-1"], "--sink-size"),
    (["--window-frames", "0"], "--window-frames"),
    (["--recache", "nope"], "--recache"),
    (["--cache", "nope"], "--cache"),
])
def test_bad_cache_options_name_the_option(argv, option, tmp_path, capsys):
    try:
        rc = main(["generate", "--blocks", "1", "--quiet", "--out", str(tmp_path / "x.mp4"),
                   *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("lol: error:") and option in err, err
    assert not (tmp_path / "x.mp4").exists()
