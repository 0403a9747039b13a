"""Prompt encoders: umT5 through ``transformers``, or precomputed embeddings from a file.

Every encoder maps ``prompts: list[str]`` (length ``B``) to ``context [B, L, text_dim]`` in the
requested dtype, with ``L = text_len`` fixed: the encoder's states of the real tokens (EOS
included), then zero rows, as Wan pads its umT5 context to 512 tokens.

* :meth:`TextEncoder.tiny`: a small random ``UMT5EncoderModel`` (seeded, no download) with
  :class:`ByteTokenizer`, the embedded default that lets everything run offline.
* :meth:`TextEncoder.from_pretrained`: a real umT5 encoder + tokenizer from a local folder
  (e.g. ``google/umt5-xxl`` saved with ``save_pretrained``, or Wan's ``text_encoder/`` and
  ``tokenizer/`` folders).
* :class:`PrecomputedText`: a ``.safetensors`` or ``.pt`` file mapping each prompt (or its
  index in the schedule, as the string ``"0"``, ``"1"``, ...) to a ``[n, text_dim]`` tensor.
"""

from __future__ import annotations

import os

import torch

from lol_kernels.rope import check_seed

from ..errors import first_line
from .tensor_files import load_tensor_file


class ByteTokenizer:
    """Deterministic byte-level tokenizer: UTF-8 byte ``b`` -> id ``b + 3``; 0 = pad, 1 = EOS."""

    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + 3

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids, mask [B, max_length]`` int64, truncated to leave room for EOS, then padded."""
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.int64)
        for b, p in enumerate(prompts):
            toks = [c + self.offset for c in p.encode("utf-8")][: max_length - 1] + [self.eos_id]
            ids[b, : len(toks)] = torch.tensor(toks)
        return ids, (ids != self.pad_id).long()


def hf_tokenize(tok):
    """Wrap a ``transformers`` tokenizer as ``tokenize(prompts, max_length) -> ids, mask``
    (``[B, max_length]`` int64, EOS added, padded and truncated to ``max_length``)."""
    def tokenize(prompts, max_length):
        enc = tok(prompts, padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt", add_special_tokens=True)
        return enc.input_ids, enc.attention_mask

    return tokenize


def _pad_context(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero every row past each prompt's real tokens (Wan's padded context)."""
    return states * mask[..., None].to(states.dtype)


class TextEncoder:
    """umT5 encoder + tokenizer producing ``[B, text_len, text_dim]`` contexts."""

    def __init__(self, model, tokenizer, *, text_len: int, device="cpu", dtype=torch.float32):
        if not isinstance(text_len, int) or text_len < 2:
            raise ValueError(f"text_len must be an int >= 2, got {text_len!r}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer, self.text_len = tokenizer, text_len
        self.device, self.dtype = torch.device(device), dtype
        self.text_dim = model.config.d_model

    @classmethod
    def tiny(cls, text_dim: int, *, text_len: int = 32, seed: int = 0, num_layers: int = 2,
             device="cpu", dtype=torch.float32) -> TextEncoder:
        """A small random umT5 encoder (width ``text_dim``), identical for the same ``seed``."""
        check_seed("seed", seed)
        from transformers import UMT5Config, UMT5EncoderModel

        heads = 4 if text_dim % 4 == 0 else 1
        cfg = UMT5Config(vocab_size=384, d_model=text_dim, d_kv=text_dim // heads,
                         d_ff=2 * text_dim, num_layers=num_layers, num_heads=heads,
                         relative_attention_num_buckets=8, dropout_rate=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(cfg)
        return cls(model, ByteTokenizer(), text_len=text_len, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str, *, text_len: int = 512, device="cpu",
                        dtype=torch.float32) -> TextEncoder:
        """A real umT5 encoder and its tokenizer from a local folder (no download)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        if not os.path.isdir(path):
            raise ValueError(f"text encoder path must be a folder with a umT5 encoder and "
                             f"tokenizer, got {path!r}")
        sub = [os.path.join(path, s) for s in ("text_encoder", "tokenizer")]
        mpath, tpath = (sub if all(os.path.isdir(s) for s in sub) else [path, path])
        try:
            model = UMT5EncoderModel.from_pretrained(mpath, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(tpath, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # truncated files
            raise ValueError(f"--text-encoder {path} is not a readable umT5 encoder + tokenizer "
                             f"folder: {first_line(e)}") from None

        return cls(model, hf_tokenize(tok), text_len=text_len, device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenizer(list(prompts), self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return _pad_context(states, mask)


class PrecomputedText:
    """Prompt embeddings from a file: ``{prompt or str(index): [n, text_dim]}`` tensors.

    Look-up is by prompt text first, then by the prompt's index in the schedule (``index`` in
    :meth:`__call__`). Rows are truncated or zero-padded to ``text_len``.
    """

    def __init__(self, path: str, *, text_dim: int, text_len: int = 512, device="cpu",
                 dtype=torch.float32):
        if not os.path.isfile(path):
            raise ValueError(f"prompt embedding file {path!r} "
                             f"{'is not a regular file' if os.path.exists(path) else 'does not exist'}")
        if path.endswith((".safetensors", ".pt", ".pth")):
            table = load_tensor_file(path, "prompt embedding file")
        else:
            raise ValueError(f"prompt embedding file must end in .safetensors or .pt, got {path!r}")
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{path}: expected a non-empty mapping of prompt -> tensor")
        for k, v in table.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != text_dim:
                shape = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{path}: embedding {k!r} must have shape [n, text_dim="
                                 f"{text_dim}], got {shape}")
        self.table, self.path, self.text_dim, self.text_len = table, path, text_dim, text_len
        self.device, self.dtype = torch.device(device), dtype

    def __call__(self, prompts: list[str], index: int | None = None) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.text_dim, dtype=self.dtype,
                          device=self.device)
        for b, p in enumerate(prompts):
            e = self.table.get(p, self.table.get(str(index)) if index is not None else None)
            if e is None:
                raise ValueError(f"{self.path} has no embedding for prompt {p!r} (nor for "
                                 f"schedule index {index}); keys: {sorted(self.table)[:8]}")
            n = min(e.shape[0], self.text_len)
            out[b, :n] = e[:n].to(self.device, self.dtype)
        return out


def load_text_encoder(spec: str | None, *, text_dim: int, text_len: int, seed: int = 0,
                      device="cpu", dtype=torch.float32):
    """``None``/``"tiny"``: random tiny umT5; a folder: real umT5; a file: precomputed."""
    if spec in (None, "", "tiny"):
        return TextEncoder.tiny(text_dim, text_len=text_len, seed=seed, device=device,
                                dtype=dtype)
    if os.path.isdir(spec):
        enc = TextEncoder.from_pretrained(spec, text_len=text_len, device=device, dtype=dtype)
        if enc.text_dim != text_dim:
            raise ValueError(f"text encoder {spec!r} has width {enc.text_dim}; the model "
                             f"expects text_dim={text_dim}")
        return enc
    return PrecomputedText(spec, text_dim=text_dim, text_len=text_len, device=device, dtype=dtype)


def encode_prompt(encoder, prompt: str, *, batch_size: int = 1, index: int | None = None):
    """``[B, L, text_dim]`` context of one prompt repeated over the batch."""
    if isinstance(encoder, PrecomputedText):
        return encoder([prompt] * batch_size, index=index)
    return encoder([prompt] * batch_size)
