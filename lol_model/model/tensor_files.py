"""Reading tensor files (``.safetensors`` or ``torch.save``) with one clear error per bad file.

A truncated download, a garbage file or a pickle with code in it raises ``ValueError`` naming
the file and what it was meant to be, never a library-internal traceback.
"""

from __future__ import annotations

import os

import torch

from ..errors import first_line


def load_tensor_file(path: str, what: str = "tensor file"):
    """The contents of ``path``: a dict of CPU tensors for ``.safetensors``; for any other name,
    what ``torch.load(weights_only=True)`` returns (tensors in dicts and lists).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read; the message names ``what`` and ``path``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{what} {path} is not a readable safetensors file (truncated or "
                             f"corrupt?): {first_line(e)}") from None
    try:  # weights_only: a checkpoint is tensors in dicts; never run pickled code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} cannot be read as a torch checkpoint of tensors in "
                         f"dicts (truncated or corrupt? loaded with weights_only=True; re-save "
                         f"other objects apart): {first_line(e)}") from None
