"""Head-parallel streaming (lol_model.parallel) on CPU over gloo: world sizes 2, 3, 4 against one
process, a bad world size, a killed rank, and resume of a parallel checkpoint."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from lol_model.config import PRESETS, ModelConfig
from lol_model.generate import StreamSettings, new_stream, run

TINY12 = ModelConfig(num_layers=2, dim=96, num_heads=12, ffn_dim=128, text_dim=32, text_len=16,
                     freq_dim=32)
# 12 tokens per frame (4 x 3) so that 2, 3 and 4 ranks split every frame; a prompt switch
# (LongLive recache) at block 4; 8 blocks of 2 frames through a window of 1 + 2 frames
BASE = StreamSettings(prompt="a fox[4] | a fox in snow", blocks=8, preset="tiny12",
                      latent_height=8, latent_width=6, block_frames=2, steps=2, decode=False,
                      sink_frames=1, window_frames=2)
CASES = {
    "longlive-jitter": replace(BASE, cache="longlive", jitter_sigma=0.5),
    "relativistic": replace(BASE, cache="relativistic", window_frames=None),
    "slow-fast": replace(BASE, cache="test-slow-fast", window_frames=None, sink_frames=None),
    "moc": replace(BASE, cache="test-moc", window_frames=None, sink_frames=None),
}


def register_test_caches() -> None:
    """Slow-fast / moc with 3 slow frames and tau = 0.6: over the 8 blocks the tiny model
    promotes 7 frames, rejects 6 and evicts 4 from slow memory (every novelty path runs)."""
    from lol_kernels.cache import SlowFastCache
    from lol_model.caches import CacheConfig, register_cache

    for name, routed in (("test-slow-fast", False), ("test-moc", True)):
        register_cache(name, lambda routed=routed, name=name, **kw: CacheConfig(
            name, sink_frames=1, window_frames=2, policy="bounded", cache_cls=SlowFastCache,
            rope_cut=False, cache_kwargs={"slow_frames": 3, "tau": 0.6, "routed": routed}, **kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_rank(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    from lol_model.parallel import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    PRESETS["tiny12"] = TINY12
    register_test_caches()
    init_distributed(timeout_s=timeout_s)


def stream_latents(st, **kw) -> torch.Tensor:
    out = []
    run(st, progress=False, on_block=lambda _, x0: out.append(x0.clone()), **kw)
    return torch.cat(out, dim=2)


def worker_parity(rank, world, port, folder):
    from lol_model.parallel import parallel_stream

    setup_rank(rank, world, port)
    res = {name: stream_latents(parallel_stream(s)) for name, s in CASES.items()}
    torch.save(res, os.path.join(folder, f"rank{rank}.pt"))


def worker_kill(rank, world, port, folder):
    from lol_model.parallel import parallel_stream

    setup_rank(rank, world, port, timeout_s=10.0)
    st = parallel_stream(CASES["longlive-jitter"])

    def die(st, _):
        if rank == 1 and st.block == 2:
            os._exit(3)

    t0 = time.perf_counter()
    try:
        run(st, progress=False, on_block=die)
    except Exception as e:
        with open(os.path.join(folder, f"err{rank}.txt"), "w") as f:
            f.write(f"{time.perf_counter() - t0:.2f} {type(e).__name__}: {e}")
        raise


def worker_resume(rank, world, port, folder, mode):
    from lol_model.parallel import parallel_stream, resume_parallel, save_parallel

    setup_rank(rank, world, port)
    st = parallel_stream(CASES["slow-fast"])
    ckpt = os.path.join(folder, "ckpt")
    if mode == "full":  # uninterrupted (its checkpoints go elsewhere)
        lat = stream_latents(st, checkpoint_dir=os.path.join(folder, "full"), checkpoint_every=2,
                             save=save_parallel)
        torch.save(lat, os.path.join(folder, f"full{rank}.pt"))
    elif mode == "kill":  # checkpoints at blocks 2 and 4, then rank 1 dies after block 5

        def die(st, _):
            if rank == 1 and st.block == 5:
                os._exit(3)

        run(st, progress=False, checkpoint_dir=ckpt, checkpoint_every=2, save=save_parallel,
            on_block=die)
    else:
        try:
            resume_parallel(st, ckpt)
        except ValueError as e:
            with open(os.path.join(folder, f"err{rank}.txt"), "w") as f:
                f.write(str(e))
            return
        torch.save((st.block, stream_latents(st)), os.path.join(folder, f"resumed{rank}.pt"))


def spawn(fn, world, *args, timeout=120.0):
    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")
    t0 = time.perf_counter()
    while not ctx.join(timeout=max(1.0, timeout - (time.perf_counter() - t0))):
        if time.perf_counter() - t0 > timeout:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def reference():
    PRESETS["tiny12"] = TINY12
    register_test_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks; tiny ops gain nothing from threads on 2 cores
    try:
        yield {name: stream_latents(new_stream(s)) for name, s in CASES.items()}
    finally:  # the registries are process-wide: other test files enumerate them
        torch.set_num_threads(threads)
        from lol_model.caches import CACHES

        for name in ("test-slow-fast", "test-moc"):
            CACHES.pop(name, None)
        PRESETS.pop("tiny12", None)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_one_process(world, reference, tmp_path):
    spawn(worker_parity, world, str(tmp_path))
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, ref in reference.items():
            err = ((got[name] - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (world, rank, name, err)


def test_world_size_must_divide_heads():
    from lol_model.parallel import check_degree, head_split

    assert head_split(12, 3) == [[0, 4], [4, 8], [8, 12]]
    with pytest.raises(ValueError, match="ulysses_degree"):
        check_degree(12, 5)


def test_rope_table_rows_are_the_heads_rows():
    import lol_kernels as lk

    full = lk.rope_frequencies(16, 12, jitter_sigma=0.8, seed=3)
    part = full.heads(4, 8)
    assert torch.equal(part.freqs, full.freqs[4:8])
    assert torch.equal(part.theta_h, full.theta_h[4:8])
    with pytest.raises(ValueError, match="start, stop"):
        full.heads(8, 13)


def test_killed_rank_fails_cleanly(tmp_path):
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=worker_kill, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    for p in procs:  # rank 0 must exit by itself, well within its 10 s collective timeout
        p.join(timeout=max(0.1, 60.0 - (time.perf_counter() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer died"
    assert procs[1].exitcode == 3 and procs[0].exitcode != 0
    assert "RankFailure: rank 0 of 2" in (tmp_path / "err0.txt").read_text()


def test_resume_after_kill_is_bit_exact(tmp_path):
    spawn(worker_resume, 2, str(tmp_path), "full")
    with pytest.raises(mp.ProcessExitedException):
        spawn(worker_resume, 2, str(tmp_path), "kill")
    spawn(worker_resume, 2, str(tmp_path), "resume")
    for rank in range(2):
        block, got = torch.load(tmp_path / f"resumed{rank}.pt")
        full = torch.load(tmp_path / f"full{rank}.pt")
        assert block == 4 and torch.equal(got, full[:, :, 8:])  # blocks 5..8, 2 frames each


def test_crash_during_checkpoint_keeps_the_previous_one_and_world_size_checked(tmp_path, monkeypatch):
    import torch.distributed as dist

    import lol_model.generate as gen
    from lol_model.caches import CACHES
    from lol_model.parallel import parallel_stream, resume_parallel, save_parallel

    PRESETS["tiny12"] = TINY12
    register_test_caches()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        st = parallel_stream(replace(CASES["moc"], blocks=2))
        run(st, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2,
            save=save_parallel)
        st.settings.blocks = 3
        run(st, progress=False)
        real = gen.save_stream

        def crash(st, folder):  # the shard is written, the manifest is not
            real(st, folder)
            raise OSError("disk full")

        monkeypatch.setattr(gen, "save_stream", crash)
        with pytest.raises(OSError):
            save_parallel(st, str(tmp_path))
        monkeypatch.undo()
        again = parallel_stream(CASES["moc"])
        resume_parallel(again, str(tmp_path))
        assert again.block == 2
        doc = json.loads((tmp_path / "parallel.json").read_text())
        (tmp_path / "parallel.json").write_text(json.dumps({**doc, "world_size": 2}))
        with pytest.raises(ValueError, match="written by 2 ranks; resume it with --nproc 2"):
            resume_parallel(parallel_stream(CASES["moc"]), str(tmp_path))
    finally:
        dist.destroy_process_group()
        for name in ("test-slow-fast", "test-moc"):  # the registries are process-wide
            CACHES.pop(name, None)
        PRESETS.pop("tiny12", None)


def test_cli_nproc_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from lol_model.cli import main

    common = ["generate", "--blocks", "2", "--no-decode", "--save-latents", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one.mp4")]) == 0
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two.mp4")]) == 0
    one, two = (load_file(tmp_path / f"{n}.latents" / "seg_00000.safetensors")["latents"]
                for n in ("one", "two"))
    assert torch.equal(one, two)
    assert main([*common, "--nproc", "3", "--out", str(tmp_path / "three.mp4")]) == 2  # 4 heads
