"""``lol generate`` passes ``--ema``, ``--lora`` and ``--lora-alpha`` to the weight loader (the
merged weights equal a merge by hand) and refuses their bad combinations with exit 2."""

import pytest
import torch

from lol_model.cli import build_parser, main
from lol_model.cli.generate import settings_from_args
from lol_model.model.config import ModelConfig
from lol_model.model.transformer import CausalWanModel
from lol_model.streaming.stream import build_model
from tests.support.checkpoints import hand_merge, peft_lora, to_original, trainer_checkpoint
from tests.support.wan_reference import diffusers_model

CFG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(1234)
    return diffusers_model(CFG, torch.float32)


def test_cli_passes_ema_and_lora_alpha(ref, tmp_path, capsys):
    orig = to_original(ref.state_dict())
    path, ema = trainer_checkpoint(tmp_path, orig)
    lora = peft_lora(CausalWanModel(CFG), 4, ["blocks.1.self_attn.o"])
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    argv = ["generate", "--preset", "tiny", "--checkpoint", str(path), "--ema", "--lora",
            str(tmp_path / "lora.pt"), "--lora-alpha", "2"]
    s = settings_from_args(build_parser().parse_args(argv))
    assert s.ema is True and s.lora_alpha == 2.0
    got = build_model(s, torch.float32, "cpu").state_dict()
    want = hand_merge(ema, lora, 0.5)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    s0 = settings_from_args(build_parser().parse_args(argv[:3]))
    assert s0.ema is False and s0.lora_alpha is None
    out = ["--out", str(tmp_path / "x.mp4")]
    for bad, says in [(["--lora-alpha", "8"], "--lora-alpha needs --lora"),
                      (["--checkpoint", str(path), "--lora-alpha", "8"],
                       "--lora-alpha needs --lora"),
                      (["--ema"], "--ema needs --checkpoint"),
                      (["--checkpoint", str(path), "--lora", str(tmp_path / "lora.pt"),
                        "--lora-alpha", "0"], "argument --lora-alpha: must be in (0"),
                      (["--checkpoint", str(path), "--lora", str(tmp_path / "lora.pt"),
                        "--lora-alpha", "nan"], "argument --lora-alpha: must be a finite"),
                      (["--preset", "tiny", "--checkpoint", str(tmp_path / "lora.pt"), "--ema"],
                       "no entry 'generator_ema'")]:
        try:
            rc = main(["generate", "--quiet", *bad, *out])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and says in err, (bad, err)
