"""Inputs and float64 references of the fused Triton backward of ``rope_attention``: fresh
random inputs with a jittered table and incoming gradients (:func:`make_case`), and ``dq, dk,
dv`` by autograd through the reference formulas in any dtype (:func:`reference_grads`)."""

import torch

import lol_kernels as lk
from lol_kernels.attention.reference import masked_softmax, rotated_scores

A = 3


def make_case(*, B=1, N=37, Nk=29, Hq=12, Hkv=4, D=32, sigma=0.8, base=0):
    """Fresh random inputs (float32 masters), jittered table, incoming gradients."""
    table = lk.rope_frequencies(D, Hq, jitter_sigma=sigma, seed=int(torch.randint(0, 999, ())))

    def pos(n):
        p = torch.randint(0, 16, (B, n, A))
        p[..., 0] += torch.randint(0, 48, (B, n)) + base
        return p

    return dict(q=torch.randn(B, N, Hq, D), k=torch.randn(B, Nk, Hkv, D),
                v=torch.randn(B, Nk, Hkv, D), q_pos=pos(N), k_pos=pos(Nk), table=table,
                grad_out=torch.randn(B, N, Hq, D), grad_lse=torch.randn(B, Hq, N))


def reference(q, k, v, q_pos, k_pos, table, causal, scale=None):
    """``out, lse`` from the reference formulas in the inputs' dtype (RoPE in fp32/fp64,
    products in the input dtype, softmax in fp32/fp64): differentiable."""
    s = rotated_scores(q, q_pos, k, k_pos, table, scale or q.shape[-1] ** -0.5)
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril() if causal else None
    p, lse = masked_softmax(s, mask)
    vv = v.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), vv), lse


def reference_grads(c, dtype, causal, use_out=True, use_lse=True, scale=None):
    """``(dq, dk, dv)`` by autograd through :func:`reference` run in ``dtype``."""
    xs = [c[n].to(dtype).requires_grad_() for n in "qkv"]
    out, lse = reference(*xs, c["q_pos"], c["k_pos"], c["table"], causal, scale)
    outs, grads = [], []
    if use_out:
        outs.append(out)
        grads.append(c["grad_out"].to(out.dtype))
    if use_lse:
        outs.append(lse)
        grads.append(c["grad_lse"].to(lse.dtype))
    got = torch.autograd.grad(outs, xs, grads, allow_unused=True)  # lse alone: no dv
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, got)]
