"""Sink-collapse diagnostics: phase coherence, predictions, stream metrics, page mass, CLI."""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

import lol_kernels as lk
from lol_kernels.diagnostics import (
    count_runs,
    homogenization,
    homogenization_over_blocks,
    phase_coherence,
    predict_collapse,
    sink_mass,
    stream_metrics,
    synchronized_events,
)
from lol_kernels.diagnostics.cli import add_diagnose_parser, build_parser, run_diagnose
from lol_kernels.diagnostics.page_mass import paged_attention_page_mass
from lol_kernels.rope.table import RopeTable

TWO_PI = 2 * math.pi


def _hand_table(periods_per_head):
    """A table whose head h has the pairs of angular frequency 2 pi / period, all on axis 0."""
    K = len(periods_per_head[0])
    freqs = torch.tensor([[TWO_PI / p for p in row] for row in periods_per_head],
                         dtype=torch.float64)
    return RopeTable(freqs, torch.zeros(K, dtype=torch.int64), (2 * K,))


# ---------------------------------------------------------------- phase coherence / predictions

def test_wan_predictions_contain_133_and_201():
    wan = lk.rope_frequencies(128, 12)  # sigma 0: temporal pairs omega_i = 1e4^(-2i/44), K = 22
    pred = predict_collapse(wan, threshold=0.55, min_delta=100, max_delta=400)
    assert 133 in pred and 201 in pred
    assert pred == [107, 133, 163, 201]  # pinned: the short list LoL's analysis refers to
    c = phase_coherence(wan, [132, 133, 134, 200, 201, 202]).mean(0)
    assert c[1] > max(c[0], c[2]) and c[4] > max(c[3], c[5])


