"""Checkpoint / resume: bit-exact latents, playable video after a kill, clear errors; the
checkpoint's checksums refuse any changed byte or segment, and a ``lol-stream/2`` checkpoint
(without them) still resumes."""

import json

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file, save_file

from lol_model.streaming.checkpoint import (
    load_cache_state,
    load_checkpoint,
    resume_stream,
    save_checkpoint,
    save_stream,
)
from lol_model.streaming.driver import run
from lol_model.streaming.outputs import attach_outputs, finish
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import advance, new_stream
from lol_model.streaming.video import load_latents

SCHEDULE = "a cat[3] | a dog[2] | a bird[#]"  # recache at block 3, flush + cut at block 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(tmp, name, blocks, cache, decode=True):
    sigma = 0.8 if cache == "relativistic" else 0.0  # LoL jitter composes with any cache
    st = new_stream(StreamSettings(blocks=blocks, cache=cache, prompt=SCHEDULE,
                                   window_frames=3, decode=decode, jitter_sigma=sigma))
    attach_outputs(st, str(tmp / f"{name}.mp4"), save_latents=True)  # no mp4 unless decode
    return st


@pytest.mark.parametrize("cache", ["sink-window", "relativistic", "slow-fast", "moc"])
def test_resume_is_bit_exact_after_a_kill(tmp_path, cache):
    decode = cache == "sink-window"  # the decoder cache is covered once (it is slow)
    full = _stream(tmp_path, "full", 7, cache, decode)
    run(full, progress=False)
    finish(full)

    ck = str(tmp_path / "ck")
    part = _stream(tmp_path, "part", 7, cache, decode)
    for _ in range(4):
        advance(part)
    save_stream(part, ck)  # checkpoint after block 4 (past the recache at block 3)
    advance(part)  # block 5 is generated, then the process is "killed" before any checkpoint
    if decode:
        part.video._gen.close()
        seg = tmp_path / "part.mp4.segments"
        assert iio.imread(seg / "seg_00000.mp4").shape[0] == 1 + 4 * 11  # 4 blocks, playable
    del part

    again = _stream(tmp_path, "part", 7, cache, decode)
    resume_stream(again, ck)
    assert again.block == 4
    run(again, checkpoint_dir=ck, checkpoint_every=2, progress=False)
    finish(again)
    a, b = load_latents(str(tmp_path / "full.latents")), load_latents(str(tmp_path / "part.latents"))
    assert a.shape == (1, 21, 16, 8, 8) and torch.equal(a, b)
    if decode:
        va, vb = iio.imread(tmp_path / "full.mp4"), iio.imread(tmp_path / "part.mp4")
        assert va.shape == vb.shape == (1 + 4 * 20, 64, 64, 3)


def test_bad_checkpoints(tmp_path):
    st = new_stream(StreamSettings(blocks=2, decode=False))
    advance(st)
    ck = tmp_path / "ck"
    save_stream(st, str(ck))
    meta = json.loads((ck / "stream.json").read_text())
    assert meta["block"] == 1 and meta["format"] == "lol-stream/3"

    def fresh(**kw):
        return new_stream(StreamSettings(blocks=2, decode=False, **kw))

    with pytest.raises(ValueError, match="no stream checkpoint"):
        resume_stream(fresh(), str(tmp_path / "nothing"))
    with pytest.raises(ValueError,
                       match="(?s)settings differ.*jitter_sigma: checkpoint 0.0, now 0.5"):
        resume_stream(fresh(jitter_sigma=0.5), str(ck))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stream.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        resume_stream(fresh(), str(bad))
    save_file({"x": torch.zeros(2)}, str(bad / "stream.safetensors"))
    with pytest.raises(ValueError, match="not a lol stream checkpoint"):
        resume_stream(fresh(), str(bad))
    # a tensor of the wrong shape (a foreign checkpoint, written with valid checksums)
    tensors = load_file(str(ck / "stream.safetensors"))
    plain = {k: v for k, v in meta.items() if k != "format"}
    tensors["cache.k.0"] = tensors["cache.k.0"][:, :8].contiguous()
    save_checkpoint(str(bad), plain, tensors)
    with pytest.raises(ValueError, match=r"does not fit this run's cache.*\['k\.0'\] is "
                                         r"torch.float32 \[\d+, 8, 4, 16\]; this PagedKVCache "
                                         r"needs torch.float32 \[\d+, 16, 4, 16\]"):
        resume_stream(fresh(), str(bad))
    del tensors["cache.k.0"]
    save_checkpoint(str(bad), plain, tensors)
    with pytest.raises(ValueError, match=r"missing keys \['k\.0'\]"):
        resume_stream(fresh(), str(bad))
    # a checkpoint of the format before caches had state_dict() is refused by its version
    save_file(load_file(str(ck / "stream.safetensors")), str(bad / "stream.safetensors"),
              metadata={"lol": json.dumps({**meta, "format": "lol-stream/1"})})
    with pytest.raises(ValueError, match=r"format 'lol-stream/1' is not readable by this "
                                         r"version \(readable: lol-stream/3, lol-stream/2\)"):
        resume_stream(fresh(), str(bad))
    other = new_stream(StreamSettings(blocks=2, decode=False, cache="slow-fast")).cache
    with pytest.raises(ValueError, match="holds a PagedKVCache cache; this run's cache is a "
                                         "SlowFastCache"):
        load_cache_state(other, meta["cache"], load_file(str(ck / "stream.safetensors")))
    with pytest.raises(ValueError, match="decode: checkpoint False, now True"):
        with_video = fresh()
        with_video.settings.decode = True
        attach_outputs(with_video, str(tmp_path / "v.mp4"))
        resume_stream(with_video, str(ck))


