"""``LolStreamingPipeline``: stream video from diffusers-format Wan weights, block by block.

Example::

    from lol_model.pipeline import LolStreamingPipeline

    pipe = LolStreamingPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers",
                                                checkpoint="longlive.pt", lora="lora.pt",
                                                torch_dtype=torch.bfloat16, device="cuda")
    frames = pipe("a cat[10s] | a dog[20s#]", cache="lol")      # uint8 [T, H, W, 3]
    pipe("a red fox in the snow", num_blocks=1200, output_type="mp4", out="hour.mp4")

The components come from a diffusers Wan folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``; ``scheduler/`` is not read) or from an existing ``WanPipeline``'s
``transformer``, ``vae``, ``text_encoder`` and ``tokenizer``. The transformer's weights go into
:class:`~lol_model.model.CausalWanModel` (the diffusers key layout is mapped by
:mod:`lol_model.model.weights`); with ``checkpoint`` a causal checkpoint (Self-Forcing, LongLive,
any layout ``lol generate --checkpoint`` reads) fills it instead and the folder's transformer gives
only its ``config.json``. A call streams through :mod:`lol_model.streaming` (``new_stream``,
``run``, ``finish``): the same settings, weights and seed give exactly what ``lol generate``
gives. Sampling is the causal models' 4-step flow matching (shift 5.0), not the folder's
scheduler, which is tuned for 50-step bidirectional sampling.
"""

from __future__ import annotations

import json
import os

import torch

from lol_kernels.rope import check_seed

from ...errors import first_line
from ...model.config import ModelConfig
from ...model.text import TextEncoder, hf_tokenize
from ...model.vae import load_vae
from ...model.weights import load_model
from ...streaming.driver import run_to_outputs
from ...streaming.outputs import attach_outputs
from ...streaming.prompts import parse_schedule
from ...streaming.settings import DEFAULT_BLOCKS, DTYPES, StreamSettings
from ...streaming.stream import new_stream

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
OUTPUT_TYPES = ("np", "pt", "mp4", "latent")
WAN_TEXT_LEN = 512  # Wan pads its umT5 context to 512 tokens (diffusers' max_sequence_length)
_SUPPORTED_CLASSES = ("WanTransformer3DModel",)