def test_phase_coherence_matches_plain_complex_sum_and_chunking():
    table = lk.rope_frequencies(96, 5, jitter_sigma=0.6, seed=int(torch.randint(0, 1000, ())))
    deltas = torch.cat([torch.arange(0, 50), torch.randint(0, 172_801, (300,))])
    got = phase_coherence(table, deltas)
    K = 96 - 4 * (96 // 6)
    w = table.freqs[:, : K // 2]
    ref = torch.exp(1j * w[:, None, :] * deltas.double()[None, :, None]).mean(-1).abs()
    assert got.shape == (5, deltas.numel()) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(phase_coherence(table, deltas, chunk=7), got, rtol=0, atol=1e-12)
    assert torch.allclose(got[:, 0], torch.ones(5, dtype=torch.float64))
    # a run of consecutive integers takes the factorized matmul path: same values
    run = torch.arange(170_001, 172_801)
    fast = phase_coherence(table, run)
    ref_run = torch.exp(1j * w[:, None, :] * run.double()[None, :, None]).mean(-1).abs()
    torch.testing.assert_close(fast, ref_run, rtol=0, atol=1e-9)
    # height axis: a different set of pairs
    hk = phase_coherence(table, deltas[:10], axis=1)
    wh = table.freqs[:, K // 2 : K // 2 + 96 // 6]
    ref_h = torch.exp(1j * wh[:, None, :] * deltas[:10].double()[None, :, None]).mean(-1).abs()
    torch.testing.assert_close(hk, ref_h, rtol=0, atol=1e-9)


def test_two_commensurate_frequencies_give_exact_peaks():
    # periods 6 and 10: C(D) = |cos(pi D / 15)|, which is 1 exactly at multiples of 15
    t = _hand_table([[6, 10]])
    d = torch.arange(0, 121)
    torch.testing.assert_close(phase_coherence(t, d)[0], torch.cos(math.pi * d.double() / 15).abs(),
                               rtol=0, atol=1e-12)
    assert predict_collapse(t, threshold=0.5, min_delta=0, max_delta=120) == list(range(15, 121, 15))
    assert predict_collapse(t, threshold=0.5, min_delta=15, max_delta=44) == [30]  # (15, 44]
    # two heads: periods (6, 10) peak at 15k, periods (4, 12) at 6k; both at once at 30k
    t2 = _hand_table([[6, 10], [4, 12]])
    both = synchronized_events(t2, threshold=0.99, min_fraction=1.0, min_delta=0, max_delta=120)
    assert both.tolist() == [30, 60, 90, 120]
    either = synchronized_events(t2, threshold=0.99, min_fraction=0.5, min_delta=0, max_delta=120)
    assert either.tolist() == sorted(set(range(6, 121, 6)) | set(range(15, 121, 15)))
    assert count_runs(torch.tensor([3, 4, 5, 9, 11, 12])) == 3


def test_jitter_lowers_synchronized_events():
    counts = {}
    for sigma in (0.0, 0.1, 0.5, 0.8, 0.9):
        t = lk.rope_frequencies(128, 12, jitter_sigma=sigma)
        counts[sigma] = synchronized_events(t).numel()  # (100, 172800], all heads > 0.5
    assert counts[0.0] > 100
    assert all(counts[s] < counts[0.0] for s in (0.1, 0.5, 0.8, 0.9)), counts
    assert all(counts[s] <= counts[0.1] for s in (0.5, 0.8, 0.9)), counts
    # without jitter every head is the same, so "all heads" = "the one head"
    t0 = lk.rope_frequencies(128, 12)
    d = torch.arange(101, 172_801)
    one = d[phase_coherence(t0, d)[0] > 0.5]
    assert torch.equal(synchronized_events(t0), one)


def test_coherence_bad_inputs():
    t = lk.rope_frequencies(64, 2)
    with pytest.raises(ValueError, match="axis"):
        phase_coherence(t, [1, 2], axis=3)
    with pytest.raises(ValueError, match="deltas"):
        phase_coherence(t, [[1, 2]])
    with pytest.raises(ValueError, match="threshold"):
        predict_collapse(t, threshold=1.5, min_delta=0, max_delta=10)
    with pytest.raises(ValueError, match="max_delta"):
        predict_collapse(t, threshold=0.5, min_delta=10, max_delta=10)
    with pytest.raises(ValueError, match="min_fraction"):
        synchronized_events(t, min_fraction=0.0, max_delta=200)
    with pytest.raises(TypeError, match="table"):
        phase_coherence(torch.ones(2, 3), [1])


# ---------------------------------------------------------------- stream metrics

def _walk(F, shape=(4, 6, 8), step=0.15):
    """A drifting latent stream: a random walk, so frames move steadily away from the start."""
    x = torch.randn(F, *shape)
    x[1:] *= step
    return x.cumsum(0)


def _plant(x, at, sinks=(0, 1, 2), noise=0.02):
    x = x.clone()
    for i, f in enumerate(at):
        s = sinks[i % len(sinks)]
        x[f] = x[s] + noise * torch.randn_like(x[s])
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_to_sink_finds_planted_collapses(dtype):
    planted = [60, 133, 201]
    x = _plant(_walk(240), planted)
    m = stream_metrics(x.to(dtype), [0, 1, 2])
    assert m.events == planted and m.collapsed == planted
    assert m.score_max > 0.9 and m.score_mean < 0.1
    assert m.distance.shape == (240,) and m.distance[:3].abs().max() == 0
    assert [int(m.nearest_sink[f]) for f in planted] == [0, 1, 2]
    assert all(m.distance[f] < 0.2 * m.baseline[f] for f in planted)
    assert torch.isnan(m.score[:3]).all() and not torch.isnan(m.score[3 + 3 :]).any()


def test_l2_to_sink_run_is_one_event_and_clean_streams_have_none():
    x = _plant(_walk(150), [90, 91, 92])
    m = stream_metrics(x, [0, 1, 2])
    assert m.events == [90] and m.collapsed == [90, 91, 92]
    for clean in (_walk(300), torch.randn(300, 4, 6, 8)):  # drifting, and i.i.d. frames
        m = stream_metrics(clean * 7.0 + 3.0, [0, 1, 2])
        assert m.events == [] and m.score_max < 0.5, m.score_max
    # a single sink frame
    x = _plant(_walk(100), [70], sinks=(0,))
    assert stream_metrics(x, [0]).events == [70]


def test_stream_bad_inputs():
    with pytest.raises(ValueError, match="sink_frames"):
        stream_metrics(torch.randn(10, 2, 3, 3), [0, 12])
    with pytest.raises(ValueError, match="latents"):
        stream_metrics(torch.randn(10, 2, 3), [0])
    with pytest.raises(ValueError, match="window"):
        stream_metrics(torch.randn(10, 2, 3, 3), [0], window=0)


# ---------------------------------------------------------------- attention mass per entry

def _plain_mass(q, q_pos, ck, cpos, page_len, pt, freqs, pair_axis, k_new, causal, shift, scale):
    """Float64, loop-by-loop: rotate pairs as complex numbers, softmax, sum per entry."""
    B, N, Hq, D = q.shape
    Hkv = ck.shape[2]
    M = pt.shape[1]
    out = torch.zeros(B, Hq, N, M + 1, dtype=torch.float64)

    def rot(x, pos, h):  # x [D] real -> rotated [D/2] complex with head h's frequencies
        z = torch.complex(x[0::2].double(), x[1::2].double())
        ang = pos.double()[pair_axis] * freqs[h]
        return z * torch.exp(1j * ang)

    for b in range(B):
        keys = []  # (entry, kv head vector [Hkv, D], position [A], newkey index or -1)
        for m in range(M):
            page = int(pt[b, m])
            if page < 0:
                continue
            for s in range(int(page_len[page])):
                p = cpos[page, s].long() + (0 if shift is None else shift[b, m].long())
                keys.append((m, ck[page, s], p, -1))
        if k_new is not None:
            for j in range(N):
                keys.append((M, k_new[b, j], q_pos[b, j].long(), j))
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            for i in range(N):
                qi = rot(q[b, i, h], q_pos[b, i].long(), h)
                vis = [(m, k, p) for (m, k, p, j) in keys if not (causal and j > i)]
                if not vis:
                    continue
                s = torch.stack([(qi * rot(k[kvh], p, h).conj()).real.sum() for m, k, p in vis])
                w = torch.softmax(s * scale, dim=0)
                for (m, _, _), wi in zip(vis, w, strict=True):
                    out[b, h, i, m] += wi
    return out


def _paged_inputs(dtype, *, causal, with_new, with_shift):
    B, N, Hq, Hkv, D, P, S, M, A = 3, 5, 4, 2, 16, 7, 4, 5, 3
    table = lk.rope_frequencies(D, Hq, jitter_sigma=0.7, seed=int(torch.randint(0, 99, ())))
    q = torch.randn(B, N, Hq, D, dtype=dtype)
    q_pos = torch.randint(0, 300, (B, N, A))
    ck = torch.randn(P, S, Hkv, D, dtype=dtype) * 1.5
    cv = torch.randn(P, S, Hkv, D, dtype=dtype)
    cpos = torch.randint(0, 300, (P, S, A))
    page_len = torch.randint(1, S + 1, (P,))
    page_len[2] = 0  # an allocated but empty page
    pt = torch.tensor([[0, 3, -1, 5, 2], [1, 0, 4, -1, 6], [-1, -1, -1, -1, -1]],
                      dtype=torch.int32)  # rows share pages; row 2 reads no page
    shift = torch.randint(-50, 50, (B, M, A)) if with_shift else None
    kn = torch.randn(B, N, Hkv, D, dtype=dtype) if with_new else None
    vn = torch.randn(B, N, Hkv, D, dtype=dtype) if with_new else None
    return (q, q_pos, ck, cv, cpos, page_len, pt, table), dict(
        k_new=kn, v_new=vn, causal=causal, page_shift=shift)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 2e-7), (torch.float32, 2e-5)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal,with_new,with_shift", [(False, False, False),
                                                        (False, True, True),
                                                        (True, True, False)],
                         ids=["cache-only", "block-causal+shift", "token-causal"])