# --------------------------------------------------------------------------- checksums
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run of 4 blocks checkpointed every 2 (2 mp4 and 2 latent segments), and its latents."""
    d = tmp_path_factory.mktemp("ckpt")
    st = new_stream(StreamSettings(blocks=4, prompt=SCHEDULE, window_frames=3))
    attach_outputs(st, str(d / "x.mp4"), save_latents=True)
    run(st, checkpoint_dir=str(d / "ck"), checkpoint_every=2, progress=False)
    finish(st, keep_segments=True)
    return d


def _regions(path):
    """Byte ranges of a safetensors file: ``{region: [(start, stop, tensor or None)]}``."""
    import struct

    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    text = data[8 : 8 + n]
    doc = json.dumps(header["__metadata__"]["lol"]).encode()[1:-1]  # as escaped in the header
    digest = header["__metadata__"]["lol.sha256"].encode()
    d0, g0 = 8 + text.index(doc), 8 + text.index(digest)
    tensors = [(8 + n + a, 8 + n + b, k) for k, v in header.items() if k != "__metadata__"
               for a, b in [v["data_offsets"]] if b > a]
    return {"length": [(0, 8, None)], "index": [(8, d0 - 20, None)],
            "metadata": [(d0, d0 + len(doc), None)], "digest": [(g0, g0 + len(digest), None)],
            "tensors": tensors}


@pytest.mark.parametrize("region", ["length", "index", "metadata", "digest", "tensors"])
def test_any_flipped_byte_is_refused(tmp_path, checkpointed, region):
    """A changed byte anywhere (every byte of a small region, 150 of a large one, three flips
    each; the first and last byte of every tensor) is refused with a ValueError naming the
    file; in a tensor, the error names that tensor."""
    import random

    src = str(checkpointed / "ck" / "stream.safetensors")
    data = open(src, "rb").read()
    spans = _regions(src)[region]
    rng = random.Random(region)
    every = [o for a, z, _ in spans for o in range(a, z)]
    offsets = every if len(every) <= 150 else sorted(rng.sample(every, 150))
    if region == "tensors":  # the first and last byte of every tensor too
        offsets += [o for a, b, _ in spans for o in (a, b - 1)]
    bad = tmp_path / "bad"
    bad.mkdir()
    path = bad / "stream.safetensors"
    for off in offsets:
        for flip in (0x01, 0x80, 0xFF):
            b = bytearray(data)
            b[off] ^= flip
            path.write_bytes(b)
            with pytest.raises(ValueError) as e:
                load_checkpoint(str(bad))
            msg = str(e.value)
            assert msg.startswith(str(path)) and "\n" not in msg, msg
            assert any(s in msg for s in ("is corrupt", "not a readable safetensors",
                                          "not a lol stream checkpoint")), msg
            if region == "tensors":
                name = next(k for a, z, k in spans if a <= off < z)
                assert f"tensor {name!r} does not match its checksum" in msg, msg
            if region == "digest" and flip == 0x01:  # still ASCII: safetensors accepts it
                assert "metadata does not match its checksum" in msg, msg
    assert len(offsets) >= min(150, len(every))
    load_checkpoint(str(checkpointed / "ck"))  # the original still loads


def _tamper(path, change):
    data = path.read_bytes()
    if change == "delete":
        path.unlink()
    elif change == "flip-byte":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        path.write_bytes(b)
    elif change == "truncate":
        path.write_bytes(data[: len(data) - 1])
    elif change == "append":
        path.write_bytes(data + b"\0")
    elif change == "swap":  # the next segment's file in its place
        path.write_bytes(path.with_name(path.name.replace("00000", "00001")).read_bytes())


@pytest.mark.parametrize("change", ["flip-byte", "truncate", "append", "swap", "delete"])
@pytest.mark.parametrize("kind", ["video", "latent"])
def test_changed_segment_is_refused_on_resume(tmp_path, checkpointed, kind, change):
    import shutil

    for name in ("ck", "x.mp4.segments", "x.latents"):
        shutil.copytree(checkpointed / name, tmp_path / name)
    folder = tmp_path / ("x.mp4.segments" if kind == "video" else "x.latents")
    seg = folder / ("seg_00000.mp4" if kind == "video" else "seg_00000.safetensors")
    meta, _ = load_checkpoint(str(tmp_path / "ck"))
    rec = meta[f"{kind}_segments"][0]
    assert rec["file"] == seg.name and len(meta[f"{kind}_segments"]) == 2
    _tamper(seg, change)
    before = sorted(p.name for p in folder.iterdir())
    st = new_stream(StreamSettings(blocks=4, prompt=SCHEDULE, window_frames=3))
    attach_outputs(st, str(tmp_path / "x.mp4"), save_latents=True)
    if change == "delete":
        match = rf"cannot resume the {kind}.*segment\(s\) \[0\] are missing from {folder}"
    else:
        match = (rf"cannot resume: {kind} segment {seg.name} in {folder} does not match the "
                 rf"checkpoint \(sha256 {rec['sha256'][:12]}\.\.\. expected, [0-9a-f]{{12}}\.\.\. "
                 rf"found\).*--overwrite")
    with pytest.raises(ValueError, match=match):
        resume_stream(st, str(tmp_path / "ck"))
    assert sorted(p.name for p in folder.iterdir()) == before  # the refusal deleted nothing


@pytest.mark.parametrize("decode", [False, True], ids=["latents-only", "video"])
def test_unchecked_v2_checkpoint_still_resumes(tmp_path, decode):
    """A ``lol-stream/2`` checkpoint (no checksums, segment counts) resumes bit-exactly; its
    segments are kept as they are, and the next checkpoint is ``lol-stream/3``."""
    def stream(name):
        st = new_stream(StreamSettings(blocks=5, prompt=SCHEDULE, window_frames=3, decode=decode))
        attach_outputs(st, str(tmp_path / f"{name}.mp4"), save_latents=True)
        return st

    full = stream("full")
    run(full, progress=False)
    finish(full)
    part, ck = stream("part"), str(tmp_path / "ck")
    for _ in range(3):
        advance(part)
    save_stream(part, ck)
    meta, tensors = load_checkpoint(ck)
    v2 = {**meta, "format": "lol-stream/2",
          "video_segments": len(meta["video_segments"]) if decode else None,
          "latent_segments": [len(meta["latent_segments"]),
                              sum(r["frames"] for r in meta["latent_segments"])]}
    save_file(tensors, str(tmp_path / "ck" / "stream.safetensors"),
              metadata={"lol": json.dumps(v2)})
    again = stream("part")
    resume_stream(again, ck)
    assert again.block == 3 and again.latent_writer.segments[0]["frames"] == 9
    run(again, checkpoint_dir=ck, checkpoint_every=1, progress=False)
    finish(again)
    assert load_checkpoint(ck)[0]["format"] == "lol-stream/3"
    a = load_latents(str(tmp_path / "full.latents"))
    b = load_latents(str(tmp_path / "part.latents"))
    assert a.shape[1] == 15 and torch.equal(a, b)
    if decode:
        assert iio.imread(tmp_path / "part.mp4").shape == iio.imread(tmp_path / "full.mp4").shape
