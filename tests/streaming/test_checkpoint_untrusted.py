"""A stream checkpoint is untrusted input: a document edited and re-signed (its digest
recomputed, as anyone can) is refused with one ``ValueError`` that names the field, before the
stream changes, for every field: wrong types, missing and unknown keys, unknown frame ids and
impossible counters."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lol_model.streaming.checkpoint import DIGEST, FILE, SCHEMA, resume_stream, sha256_text
from lol_model.streaming.driver import run
from lol_model.streaming.outputs import attach_outputs
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import new_stream

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(blocks=4, prompt="a cat[2] | a dog", window_frames=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint at block 2 of a decoded stream with latents, and its document."""
    d = tmp_path_factory.mktemp("ck")
    st = new_stream(StreamSettings(**{**SETTINGS, "blocks": 2}))
    attach_outputs(st, str(d / "x.mp4"), save_latents=True)
    run(st, progress=False, checkpoint_dir=str(d / "ck"), checkpoint_every=2)
    with safe_open(str(d / "ck" / FILE), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return d, json.loads(header["lol"]), tensors


def _resign(path, doc: dict, tensors) -> None:
    """Write ``doc`` as the checkpoint's document with a valid digest (an edited, re-signed
    file: the checksums cannot tell it from a genuine one)."""
    text = json.dumps(doc)
    save_file(tensors, str(path), metadata={"lol": text, DIGEST: sha256_text(text)})


def _fresh(d):
    st = new_stream(StreamSettings(**SETTINGS))
    attach_outputs(st, str(d / "x.mp4"), save_latents=True)
    return st


def _edits(doc):
    """``(id, field, edited document)`` for every field: a wrong type, a missing key, and the
    impossible values of each counter."""
    out = []
    for key in SCHEMA:
        if key in ("format", "sha256") or key not in doc:
            continue
        for bad in ("x", 1.5, None, [], {}, True, -1, 10**30):
            if bad is None and key in ("video_segments", "latent_segments", "decoder"):
                continue
            if (bad == [] and key in ("latent_fids", "recent")) or \
                    (bad is True and key == "pending_cut"):
                continue
            field = "settings differ" if key == "fingerprint" and bad == {} else key
            out.append((f"{key}={bad!r}", field, {**doc, key: bad}))
        if key not in ("decoder",):  # no decoder: the disagreement case below
            out.append((f"no-{key}", key, {k: v for k, v in doc.items() if k != key}))
    out.append(("unknown-key", "unknown", {**doc, "extra": 1}))
    out.append(("block-ahead", "block", {**doc, "block": doc["block"] + 1}))
    out.append(("block-behind", "block", {**doc, "block": doc["block"] - 1}))
    out.append(("unknown-fid", "latent_fids", {**doc, "latent_fids": doc["latent_fids"] + [77]}))
    out.append(("fid-missing", "latent_fids", {**doc, "latent_fids": doc["latent_fids"][1:]}))
    out.append(("segment-wrong", "segment", {**doc, "segment": 1 - doc["segment"]}))
    out.append(("frames-out", "frames_out", {**doc, "frames_out": doc["frames_out"] + 4}))
    lat = [dict(r) for r in doc["latent_segments"]]
    lat[0]["frames"] += 1
    out.append(("latent-frames", "latent", {**doc, "latent_segments": lat}))
    out.append(("no-decoder", "decoder", {**doc, "decoder": None}))
    out.append(("cache-class", "cache", {**doc, "cache": {"class": "SlowFastCache"}}))
    out.append(("fingerprint", "checkpoint", {**doc, "fingerprint": {**doc["fingerprint"],
                                                                     "seed": 5}}))
    return out


def test_every_edited_field_is_refused_naming_it(saved, tmp_path):
    d, doc, tensors = saved
    cases = _edits(doc)
    assert len(cases) > 90
    (tmp_path / "ck").mkdir()
    for name in ("x.mp4.segments", "x.latents"):
        (tmp_path / name).symlink_to(d / name, target_is_directory=True)
    failures = []
    st = _fresh(tmp_path)  # a refusal leaves it untouched, so one serves every case
    for case, field, edited in cases:
        _resign(tmp_path / "ck" / FILE, edited, tensors)
        try:
            resume_stream(st, str(tmp_path / "ck"))
        except ValueError as e:
            if field not in str(e):
                failures.append(f"{case}: {e}")
            if st.block != 0:
                failures.append(f"{case}: the stream changed before the refusal")
            continue
        except Exception as e:  # a raw traceback is the defect under test
            failures.append(f"{case}: {type(e).__name__}: {e}")
            continue
        failures.append(f"{case}: accepted")
        st = _fresh(tmp_path)
    assert not failures, "\n".join(failures)


def test_the_genuine_document_resumes(saved, tmp_path):
    """The re-signing above is not what refuses: the unedited document loads."""
    d, doc, tensors = saved
    (tmp_path / "ck").mkdir()
    for name in ("x.mp4.segments", "x.latents"):
        (tmp_path / name).symlink_to(d / name, target_is_directory=True)
    _resign(tmp_path / "ck" / FILE, doc, tensors)
    st = _fresh(tmp_path)
    resume_stream(st, str(tmp_path / "ck"))
    assert st.block == doc["block"] == 2


def test_a_missing_tensor_is_refused(saved, tmp_path):
    d, doc, tensors = saved
    (tmp_path / "ck").mkdir()
    fid = doc["latent_fids"][0]
    kept = {k: v for k, v in tensors.items() if k != f"latents.{fid}"}
    doc = {**doc, "sha256": {k: v for k, v in doc["sha256"].items() if k in kept}}
    _resign(tmp_path / "ck" / FILE, doc, kept)
    with pytest.raises(ValueError, match="latent_fids"):
        resume_stream(_fresh(tmp_path), str(tmp_path / "ck"))
    assert torch.is_tensor(tensors[f"latents.{fid}"])


def test_fewer_blocks_than_the_checkpoint_holds_is_refused(saved, tmp_path):
    """A run asking for fewer blocks than its checkpoint holds says how to continue it."""
    d, doc, tensors = saved
    st = new_stream(StreamSettings(**{**SETTINGS, "blocks": 1}))
    attach_outputs(st, str(d / "x.mp4"), save_latents=True)
    with pytest.raises(ValueError, match=r"holds 2 blocks, more than the 1 .* --blocks 3"):
        resume_stream(st, str(d / "ck"))
    assert st.block == 0
