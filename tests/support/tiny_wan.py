"""Tiny random diffusers Wan components for the diffusers tests (no download, seconds to build).

The transformer has the shape of the ``tiny`` preset (2 layers, 4 heads of 16, text width 32),
so ``lol generate --preset tiny --checkpoint <folder>/transformer`` loads it. The tokenizer is
a word-level ``tokenizers`` model over a small vocabulary, wrapped so that ``AutoTokenizer``
(and :meth:`lol_model.model.text.TextEncoder.from_pretrained`) loads it; like T5's it appends ``</s>``.
"""

from __future__ import annotations

import torch

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                   in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128,
                   num_layers=2, rope_max_seq_len=64)
WORDS = ("a red fox running through fresh snow cinematic cat dog bird in the sky sea at night "
         "city rain").split()
TEXT_LEN = 16  # the tiny preset's padded prompt length


def seeded(seed: int, build):
    """``build()`` under ``torch.manual_seed(seed)``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    return seeded(seed, lambda: WanTransformer3DModel(**{**TRANSFORMER, **overrides})).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_text_encoder(seed: int = 0, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, dropout_rate=0.0)
    return seeded(seed, lambda: UMT5EncoderModel(cfg)).eval()


def tiny_vae(seed: int = 0):
    from lol_model.model.vae import tiny_vae as build

    return build(seed=seed)


def tiny_pipeline(seed: int = 0, transformer=None):
    """A ``WanPipeline`` of tiny random components (flow-matching Euler, shift 5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(seed + 1),
                       vae=tiny_vae(seed + 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=tiny_transformer(seed) if transformer is None else transformer)


def write_tiny_folder(path, seed: int = 0) -> str:
    """A diffusers Wan folder (``model_index.json``, ``transformer/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``) written with ``save_pretrained``."""
    tiny_pipeline(seed).save_pretrained(str(path))
    return str(path)