def test_page_mass_sums_to_one_and_matches_float64(dtype, tol, causal, with_new, with_shift):
    args, kw = _paged_inputs(dtype, causal=causal, with_new=with_new, with_shift=with_shift)
    q, q_pos, ck, cv, cpos, page_len, pt, table = args
    mass = paged_attention_page_mass(*args, **kw)
    B, N, Hq, D = q.shape
    assert mass.shape == (B, Hq, N, pt.shape[1] + 1) and mass.dtype == torch.float32
    assert not torch.isnan(mass).any()
    rows = mass.double().sum(-1)
    seen = torch.ones(B, dtype=torch.bool) if with_new else (pt >= 0).any(1)
    torch.testing.assert_close(rows[seen], torch.ones_like(rows[seen]), rtol=0, atol=1e-5)
    assert (mass[~seen] == 0).all()  # rows that see no key: all zeros
    assert (mass[:, :, :, 2][0] == 0).all() and (mass[1, :, :, 3] == 0).all()  # empty entries
    if not with_new:
        assert (mass[..., -1] == 0).all()
    ref = _plain_mass(q.double(), q_pos, ck.double(), cpos, page_len, pt, table.freqs,
                      table.pair_axis, None if kw["k_new"] is None else kw["k_new"].double(),
                      causal, kw["page_shift"], D**-0.5)
    err = (mass.double() - ref).abs().max().item()
    assert err <= tol, err


