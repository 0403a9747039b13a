"""Streaming decode of Wan latents with diffusers' ``AutoencoderKLWan``, in constant memory.

The Wan decoder is causal in time: each ``WanCausalConv3d`` (and each temporal upsampler) keeps
the last ``CACHE_T = 2`` input frames of the previous call in a *feature map* list, and
``AutoencoderKLWan._decode`` itself walks the latents one frame at a time through that list
(``_feat_map``, with ``_conv_idx`` reset to ``[0]`` before every frame and ``first_chunk=True``
only for the first frame). :class:`StreamingDecoder` does the same walk but keeps the feature map
across calls, so block after block decodes exactly as one call over the whole video would,
while holding only ``2`` frames of activations per conv layer.

Frame counts: latent frame 0 gives 1 video frame, every later one gives 4 (temporal stride 4).
Latents are un-normalized with the VAE config's ``latents_mean`` / ``latents_std`` first, as
diffusers' Wan pipeline does (``z * std + mean``).
"""

from __future__ import annotations

import os

import torch

from lol_kernels.rope import check_seed

from ..errors import first_line

TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])


def tiny_vae(*, seed: int = 0, dtype=torch.float32, device="cpu"):
    """A small random ``AutoencoderKLWan`` (z_dim 16, stride 4x8x8), the same for one ``seed``."""
    check_seed("seed", seed)
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**TINY_VAE)
    return _place(vae, dtype, device)


def _place(vae, dtype, device):
    # casting a float32 VAE to float32 makes diffusers warn; only cast when needed
    vae = vae.to(device=device)
    return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()


def load_vae(spec: str | None, *, seed: int = 0, dtype=torch.float32, device="cpu"):
    """``None``/``"tiny"``: :func:`tiny_vae`; otherwise a local diffusers folder (Wan's ``vae/``
    subfolder is found automatically)."""
    if spec in (None, "", "tiny"):
        return tiny_vae(seed=seed, dtype=dtype, device=device)
    from diffusers import AutoencoderKLWan

    if not os.path.isdir(spec):
        raise ValueError(f"vae must be 'tiny' or a diffusers AutoencoderKLWan folder, got {spec!r}")
    sub = "vae" if os.path.isdir(os.path.join(spec, "vae")) else None
    try:
        vae = AutoencoderKLWan.from_pretrained(spec, subfolder=sub, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # truncated / garbage
        raise ValueError(f"--vae {spec} is not a readable diffusers AutoencoderKLWan folder: "
                         f"{first_line(e)}") from None
    return _place(vae, dtype, device)


class StreamingDecoder:
    """Decode latent blocks one after another with the VAE's causal feature cache.

    Example:
        >>> dec = StreamingDecoder(vae)
        >>> for z in blocks:               # z: [B, z_dim, F, h, w] normalized latents
        ...     video = dec.decode(z)      # [B, 3, T, 8h, 8w] in [-1, 1], T = 4F (4F-3 at first)
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.z_dim = cfg.z_dim
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        self.num_convs = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Start a new video (empty feature cache)."""
        self.feat_map: list = [None] * self.num_convs
        self.frames_in = 0

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Video frames ``[B, 3, T, H, W]`` (in ``[-1, 1]``, the VAE's dtype) of latents
        ``z [B, z_dim, F, h, w]`` that follow every latent decoded so far."""
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.z_dim:
            got = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape [B, z_dim={self.z_dim}, F, h, w], got {got}")
        p = next(self.vae.parameters())
        z = z.to(device=p.device, dtype=p.dtype)
        z = z / self.inv_std.to(z) + self.mean.to(z)
        x = self.vae.post_quant_conv(z)  # 1x1x1 conv: no temporal context
        outs = []
        for i in range(x.shape[2]):
            idx = [0]
            outs.append(self.vae.decoder(x[:, :, i : i + 1], feat_cache=self.feat_map,
                                         feat_idx=idx, first_chunk=self.frames_in == 0))
            self.frames_in += 1
        out = torch.cat(outs, dim=2)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ checkpointing
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(json_meta, tensors)`` of the feature cache (entries are None, "Rep" or tensors)."""
        kinds, tensors = [], {}
        for i, f in enumerate(self.feat_map):
            if isinstance(f, torch.Tensor):
                kinds.append("tensor")
                tensors[f"vae.feat.{i}"] = f.contiguous()
            else:
                kinds.append(f)  # None or the marker string "Rep"
        return {"feat": kinds, "frames_in": self.frames_in}, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        kinds = meta["feat"]
        if len(kinds) != self.num_convs:
            raise ValueError(f"checkpoint decoder cache has {len(kinds)} entries; this VAE has "
                             f"{self.num_convs} causal convs (a different VAE?)")
        p = next(self.vae.parameters())
        fm = []
        for i, k in enumerate(kinds):
            if k == "tensor":
                fm.append(tensors[f"vae.feat.{i}"].to(device=p.device))
            elif k is None or k == "Rep":
                fm.append(k)
            else:
                raise ValueError(f"checkpoint decoder cache entry {i} is {k!r}")
        self.feat_map, self.frames_in = fm, int(meta["frames_in"])


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in ``[-1, 1]`` -> ``[B, T, H, W, 3]`` uint8 RGB on the CPU."""
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu()
