"""Head-parallel streaming (lol_model.parallel) on CPU over gloo: world sizes 2, 3, 4 against one
process (and over a DeviceMesh), a bad world size, dead and hung ranks named within a time
bound (lol_model.parallel.liveness), and resume of a parallel checkpoint after a crash inside one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from lol_model.model.config import PRESETS, ModelConfig
from lol_model.streaming.driver import run
from lol_model.streaming.settings import StreamSettings
from lol_model.streaming.stream import new_stream

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
    from lol_model.streaming.presets import CacheConfig, register_cache

    for name, routed in (("test-slow-fast", False), ("test-moc", True)):
        register_cache(name, lambda routed=routed, name=name, **kw: CacheConfig(
            name, sink_frames=1, window_frames=2, policy="bounded", cache_cls=SlowFastCache,
            rope_cut=False, cache_kwargs={"slow_frames": 3, "tau": 0.6, "routed": routed}, **kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_rank(rank: int, world: int, port: int, timeout_s: float = 30.0) -> None:
    from lol_model.parallel.runner import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())  # no process lock: it would leak when a rank is killed
    PRESETS["tiny12"] = TINY12
    register_test_caches()
    init_distributed(timeout_s=timeout_s)


def stream_latents(st, **kw) -> torch.Tensor:
    out = []
    run(st, progress=False, on_block=lambda _, x0: out.append(x0.clone()), **kw)
    return torch.cat(out, dim=2)


def worker_parity(rank, world, port, folder, mesh=False):
    from lol_model.parallel.runner import parallel_stream

    setup_rank(rank, world, port)
    res = {name: stream_latents(parallel_stream(s)) for name, s in CASES.items()}
    if mesh:  # one case again over a 1-D DeviceMesh of the world
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        res["mesh"] = stream_latents(parallel_stream(CASES["longlive-jitter"], mesh=mesh))
    torch.save(res, os.path.join(folder, f"rank{rank}.pt"))


def fail_here():
    raise ValueError("bad input on this rank")


FAULTS = {
    "sigkill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "raise": fail_here,
    "sleep": lambda: time.sleep(600),  # alive, heartbeat fresh, never reaches the collective
}


def worker_fault(rank, world, port, folder, victim, fault, timeout_s):
    """Streams 4 blocks; after block 1 rank ``victim`` suffers ``fault``; every rank that fails
    writes ``err<rank>.txt``: the wall time, then the error."""
    from lol_model.parallel.runner import parallel_stream, shutdown_distributed

    setup_rank(rank, world, port, timeout_s=timeout_s)
    st = parallel_stream(replace(BASE, blocks=4))

    def strike(st, _):
        if rank == victim and st.block == 1:
            with open(os.path.join(folder, "fault.txt"), "w") as f:
                f.write(str(time.time()))
            FAULTS[fault]()

    try:
        run(st, progress=False, on_block=strike)
    except Exception as e:
        with open(os.path.join(folder, f"err{rank}.txt"), "w") as f:
            f.write(f"{time.time()}\n{type(e).__name__}: {e}")
        shutdown_distributed(e)
        os._exit(1)
    shutdown_distributed()


def worker_resume(rank, world, port, folder, mode):
    from lol_model.parallel.runner import parallel_stream, resume_parallel, save_parallel

    setup_rank(rank, world, port)
    st = parallel_stream(CASES["slow-fast"])
    ckpt = os.path.join(folder, "ckpt")
    if mode == "full":  # uninterrupted (its checkpoints go elsewhere)
        lat = stream_latents(st, checkpoint_dir=os.path.join(folder, "full"), checkpoint_every=2,
                             save=save_parallel)
        torch.save(lat, os.path.join(folder, f"full{rank}.pt"))
    elif mode == "kill":  # checkpoints at blocks 2 and 4; rank 1 dies inside the one at 6
        import lol_model.parallel.runner as gen

        real = gen.save_stream

        def save_and_die(st, folder):  # its shard half written (slot 0 again), no manifest
            real(st, folder)
            if rank == 1 and st.block == 6:
                big = max((os.path.join(folder, n) for n in os.listdir(folder)),
                          key=os.path.getsize)
                os.truncate(big, os.path.getsize(big) // 2)
                os._exit(3)

        gen.save_stream = save_and_die
        run(st, progress=False, checkpoint_dir=ckpt, checkpoint_every=2, save=save_parallel)
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
        from lol_model.streaming.presets import CACHES

        for name in ("test-slow-fast", "test-moc"):
            CACHES.pop(name, None)
        PRESETS.pop("tiny12", None)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_one_process(world, reference, tmp_path):
    spawn(worker_parity, world, str(tmp_path), world == 2)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, ref in reference.items():
            err = ((got[name] - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (world, rank, name, err)
        if world == 2:
            assert torch.equal(got["mesh"], got["longlive-jitter"])


def test_mesh_must_be_one_dimensional():
    from lol_model.parallel.ulysses import UlyssesModel

    with pytest.raises(TypeError, match="1-D torch.distributed DeviceMesh"):
        UlyssesModel(None, mesh=object())


def test_world_size_must_divide_heads():
    from lol_model.parallel.ulysses import check_degree, head_split

    assert head_split(12, 3) == [[0, 4], [4, 8], [8, 12]]
    with pytest.raises(ValueError, match="ulysses_degree"):
        check_degree(12, 5)


def run_fault(tmp_path, world, victim, fault, timeout_s, bound_s):
    """Start ``world`` ranks with ``fault`` on rank ``victim``; every other rank must exit by
    itself within ``bound_s`` of the fault. Returns ``{rank: (seconds after the fault, error)}``."""
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=worker_fault, args=(r, world, port, str(tmp_path), victim, fault,
                                                    timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    others = [p for r, p in enumerate(procs) if r != victim]
    t0 = time.perf_counter()
    try:
        for p in others:  # start-up (imports) + 1 block + the bound, generously
            p.join(timeout=max(0.1, 60.0 + bound_s - (time.perf_counter() - t0)))
        assert not [p for p in others if p.is_alive()], "a rank hung after its peer's fault"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    assert all(p.exitcode == 1 for p in others), [p.exitcode for p in procs]
    t_fault = float((tmp_path / "fault.txt").read_text())
    out = {}
    for r in range(world):
        if r != victim:
            t, err = (tmp_path / f"err{r}.txt").read_text().split("\n", 1)
            out[r] = (float(t) - t_fault, err)
            assert out[r][0] < bound_s, (r, out[r])
    return out


@pytest.mark.parametrize("world, victim, fault, expected", [
    (3, 2, "sigkill", r"rank 2 of 3 died \(its process \d+ is gone\)"),
    (2, 1, "raise", r"rank 1 of 2 failed: ValueError: bad input on this rank"),
    (2, 0, "sigkill", r"rank 0 \(of 2, hosting the rendezvous store\) died .* unreachable"),
], ids=["sigkill", "raise", "store-host"])
def test_dead_rank_is_named_at_once(tmp_path, world, victim, fault, expected):
    # a dead peer closes its sockets: named within a few heartbeats, not the 30 s timeout
    for r, (dt, err) in run_fault(tmp_path, world, victim, fault, 30.0, 5.0).items():
        assert dt < 5.0 and re.search(f"RankFailure: {expected}; rank {r} of {world} saw ", err), \
            (dt, err)


def test_hung_rank_is_named_after_the_timeout(tmp_path):
    # rank 1 sleeps: alive, heartbeat fresh, but it never reaches the collective; rank 0 waits
    # out the 3 s timeout, then names it (a SIGSTOPped rank: tests/cli/test_parallel.py)
    (dt, err), = run_fault(tmp_path, 2, 1, "sleep", 3.0, 6.0).values()
    assert 3.0 < dt < 6.0 and "saw all_to_all fail: Timed out" in err and re.search(
        r"rank 1 of 2 stopped responding: alive \(heartbeat [\d.]+ s ago\) but stuck 1 ", err), \
        (dt, err)


def test_resume_after_kill_is_bit_exact(tmp_path):
    spawn(worker_resume, 2, str(tmp_path), "full")
    with pytest.raises(mp.ProcessExitedException):
        spawn(worker_resume, 2, str(tmp_path), "kill")
    doc = json.loads((tmp_path / "ckpt" / "parallel.json").read_text())
    assert (doc["slot"], doc["block"]) == (1, 4)  # not slot 0, which rank 1 died writing
    spawn(worker_resume, 2, str(tmp_path), "resume")
    for rank in range(2):
        block, got = torch.load(tmp_path / f"resumed{rank}.pt")
        full = torch.load(tmp_path / f"full{rank}.pt")
        assert block == 4 and torch.equal(got, full[:, :, 8:])  # blocks 5..8, 2 frames each


def test_crash_during_checkpoint_keeps_the_previous_one_and_world_size_checked(tmp_path, monkeypatch):
    import torch.distributed as dist

    import lol_model.parallel.runner as gen
    from lol_model.parallel.runner import parallel_stream, resume_parallel, save_parallel
    from lol_model.parallel.ulysses import UlyssesModel
    from lol_model.streaming.interfaces import StreamModel
    from lol_model.streaming.presets import CACHES

    PRESETS["tiny12"] = TINY12
    register_test_caches()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        st = parallel_stream(replace(CASES["moc"], blocks=2))
        assert isinstance(st.model, UlyssesModel) and isinstance(st.model, StreamModel)
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