def test_page_mass_agrees_with_paged_attention():
    """Values that are constant per entry make the attention output the mass itself."""
    args, kw = _paged_inputs(torch.float64, causal=False, with_new=True, with_shift=True)
    q, q_pos, ck, cv, cpos, page_len, pt, table = args
    pt = pt[:1, [0, 1, 3]]  # distinct pages only: the entry is then a function of the slot
    kw["k_new"], kw["v_new"], kw["page_shift"] = (kw["k_new"][:1], kw["v_new"][:1],
                                                  kw["page_shift"][:1, [0, 1, 3]])
    q, q_pos = q[:1], q_pos[:1]
    M = pt.shape[1]
    D = q.shape[-1]
    cv = torch.zeros_like(ck)
    for m, page in enumerate(pt[0].tolist()):
        cv[page, :, :, m] = 1.0  # channel m marks entry m
    kw["v_new"] = torch.zeros_like(kw["v_new"])
    kw["v_new"][..., M] = 1.0
    out, _ = lk.attention.paged_attention_reference(q, q_pos, ck, cv, cpos, page_len, pt, table,
                                                    **kw)
    mass = paged_attention_page_mass(q, q_pos, ck, cv, cpos, page_len, pt, table, **kw)
    assert D > M
    torch.testing.assert_close(mass.double(), out[..., : M + 1].permute(0, 2, 1, 3),
                               rtol=0, atol=1e-6)


def test_homogenization_by_hand():
    B, Hq, N, M = 2, 4, 3, 4
    mass = torch.zeros(B, Hq, N, M + 1)
    mass[:, :2, :, 0] = 0.9   # heads 0, 1: 90% on entry 0 (sink)
    mass[:, :2, :, 3] = 0.1
    mass[:, 2:, :, 0] = 0.2   # heads 2, 3: 20% on the sink, rest on the new keys
    mass[:, 2:, :, M] = 0.8
    mass[1, 3, 2] = 0.0       # a row that saw no key: left out of the mean
    h = homogenization(mass, [0], threshold=0.5)
    torch.testing.assert_close(h.sink_mass, torch.tensor([[0.9, 0.9, 0.2, 0.2]] * 2,
                                                         dtype=torch.float64))
    torch.testing.assert_close(h.frac_heads, torch.tensor([0.5, 0.5], dtype=torch.float64))
    h2 = homogenization(mass, torch.tensor([True, False, False, True]), threshold=0.5)
    assert (h2.frac_heads == 0.5).all() and torch.allclose(h2.sink_mass[:, 0],
                                                           torch.ones(2, dtype=torch.float64))
    st = homogenization_over_blocks([mass, mass[:, :, :1]], [0, 3], threshold=0.95)
    assert st.sink_mass.shape == (2, B, Hq) and (st.frac_heads == 0.5).all()
    with pytest.raises(ValueError, match="sink_entries"):
        sink_mass(mass, [M])


def test_homogenization_of_real_block():
    args, kw = _paged_inputs(torch.float32, causal=False, with_new=True, with_shift=False)
    mass = paged_attention_page_mass(*args, **kw)
    h = homogenization(mass, [0, 1], threshold=0.3)
    want = mass.double()[..., :2].sum(-1).mean(-1)
    torch.testing.assert_close(h.sink_mass, want)
    assert h.frac_heads.shape == (3,)


# ---------------------------------------------------------------- CLI

def test_cli_writes_plots_and_json(tmp_path):
    planted = [70, 133]
    x = _plant(_walk(160), planted)
    from safetensors.torch import save_file
    save_file({"latents": x}, str(tmp_path / "lat.safetensors"))
    out = tmp_path / "diag"
    args = build_parser().parse_args([
        "--max-delta", "400", "--sigmas", "0,0.1,0.8", "--latents",
        str(tmp_path / "lat.safetensors"), "--sink-frames", "0,1,2", "--out", str(out)])
    summary = run_diagnose(args)
    for name in ("coherence.png", "synchronization.png", "l2_to_sink.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    js = json.loads((out / "summary.json").read_text())
    assert js == json.loads(json.dumps(summary))
    assert js["predicted_collapse"]["0"] == [107, 133, 163, 201]
    counts = {r["sigma"]: r["distances"] for r in js["synchronized_events"]}
    assert counts[0.0] > counts[0.1] >= counts[0.8]
    assert js["stream"]["events"] == planted


def test_cli_subcommand_and_module_entry(tmp_path):
    parent = argparse.ArgumentParser(prog="lol")
    sub = parent.add_subparsers(dest="cmd")
    add_diagnose_parser(sub)
    a = parent.parse_args(["diagnose", "--heads", "2", "--max-delta", "300"])
    assert a.func is run_diagnose and a.heads == 2 and a.sigmas == [0.0, 0.1, 0.5, 0.8, 0.9]
    torch.save(_plant(_walk(90), [50]), tmp_path / "lat.pt")
    r = subprocess.run([sys.executable, "-m", "lol_kernels.diagnostics", "diagnose",
                        "--heads", "4", "--max-delta", "300", "--sigmas", "0,0.5",
                        "--latents", str(tmp_path / "lat.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sigma 0   : [107, 133, 163, 201]" in r.stdout
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["stream"]["events"] == [50]
    assert (tmp_path / "o" / "l2_to_sink.png").is_file()
