"""Configuration of the causal Wan2.1 transformer, with named presets (gpt-fast style)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Wan2.1 text-to-video transformer (docs/design.md §9).

    Attributes:
        num_layers, dim, num_heads, ffn_dim: transformer size; ``head_dim = dim // num_heads``
            must be even and >= 6 so that it splits into Wan's 3D RoPE axes
            ``(d - 4(d//6), 2(d//6), 2(d//6))`` for ``(t, h, w)``.
        in_channels, out_channels: latent channels (16 for the Wan VAE).
        text_dim: width of the text encoder's output (umT5: 4096); text_len its padded length.
        freq_dim: width of the sinusoidal timestep embedding.
        patch_size: ``(pt, ph, pw)``; the causal model needs ``pt == 1`` (one latent frame per
            token frame).
        eps: epsilon of every LayerNorm and of the full-width q/k RMSNorm.
        cross_attn_norm: affine LayerNorm before cross-attention (Wan2.1: True).
        rope_theta: RoPE base ``theta0``.
    """

    num_layers: int = 30
    dim: int = 1536
    num_heads: int = 12
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "in_channels", "out_channels",
                     "text_dim", "text_len", "freq_dim"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of num_heads={self.num_heads}")
        d = self.dim // self.num_heads
        if d % 2 or d < 6:
            raise ValueError(f"head_dim = dim // num_heads = {d} must be even and >= 6 (Wan 3D "
                             f"RoPE split)")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Output features per token: ``out_channels * pt * ph * pw``."""
        pt, ph, pw = self.patch_size
        return self.out_channels * pt * ph * pw

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named configuration (see :data:`PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        names = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown ModelConfig fields {bad}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelConfig] = {
    # Wan2.1-T2V-1.3B (also Self-Forcing, CausVid, LongLive, LoL)
    "wan-1.3b": ModelConfig(),
    # Wan2.1-T2V-14B
    "wan-14b": ModelConfig(num_layers=40, dim=5120, num_heads=40, ffn_dim=13824),
    # same structure, CPU-sized: head_dim 16 splits into (8, 4, 4) channels for (t, h, w)
    "tiny": ModelConfig(num_layers=2, dim=64, num_heads=4, ffn_dim=128, text_dim=32,
                        text_len=16, freq_dim=32),
}