def model_config(dcfg, *, text_len: int = WAN_TEXT_LEN, where: str = "transformer config"
                 ) -> ModelConfig:
    """:class:`~lol_model.model.config.ModelConfig` of a diffusers ``WanTransformer3DModel`` config
    (a dict or ``FrozenDict``); ``ValueError`` naming ``where`` for one this model cannot run
    (image conditioning, another q/k norm, a temporal patch, missing fields)."""
    dcfg = dict(dcfg)
    cls = dcfg.get("_class_name")
    if cls is not None and cls not in _SUPPORTED_CLASSES:
        raise ValueError(f"{where}: _class_name {cls!r} is not supported (expected "
                         f"{' or '.join(_SUPPORTED_CLASSES)})")
    need = ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim", "in_channels",
            "text_dim", "freq_dim", "patch_size")
    missing = [k for k in need if k not in dcfg]
    if missing:
        raise ValueError(f"{where} lacks {missing}: not a WanTransformer3DModel config")
    bad = []
    if dcfg.get("image_dim") is not None or dcfg.get("added_kv_proj_dim") is not None:
        bad.append(f"image conditioning (image_dim={dcfg.get('image_dim')}, "
                   f"added_kv_proj_dim={dcfg.get('added_kv_proj_dim')}): the causal generator "
                   f"is text-to-video only")
    if dcfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        bad.append(f"qk_norm={dcfg['qk_norm']!r} (Wan2.1: 'rms_norm_across_heads')")
    if list(dcfg["patch_size"])[:1] != [1]:
        bad.append(f"patch_size={list(dcfg['patch_size'])} (the causal model needs a temporal "
                   f"patch of 1: one latent frame per token frame)")
    if dcfg.get("pos_embed_seq_len") is not None:
        bad.append(f"pos_embed_seq_len={dcfg['pos_embed_seq_len']} (image position embedding)")
    if bad:
        raise ValueError(f"{where} is incompatible with the causal Wan model: {'; '.join(bad)}")
    H, D = dcfg["num_attention_heads"], dcfg["attention_head_dim"]
    try:
        return ModelConfig(num_layers=dcfg["num_layers"], dim=H * D, num_heads=H,
                           ffn_dim=dcfg["ffn_dim"], in_channels=dcfg["in_channels"],
                           out_channels=dcfg.get("out_channels") or dcfg["in_channels"],
                           text_dim=dcfg["text_dim"], text_len=text_len,
                           freq_dim=dcfg["freq_dim"], patch_size=tuple(dcfg["patch_size"]),
                           eps=dcfg.get("eps", 1e-6),
                           cross_attn_norm=bool(dcfg.get("cross_attn_norm", True)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where} is incompatible with the causal Wan model: {e}") from None


class LolStreamingPipeline:
    """Streaming text-to-video: a causal Wan transformer, a umT5 encoder and the Wan VAE.

    Build it with :meth:`from_pretrained`; call it with a prompt or schedule (``__call__``).

    Attributes:
        model: the :class:`~lol_model.model.CausalWanModel` (``dtype`` on ``device``).
        text_encoder: a :class:`~lol_model.model.text.TextEncoder`.
        vae: the ``AutoencoderKLWan`` (fp32 from a folder, as ``lol generate`` loads it).
        source: the folder, or the class name of the pipeline the components came from.
    """

    def __init__(self, model, text_encoder, vae, *, source: str = "components"):
        self.model, self.text_encoder, self.vae, self.source = model, text_encoder, vae, source
        if vae.config.z_dim != model.cfg.in_channels:
            raise ValueError(f"vae has z_dim={vae.config.z_dim} latent channels; the "
                             f"transformer takes in_channels={model.cfg.in_channels}")
        if text_encoder.text_dim != model.cfg.text_dim:
            raise ValueError(f"text_encoder has width d_model={text_encoder.text_dim}; the "
                             f"transformer takes text_dim={model.cfg.text_dim}")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder_or_pipe, checkpoint=None, *, lora=None,
                        lora_alpha: float | None = None, ema: bool = False,
                        text_len: int = WAN_TEXT_LEN, torch_dtype=torch.float32,
                        device="cpu") -> LolStreamingPipeline:
        """Load from a diffusers Wan folder or take a ``WanPipeline``'s components.

        Args:
            folder_or_pipe: a folder with ``transformer/`` (``config.json``, and its weights
                unless ``checkpoint`` is given), ``vae/``, ``text_encoder/``, ``tokenizer/``
                (e.g. ``Wan2.1-T2V-1.3B-Diffusers``); or a diffusers ``WanPipeline`` (its
                modules are shared, not copied: the text encoder is moved to ``device`` and
                cast to ``torch_dtype``).
            checkpoint: causal weights for the transformer slot (a file or folder in any
                layout of :func:`lol_model.model.weights.read_state_dict`), as ``lol generate
                --checkpoint``; ``lora``, ``lora_alpha``, ``ema`` as ``--lora``,
                ``--lora-alpha``, ``--ema``.
            text_len: prompt tokens, zero-padded (Wan: 512; the ``tiny`` preset: 16).
            torch_dtype: dtype of the transformer and text encoder (``torch.bfloat16`` or a
                name such as ``"bf16"``); the VAE of a folder is loaded in fp32, as by
                ``lol generate``.
            device: where every component runs.

        Raises:
            ValueError: a missing component, a folder that is not a diffusers Wan folder, or
                a component config that does not fit (each names the component).
            TypeError: ``folder_or_pipe`` is neither a path nor a Wan pipeline.
        """
        if isinstance(torch_dtype, str):
            if torch_dtype not in DTYPES:
                raise ValueError(f"torch_dtype must be a torch dtype or one of "
                                 f"{sorted(DTYPES)}, got {torch_dtype!r}")
            torch_dtype = DTYPES[torch_dtype]
        if torch_dtype not in DTYPES.values():
            raise TypeError(f"torch_dtype must be a float dtype, got {torch_dtype!r}")
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 2:
            raise ValueError(f"text_len must be an int >= 2, got {text_len!r}")
        weights = dict(lora=lora, lora_alpha=lora_alpha, ema=ema, dtype=torch_dtype,
                       device=device)
        if isinstance(folder_or_pipe, (str, os.PathLike)):
            folder = os.fspath(folder_or_pipe)
            cfg = model_config(read_transformer_config(folder), text_len=text_len,
                               where=os.path.join(folder, "transformer", "config.json"))
            model = load_model(checkpoint or os.path.join(folder, "transformer"), cfg, **weights)
            text, vae = load_folder_encoders(folder, text_len=text_len, dtype=torch_dtype,
                                             device=device)
            return cls(model, text, vae, source=folder)
        parts = {n: getattr(folder_or_pipe, n, None) for n in COMPONENTS}
        if not all(hasattr(folder_or_pipe, n) for n in COMPONENTS):
            raise TypeError(f"folder_or_pipe must be a diffusers Wan folder or a WanPipeline "
                            f"(with {', '.join(COMPONENTS)}), got {type(folder_or_pipe).__name__}")
        missing = [n for n, m in parts.items() if m is None]
        if missing:
            raise ValueError(f"the {type(folder_or_pipe).__name__} has no {', '.join(missing)} "
                             f"(set components: {', '.join(COMPONENTS)})")
        tr = parts["transformer"]
        cfg = model_config(tr.config, text_len=text_len, where="pipe.transformer.config")
        model = load_model(checkpoint or tr.state_dict(), cfg, **weights)
        text = TextEncoder(parts["text_encoder"], hf_tokenize(parts["tokenizer"]),
                           text_len=text_len, device=device, dtype=torch_dtype)
        vae = parts["vae"].to(device=device).eval()
        return cls(model, text, vae, source=type(folder_or_pipe).__name__)

    # ------------------------------------------------------------------ generating
    @torch.no_grad()
    def __call__(self, prompt: str, *, num_blocks: int | None = None, cache: str = "longlive",
                 jitter_sigma: float | None = None, jitter_seed: int = 0, height: int = 480,
                 width: int = 832, block_frames: int = 3, steps: int = 4, shift: float = 5.0,
                 timesteps=None, seed: int = 0, output_type: str = "np", out: str | None = None,
                 fps: float = 16.0, progress: bool = True, **cache_options):
        """Stream a video of ``num_blocks`` blocks.

        Args:
            prompt: a prompt or a schedule (``"a cat[10s] | a dog[20s#]"``,
                :mod:`lol_model.streaming.prompts`).
            num_blocks: blocks of ``block_frames`` latent frames (4 video frames each);
                default: the schedule's length, else 40 (as ``lol generate``).
            cache: a cache preset (``longlive``, ``lol``, ``self-forcing``, ...); extra
                ``cache_options``: ``sink_frames``, ``local_attn_size``, ``window_frames``,
                ``recache``, ``global_sink`` (as the CLI's options).
            jitter_sigma: LoL jitter in ``[0, 1)``; ``None``: the preset's (``lol``: 0.8).
            height, width: video size in pixels, multiples of ``8 * patch`` (16).
            steps, shift, timesteps: the flow-matching schedule of each block.
            seed: noise seed (one CPU generator draws all noise, as ``lol generate``).
            output_type: ``"np"`` (numpy uint8 ``[T, H, W, 3]``, the frames the mp4 would
                receive), ``"pt"`` (the same as a torch tensor), ``"mp4"`` (written to ``out``
                segment by segment while the stream runs, in constant memory; returns the
                path) or ``"latent"`` (clean latents ``[1, Cz, F, h, w]`` in the model dtype,
                no decoding). ``np``, ``pt`` and ``latent`` keep the whole video in memory.
            progress: show a tqdm bar.

        Returns:
            the frames, the mp4 path or the latents, per ``output_type``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if (output_type == "mp4") != (out is not None):
            raise ValueError("out (a .mp4 path) goes with output_type='mp4', and only with it; "
                             f"got output_type={output_type!r}, out={out!r}")
        settings = self.settings(prompt, num_blocks=num_blocks, cache=cache,
                                 jitter_sigma=jitter_sigma, jitter_seed=jitter_seed,
                                 height=height, width=width, block_frames=block_frames,
                                 steps=steps, shift=shift, timesteps=timesteps, seed=seed,
                                 fps=fps, decode=output_type != "latent", **cache_options)
        self.model.configure_rope(jitter_sigma=settings.resolved_jitter_sigma(),
                                  seed=settings.jitter_seed)
        st = new_stream(settings, model=self.model, text_encoder=self.text_encoder)
        attach_outputs(st, out, vae=self.vae, collect=out is None)
        latents = []
        path = run_to_outputs(st, progress=progress, on_block=(
            lambda s, x0: latents.append(x0)) if output_type == "latent" else None)
        if output_type == "mp4":
            return path
        if output_type == "latent":
            return torch.cat(latents, dim=2)
        frames = torch.cat(st.video.chunks)
        return frames.numpy() if output_type == "np" else frames

    def settings(self, prompt: str, *, num_blocks, cache, jitter_sigma, jitter_seed, height,
                 width, block_frames, steps, shift, timesteps, seed, fps, decode,
                 **cache_options):
        """The :class:`~lol_model.streaming.settings.StreamSettings` of one call (checked)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str (a prompt or a schedule), got "
                            f"{type(prompt).__name__}")
        known = {"sink_frames", "local_attn_size", "window_frames", "recache", "global_sink"}
        bad = sorted(set(cache_options) - known)
        if bad:
            raise TypeError(f"unknown arguments {bad}; cache options are {sorted(known)}")
        check_seed("seed", seed)
        check_seed("jitter_seed", jitter_seed)
        scale = self.vae_scale()
        _, ph, pw = self.model.cfg.patch_size
        for name, v, p in (("height", height, ph), ("width", width, pw)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % (scale * p):
                raise ValueError(f"{name} must be a positive multiple of {scale * p} (VAE stride "
                                 f"{scale} x patch {p}), got {v!r}")
        if num_blocks is None:
            num_blocks = parse_schedule(prompt, block_frames=block_frames).total_blocks \
                or DEFAULT_BLOCKS
        dtype = next(k for k, v in DTYPES.items() if v == self.dtype)
        return StreamSettings(prompt=prompt, blocks=num_blocks, preset="custom",
                              cache=cache, jitter_sigma=jitter_sigma,
                              jitter_seed=jitter_seed, latent_height=height // scale,
                              latent_width=width // scale, block_frames=block_frames,
                              timesteps=tuple(timesteps) if timesteps else None, steps=steps,
                              shift=shift, seed=seed, dtype=dtype, device=str(self.device),
                              decode=decode, fps=fps, **cache_options)

    def vae_scale(self) -> int:
        """Spatial stride of the VAE (8 for Wan2.1's)."""
        return int(getattr(self.vae.config, "scale_factor_spatial", 8) or 8)


# ---------------------------------------------------------------------- folders
def check_folder(folder: str) -> None:
    """``ValueError`` unless ``folder`` is a diffusers Wan folder with every component."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder (expected a diffusers Wan folder with "
                         f"{', '.join(c + '/' for c in COMPONENTS)})")
    present = [c for c in COMPONENTS if os.path.isdir(os.path.join(folder, c))]
    if not present:
        raise ValueError(f"{folder} is not a diffusers Wan folder: it has none of "
                         f"{', '.join(c + '/' for c in COMPONENTS)}")
    missing = [c + "/" for c in COMPONENTS if c not in present]
    cfg = os.path.join(folder, "transformer", "config.json")
    if "transformer/" not in missing and not os.path.isfile(cfg):
        missing.append("transformer/config.json")
    if missing:
        raise ValueError(f"{folder} lacks the diffusers Wan component(s) {', '.join(missing)}")


def read_transformer_config(folder: str) -> dict:
    """The checked folder's ``transformer/config.json`` as a dict."""
    check_folder(folder)
    path = os.path.join(folder, "transformer", "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, expected a JSON object")
    return cfg


def load_folder_encoders(folder: str, *, text_len: int, dtype, device):
    """``(TextEncoder, AutoencoderKLWan)`` from ``folder``'s ``text_encoder/`` + ``tokenizer/``
    and ``vae/``, loaded as ``lol generate --text-encoder folder --vae folder`` loads them."""
    try:
        text = TextEncoder.from_pretrained(folder, text_len=text_len, device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, 'text_encoder')} + tokenizer/: {e}") from None
    try:
        vae = load_vae(os.path.join(folder, "vae"), device=device)
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, 'vae')}: {e}") from None
    return text, vae
