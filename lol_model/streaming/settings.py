"""What defines a stream: :class:`StreamSettings`, the limits its values must keep, and the
decisions made from them in one place (the cache configuration, the RoPE jitter, the dtype).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lol_kernels.rope import SEED_RANGE as SEED_RANGE

from .presets import CacheConfig, get_cache_config
from .sampling import SHIFT

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}
MAX_LATENT_FRAMES = 2**30  # frame times must stay far inside int32 (RoPE cuts jump ahead)
MAX_STEPS = 1000  # denoising steps a block may take: the scheduler's 1000 timesteps
DEFAULT_BLOCKS = 40  # tiny defaults: 30 s of 128x128 video at 16 fps in about a minute on a CPU


@dataclass
class StreamSettings:
    """Everything that defines a stream (the checkpoint fingerprint is built from it).

    ``latent_height/width`` are latent sizes (video = 8x); ``blocks`` may grow on resume.
    """

    # what to generate, with which weights
    prompt: str = "a red fox running through fresh snow, cinematic"
    blocks: int = 8
    preset: str = "tiny"
    checkpoint: str | None = None
    lora: str | None = None
    lora_alpha: float | None = None  # None: the LoRA file's alpha, else its rank
    ema: bool = False  # the checkpoint's 'generator_ema' weights
    # cache configuration (lol_model.streaming.presets; None keeps the configuration's value):
    # sink_frames is upstream's sink_size; local_attn_size counts the frames a block attends
    # including its own (upstream's); window_frames (frames kept besides the block) excludes it
    cache: str = "longlive"
    sink_frames: int | None = None
    local_attn_size: int | None = None
    window_frames: int | None = None
    recache: str | None = None  # None: the cache configuration's (lol_model.streaming.presets)
    global_sink: bool | None = None
    jitter_sigma: float | None = None  # LoL multi-head RoPE jitter; None: the cache's (lol 0.8)
    jitter_seed: int = 0
    # latent grid and sampling (explicit ``timesteps`` override ``steps`` and ``shift``)
    latent_height: int = 8
    latent_width: int = 8
    block_frames: int = 3
    timesteps: tuple[float, ...] | None = None
    steps: int = 4
    shift: float = SHIFT
    seed: int = 0
    batch_size: int = 1
    # encoders, numerics and output
    text_encoder: str | None = None
    vae: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    decode: bool = True
    fps: float = 16.0
    # how the block's forwards run (lol_model.streaming.forward): a torch.compile backend, CUDA
    # graphs
    compile: str | None = None
    cuda_graphs: bool = False

    def fingerprint(self) -> dict:
        """Settings a resumed run must share with its checkpoint (not blocks, device, nor how
        the forwards run)."""
        d = asdict(self)
        for k in ("blocks", "device", "compile", "cuda_graphs"):
            d.pop(k)
        d["timesteps"] = list(self.timesteps) if self.timesteps else None
        d["jitter_sigma"] = self.resolved_jitter_sigma()  # implied and explicit match
        return d

    def cache_config(self) -> CacheConfig:
        """The cache configuration of these settings: the ``cache`` preset with every override
        given (``sink_frames``, ``local_attn_size``, ``window_frames``, ``recache``,
        ``global_sink``). ``ValueError`` for an unknown preset or inconsistent sizes."""
        return get_cache_config(self.cache, sink_frames=self.sink_frames,
                                local_attn_size=self.local_attn_size,
                                window_frames=self.window_frames, recache=self.recache,
                                global_sink=self.global_sink)

    def resolved_jitter_sigma(self) -> float:
        """``jitter_sigma``, or the cache preset's default when it is ``None`` (``lol``: 0.8)."""
        return get_cache_config(self.cache).jitter_sigma if self.jitter_sigma is None \
            else self.jitter_sigma

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``; ``ValueError`` for an unknown name."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]
