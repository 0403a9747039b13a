"""Comparisons of caches: bit-identical state (:func:`assert_same_state`) and reads
(:func:`assert_same_read`)."""

import dataclasses

import torch


def assert_same_state(a, b):
    """Two caches hold bit-identical state (every state_dict entry equal)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])], "state differs"


def assert_same_read(ra, rb):
    for f in dataclasses.fields(ra):
        x, y = getattr(ra, f.name), getattr(rb, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
