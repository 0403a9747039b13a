"""``lol generate``'s step options: ``--compile`` compiles the block step (two graphs), and
bad ``--compile`` / ``--cuda-graphs`` combinations are refused with exit 2."""

import pytest
import torch
from torch._dynamo.utils import counters

from lol_model.cli import main

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_cli_compile_option(tmp_path):
    out = tmp_path / "a.mp4"
    rc = main(["generate", "--compile", "aot_eager", "--blocks", "2", "--no-decode", "--quiet",
               "--out", str(out)])
    assert rc == 0 and counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize(("argv", "needle"), [
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["--compile", "nope"], "unknown torch.compile backend 'nope'"),
    (["--compile", "eager", "--cache", "growing"], "need a cache of fixed size"),
])
def test_cli_refuses_bad_step_options(tmp_path, capsys, argv, needle):
    if "--cuda-graphs" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    rc = main(["generate", *argv, "--blocks", "1", "--no-decode", "--quiet", "--out",
               str(tmp_path / "a.mp4")])
    assert rc == 2 and needle in capsys.readouterr().err
