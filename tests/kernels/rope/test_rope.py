"""RoPE tables and their head ranges, apply_rope, the diffusers Wan parity and position
precision."""

import math

import pytest
import torch

import lol_kernels as lk
from lol_kernels.rope import apply_rope_reference, rope_naive_fp32, wan_axes
from tests.support import max_err


def test_wan_axes_split():
    assert wan_axes(128) == (44, 42, 42)
    assert wan_axes(64) == (24, 20, 20)
    t = lk.rope_frequencies(128, 12)
    assert t.axes == (44, 42, 42)
    assert t.pair_axis.tolist() == [0] * 22 + [1] * 21 + [2] * 21


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sigma0_equals_diffusers_wan_rope(head_dim):
    """External reference: diffusers' WanRotaryPosEmbed + Wan's rotation on the same grid."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    F, Hp, Wp, H = 3, 5, 7, 2
    emb = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
    cos, sin = emb(torch.zeros(1, 16, F, 2 * Hp, 2 * Wp))  # [1, N, 1, D] each
    x = torch.randn(1, F * Hp * Wp, H, head_dim, dtype=torch.float64)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2].double(), sin[..., 1::2].double()
    want = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)

    pos = lk.token_positions(torch.arange(F), Hp, Wp)
    table = lk.rope_frequencies(head_dim, H)
    got = lk.apply_rope(x, pos, table)
    assert max_err(got, want) < 1e-6  # diffusers returns its fp64 cos/sin table as fp32
    got32 = lk.apply_rope(x.float(), pos, table)
    assert max_err(got32, want) < 1e-5


def test_jitter_draw_matches_contract():
    sigma, seed, H = 0.8, 7, 12
    t = lk.rope_frequencies(128, H, jitter_sigma=sigma, jitter_axes=(0, 2), seed=seed)
    g = torch.Generator().manual_seed(seed)
    eps = torch.rand(H, generator=g, dtype=torch.float64) * 2 - 1
    theta_h = 10000.0 * (1 + sigma * eps)
    for h in range(H):
        for j in range(64):
            a = int(t.pair_axis[j])
            i = j - {0: 0, 1: 22, 2: 43}[a]
            n = (44, 42, 42)[a]
            base = theta_h[h].item() if a in (0, 2) else 10000.0
            assert t.freqs[h, j].item() == pytest.approx(base ** (-2 * i / n), rel=1e-14)
    assert torch.equal(t.theta_h[:, 0], theta_h) and torch.equal(t.theta_h[:, 2], theta_h)
    assert torch.all(t.theta_h[:, 1] == 10000.0)
    # heads differ on jittered axes only
    assert not torch.equal(t.freqs[0, 1:22], t.freqs[1, 1:22])
    assert torch.equal(t.freqs[0, 22:43], t.freqs[1, 22:43])


def test_sigma0_heads_identical():
    t = lk.rope_frequencies(96, 6, jitter_sigma=0.0, jitter_axes=(0, 1, 2), seed=3)
    assert torch.equal(t.freqs, t.freqs[:1].expand_as(t.freqs))
    assert t.heads_share_freqs(6)


def test_explicit_axes():
    t = lk.rope_frequencies(32, 2, axes=(16, 8, 8), theta=500.0)
    assert t.axes == (16, 8, 8) and t.freqs.shape == (2, 16)
    assert t.freqs[0, 8].item() == 1.0 and t.freqs[0, 1].item() == pytest.approx(500 ** (-2 / 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_path_matches_float64(dtype):
    table = lk.rope_frequencies(64, 4, jitter_sigma=0.5)
    x = torch.randn(2, 37, 4, 64)
    pos = torch.randint(0, 100_000, (2, 37, 3))
    ref = apply_rope_reference(x.to(dtype).double(), pos, table)
    out = lk.apply_rope(x.to(dtype), pos, table)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert max_err(out, ref) < tol * ref.abs().max().item()


def _scores(qr, kr):
    return torch.einsum("nhd,mhd->hnm", qr.double(), kr.double())


def test_shift_invariance_2_24_fast_vs_naive():
    """Scores depend on position differences only: shifting every temporal position by 2^24
    keeps them (fast path), while naive float32 angles do not."""
    table = lk.rope_frequencies(128, 4, jitter_sigma=0.8)
    q, k = torch.randn(16, 4, 128), torch.randn(64, 4, 128)
    qp = torch.randint(0, 40, (16, 3))
    kp = torch.randint(0, 40, (64, 3))
    off = torch.tensor([2**24 - 41, 0, 0])
    base = _scores(lk.apply_rope(q, qp, table), lk.apply_rope(k, kp, table))
    fast = _scores(lk.apply_rope(q, qp + off, table), lk.apply_rope(k, kp + off, table))
    naive = _scores(rope_naive_fp32(q, qp + off, table), rope_naive_fp32(k, kp + off, table))
    scale = base.abs().max().item()
    assert max_err(fast, base) / scale < 1e-3
    assert max_err(naive, base) / scale > 1e-3  # what the fast path avoids


def test_custom_op_compiles():
    table = lk.rope_frequencies(32, 2, jitter_sigma=0.3)

    def f(x, pos):
        return lk.apply_rope(x, pos, table) * 2

    x, pos = torch.randn(1, 9, 2, 32), torch.randint(0, 50, (1, 9, 3))
    got = torch.compile(f, fullgraph=True, backend="eager")(x, pos)
    assert max_err(got, 2 * apply_rope_reference(x, pos, table)) < 1e-5
    torch.library.opcheck(torch.ops.lol.apply_rope.default,
                          (x, pos, table.freqs, table.pair_axis, "torch"))


# ---------------------------------------------------------------- bad inputs
T = lk.rope_frequencies(32, 2)
X = torch.randn(1, 5, 2, 32)
POS = torch.zeros(1, 5, 3, dtype=torch.int64)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(x=X.long()), TypeError, "x must be a floating"),
    (dict(x=torch.randn(5, 32)), ValueError, "x must be"),
    (dict(pos=POS.float()), TypeError, "pos must be an integer"),
    (dict(pos=torch.zeros(1, 4, 3, dtype=torch.long)), ValueError, "pos must have shape"),
    (dict(pos=torch.zeros(1, 5, dtype=torch.long)), ValueError, "pos must have 3 dimensions"),
    (dict(table="wan"), TypeError, "table must be a RopeTable"),
    (dict(table=lk.rope_frequencies(32, 3)), ValueError, "table must have one row per head"),
    (dict(table=lk.rope_frequencies(64, 2)), ValueError, "head_dim"),
    (dict(pos=torch.full((1, 5, 3), 2**40)), ValueError, "pos must hold positions"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(pos=torch.zeros(1, 5, 2, dtype=torch.long)), ValueError, "axes"),
])
def test_apply_rope_rejects(kwargs, exc, needle):
    args = dict(x=X, pos=POS, table=T, backend="auto") | kwargs
    with pytest.raises(exc, match=needle):
        lk.apply_rope(args["x"], args["pos"], args["table"], backend=args["backend"],
                      validate=True)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(head_dim=33), "head_dim"), (dict(num_heads=0), "num_heads"),
    (dict(jitter_sigma=1.0), "jitter_sigma"), (dict(jitter_sigma=-0.1), "jitter_sigma"),
    (dict(axes=(30, 4)), "axes"), (dict(axes=(15, 17)), "axes"),
    (dict(jitter_axes=(3,)), "jitter_axes"), (dict(theta=1.0), "theta"),
])
def test_rope_frequencies_rejects(kwargs, needle):
    args = dict(head_dim=32, num_heads=2) | kwargs
    with pytest.raises(ValueError, match=needle):
        lk.rope_frequencies(args.pop("head_dim"), args.pop("num_heads"), **args)


def test_angles_reduced():
    from lol_kernels.rope import rope_angles
    t = lk.rope_frequencies(16, 1)
    a = rope_angles(torch.tensor([[2**24, 3, 5]]), t)
    assert a.min() >= 0 and a.max() < 2 * math.pi


def test_rope_table_rows_are_the_heads_rows():
    full = lk.rope_frequencies(16, 12, jitter_sigma=0.8, seed=3)
    part = full.heads(4, 8)
    assert torch.equal(part.freqs, full.freqs[4:8])
    assert torch.equal(part.theta_h, full.theta_h[4:8])
    with pytest.raises(ValueError, match="start, stop"):
        full.heads(8, 13)
