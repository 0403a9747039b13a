"""LoL in any diffusers Wan model: one call swaps every self-attention for ``rope_attention``.

Example::

    from diffusers import WanPipeline
    from lol_model.diffusers import apply_lol, remove_lol

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    apply_lol(pipe, jitter_sigma=0.8)    # every attn1 of pipe.transformer (and transformer_2)
    video = pipe("a red fox running through fresh snow").frames[0]
    remove_lol(pipe)                     # the stock processors, exactly as they were

:func:`apply_lol` installs a :class:`LolWanAttnProcessor` on every self-attention
(``WanAttention`` with ``is_cross_attention`` false: ``blocks.i.attn1``) of a
``WanTransformer3DModel`` (or any diffusers model with a ``WanRotaryPosEmbed`` at ``.rope``,
such as ``WanVACETransformer3DModel``). The processor projects and normalizes ``q, k, v``
as diffusers' ``WanAttnProcessor`` does, then calls :func:`lol_kernels.rope_attention` (the
fused Triton kernel on CUDA, the torch path on the CPU) with this project's per-head table
(:func:`lol_kernels.rope_frequencies`, LoL jitter on the temporal axis). Cross-attention and
the I2V image branch (``attn2``, ``add_k_proj``) keep diffusers' processors.

The table is built from the model's own config: ``attention_head_dim`` (``D``),
``num_attention_heads`` (``H``), Wan's ``(t, h, w)`` channel split ``D - 4(D//6), 2(D//6),
2(D//6)`` (the same as ``WanRotaryPosEmbed``'s ``t_dim, h_dim, w_dim``) and theta 10000 (the
base diffusers hard-codes); :func:`apply_lol` checks the unjittered table against the model's
``rope.freqs_cos`` / ``freqs_sin`` buffers and refuses a model whose RoPE differs. Positions
follow diffusers' token order: the patch grid ``(F / pt, H / ph, W / pw)`` of the latents,
frame-major then row-major, token ``(t, row, col)`` at position ``(t, row, col)``. A forward
pre-hook on ``transformer.rope`` (which diffusers calls first, with the latents) records the
grid, so the processors need nothing diffusers does not pass them.

At ``jitter_sigma = 0`` the output equals the stock processor's to fp32 rounding: the same
RoPE (diffusers rotates with cos/sin tables rounded to fp32, ``rope_attention`` with cos/sin of
float64 angles reduced modulo 2 pi, then fp32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import lol_kernels as lk
from lol_kernels.rope import check_seed

from ...streaming.settings import MAX_LATENT_FRAMES

BACKENDS = ("auto", "torch", "triton")
STATE_ATTR = "lol_state"  # attribute of the transformer that holds its LolState
WAN_THETA = 10000.0  # diffusers' WanRotaryPosEmbed is always built with this base


@dataclass
class VideoGrid:
    """Patch grid of the latents in the current forward, set by the pre-hook on ``rope``.

    Attributes:
        shape: ``(F / pt, H / ph, W / pw)`` or ``None`` before the first forward.
        pos: ``[B, N, 3]`` int32 ``(t, row, col)`` of every token, on the latents' device.
    """

    patch_size: tuple[int, int, int]
    shape: tuple[int, int, int] | None = None
    pos: torch.Tensor | None = None

    def record(self, module, args) -> None:
        """Forward pre-hook of ``WanRotaryPosEmbed``: ``args[0]`` is ``[B, C, F, H, W]``."""
        x = args[0]
        B, _, Fr, H, W = x.shape
        pt, ph, pw = self.patch_size
        self.shape = (Fr // pt, H // ph, W // pw)
        self.pos = video_positions(*self.shape, batch_size=B, device=x.device)


def video_positions(frames: int, grid_h: int, grid_w: int, *, batch_size: int = 1,
                    device=None) -> torch.Tensor:
    """``[B, frames * grid_h * grid_w, 3]`` int32 positions ``(t, row, col)``, frame-major
    then row-major (diffusers' Wan token order; :func:`lol_kernels.token_positions` with
    ``frame_t = 0..frames-1``), built on ``device`` without a host copy."""
    for name, n in (("frames", frames), ("grid_h", grid_h), ("grid_w", grid_w)):
        # positions run to n - 1 and are int32 in the kernels
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LATENT_FRAMES:
            raise ValueError(f"{name} must be an int in [0, {MAX_LATENT_FRAMES}] (positions are "
                             f"int32 in the kernels), got {n!r}")
    ax = [torch.arange(n, device=device, dtype=torch.int32) for n in (frames, grid_h, grid_w)]
    t, h, w = torch.meshgrid(*ax, indexing="ij")
    pos = torch.stack([t, h, w], dim=-1).reshape(1, -1, 3)
    return pos.expand(batch_size, -1, -1).contiguous()


@dataclass
class LolState:
    """What :func:`apply_lol` changed on one transformer, so :func:`remove_lol` can undo it.

    Attributes:
        table: the jittered :class:`~lol_kernels.RopeTable` (``H`` rows, ``D / 2`` pairs).
        grid: the shared :class:`VideoGrid` every processor reads.
        stock: module name -> the processor object it had before (restored as is).
        hook: handle of the pre-hook on ``transformer.rope``.
    """

    table: lk.RopeTable
    grid: VideoGrid
    jitter_sigma: float
    seed: int
    backend: str
    stock: dict = field(default_factory=dict)
    hook: object = None


class LolWanAttnProcessor:
    """diffusers attention processor for a Wan self-attention: RoPE + attention in one
    :func:`lol_kernels.rope_attention` call with a per-head (jittered) table.

    Called by ``WanAttention.forward`` as ``processor(attn, hidden_states,
    encoder_hidden_states, attention_mask, rotary_emb)`` (diffusers' processor interface).
    ``hidden_states [B, N, H * D]`` are the ``N`` video tokens of the forward whose grid
    ``grid`` recorded; ``rotary_emb`` (diffusers' cos/sin) is ignored: the positions come from
    the grid and the frequencies from ``table``. Returns ``[B, N, dim]`` in the input dtype.
    """

    # read or set by diffusers' set_attention_backend / context-parallel code
    _attention_backend = None
    _parallel_config = None

    def __init__(self, table: lk.RopeTable, grid: VideoGrid, *, backend: str = "auto"):
        self.table, self.grid, self.backend = table, grid, backend

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LolWanAttnProcessor serves self-attention only (no "
                             "encoder_hidden_states, no attention_mask)")
        pos = self.grid.pos
        if pos is None or tuple(pos.shape[:2]) != tuple(hidden_states.shape[:2]):
            got = None if pos is None else tuple(pos.shape[:2])
            raise ValueError(f"LolWanAttnProcessor: hidden_states hold {tuple(hidden_states.shape[:2])} "
                             f"(batch, tokens) but the latents of this forward gave {got}; it "
                             f"runs inside the transformer's forward (the pre-hook on "
                             f"transformer.rope records the grid), without sequence parallelism")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        out = lk.rope_attention(q, k, v, pos, pos, self.table, backend=self.backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------------- apply / remove
def wan_transformers(obj) -> list:
    """The Wan transformers of a model or pipeline: ``[obj]``, or a pipeline's
    ``transformer`` and ``transformer_2`` (Wan 2.2) that are set. ``TypeError`` otherwise."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanRotaryPosEmbed

    def is_wan(m):
        return isinstance(m, torch.nn.Module) and isinstance(getattr(m, "rope", None),
                                                             WanRotaryPosEmbed) \
            and any(isinstance(a, WanAttention) for a in m.modules())

    obj = getattr(obj, "_orig_mod", obj)  # a torch.compile'd model
    if is_wan(obj):
        return [obj]
    found = [getattr(getattr(obj, n, None), "_orig_mod", getattr(obj, n, None))
             for n in ("transformer", "transformer_2")]
    found = [m for m in found if m is not None]
    if found and all(is_wan(m) for m in found):
        return found
    raise TypeError(f"expected a diffusers WanTransformer3DModel (a model with a "
                    f"WanRotaryPosEmbed at .rope and WanAttention layers) or a Wan pipeline "
                    f"holding one in .transformer; got {type(obj).__name__}")


def self_attentions(transformer) -> dict:
    """Module name -> every self-attention ``WanAttention`` (``attn1``) of ``transformer``."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    return {n: m for n, m in transformer.named_modules()
            if isinstance(m, WanAttention) and not m.is_cross_attention}


def check_wan_rope(transformer, table: lk.RopeTable) -> None:
    """``ValueError`` unless ``table`` (unjittered) reproduces ``transformer.rope``'s cos/sin
    buffers: same head dim, (t, h, w) split, base and interleaved channel pairs."""
    rope = transformer.rope
    D = transformer.config.attention_head_dim
    split = (rope.t_dim, rope.h_dim, rope.w_dim)
    if tuple(table.axes) != split:
        raise ValueError(f"the transformer's RoPE splits head_dim {D} as {split} (t, h, w); "
                         f"this project's Wan split is {tuple(table.axes)}")
    cos, sin = rope.freqs_cos, rope.freqs_sin
    if cos.device.type == "meta" or cos.shape[-1] != D:
        return  # buffers not materialized (or not per channel): nothing to compare against
    n = min(cos.shape[0], 64)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * table.freqs[0]  # [n, D/2]
    err = max((cos[:n, 0::2].double().cpu() - ang.cos()).abs().max().item(),
              (sin[:n, 1::2].double().cpu() - ang.sin()).abs().max().item())
    if not err < 1e-6:  # diffusers rounds its cos/sin to fp32 (6e-8)
        raise ValueError(f"the transformer's RoPE buffers (rope.freqs_cos/freqs_sin) differ "
                         f"from Wan's 3D RoPE with theta {WAN_THETA:g} by {err:.3g}: a model "
                         f"with another RoPE base or layout is not supported")


def apply_lol(transformer, jitter_sigma: float = 0.8, *, seed: int = 0, backend: str = "auto",
              jitter_axes=(0,)):
    """Put LoL (per-head jittered 3D RoPE through :func:`lol_kernels.rope_attention`) on every
    self-attention of a diffusers Wan transformer.

    Args:
        transformer: a ``WanTransformer3DModel`` (or a ``torch.compile``'d one), or a
            ``WanPipeline`` / ``WanImageToVideoPipeline`` (its ``transformer`` and
            ``transformer_2`` when set).
        jitter_sigma: LoL's ``sigma`` in ``[0, 1)``; head ``h`` gets the base ``theta (1 +
            sigma eps_h)``, ``eps_h ~ U[-1, 1]``. 0 gives diffusers' RoPE.
        seed: seed of the per-head draw (:func:`lol_kernels.rope_frequencies`).
        backend: of :func:`lol_kernels.rope_attention`: ``"auto"`` (Triton on CUDA, torch on
            the CPU), ``"torch"`` or ``"triton"``.
        jitter_axes: position axes whose base is jittered (LoL: ``(0,)``, time).

    Returns:
        ``transformer`` (the argument), changed in place. Calling it again replaces the
        previous LoL settings; :func:`remove_lol` restores diffusers' processors.

    Raises:
        TypeError: not a Wan model or pipeline; ``jitter_sigma`` / ``seed`` of the wrong type.
        ValueError: ``jitter_sigma`` outside ``[0, 1)``, an unknown ``backend``, or a model
            whose RoPE is not Wan's.
    """
    models = wan_transformers(transformer)
    if isinstance(jitter_sigma, bool) or not isinstance(jitter_sigma, (int, float)):
        raise TypeError(f"jitter_sigma must be a number in [0, 1), got "
                        f"{type(jitter_sigma).__name__}")
    if not (math.isfinite(jitter_sigma) and 0.0 <= jitter_sigma < 1.0):
        raise ValueError(f"jitter_sigma must be in [0, 1) (LoL: 0.8), got {jitter_sigma!r}")
    check_seed("seed", seed)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for model in models:
        cfg = model.config
        H, D = cfg.num_attention_heads, cfg.attention_head_dim
        check_wan_rope(model, lk.rope_frequencies(D, H, theta=WAN_THETA))
        table = lk.rope_frequencies(D, H, theta=WAN_THETA, jitter_sigma=float(jitter_sigma),
                                    jitter_axes=jitter_axes, seed=seed)
        remove_lol(model)
        state = LolState(table, VideoGrid(tuple(cfg.patch_size)), float(jitter_sigma), seed,
                         backend)
        for name, attn in self_attentions(model).items():
            state.stock[name] = attn.processor
            attn.set_processor(LolWanAttnProcessor(table, state.grid, backend=backend))
        state.hook = model.rope.register_forward_pre_hook(state.grid.record)
        setattr(model, STATE_ATTR, state)
    return transformer


def remove_lol(transformer):
    """Undo :func:`apply_lol`: the processor objects each self-attention had before, and no
    hook. A model without LoL is left as it is. Returns ``transformer``."""
    for model in wan_transformers(transformer):
        state = getattr(model, STATE_ATTR, None)
        if state is None:
            continue
        modules = dict(model.named_modules())
        for name, proc in state.stock.items():
            modules[name].set_processor(proc)
        state.hook.remove()
        delattr(model, STATE_ATTR)
    return transformer


def lol_settings(transformer) -> dict | None:
    """``{"jitter_sigma", "seed", "backend"}`` of a model (or pipeline's first transformer)
    with LoL applied, else ``None``."""
    state = getattr(wan_transformers(transformer)[0], STATE_ATTR, None)
    return None if state is None else {"jitter_sigma": state.jitter_sigma, "seed": state.seed,
                                       "backend": state.backend}
