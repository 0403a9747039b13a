"""Weights holding NaN or inf load with a warning that counts and names the tensors."""

import pytest

from lol_model.model.weights import load_model
from tests.support.checkpoints import tiny_weights


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_warn(tmp_path, value):
    path = tiny_weights(tmp_path / "w.safetensors", poison="blocks.0.self_attn.q.weight",
                        value=value)
    with pytest.warns(UserWarning, match=r"NaN or inf in 1 weight tensor\(s\) \(blocks.0.self"):
        load_model(path, "tiny")
