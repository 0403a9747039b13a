"""Which rank died, failed or hung: a liveness record per rank in the rendezvous store.

A collective only tells a surviving rank that *some* peer went away (gloo: "Connection closed
by peer", or a timeout after the process group's ``timeout``). So every rank of a head-parallel
run keeps a record about itself in the store the process group was rendezvoused on, under
``lol/live/``:

* ``hb/<r>``: ``{"t": wall time, "n": collectives entered, "op": the last one, "pid", "host",
  "machine"}`` (:func:`machine_id`), rewritten every ``interval`` s by a daemon thread. A
  killed or SIGSTOPped rank goes stale; a rank stuck outside the collectives (an endless loop,
  a sleep) stays fresh but falls behind in ``n``.
* ``end/<r>``: why it stopped: ``failed: <exception>`` (its own error, :func:`record_failure`),
  ``survivor: ...`` then ``told: <diagnosis>`` (a collective failed under it), ``exited``.

A rank whose collective fails reads the others' records (:meth:`Liveness.diagnose`, at most
``2.5 interval`` s more) and names the culprit: a recorded failure, a process gone or stopped
(same machine: ``/proc``), a stale heartbeat, or (after a timeout) a rank behind in ``n``. The store
lives in rank 0 (plain ``env://``) or in the launcher (torchrun's agent, :func:`spawn_ranks` of
``lol generate --nproc``); a rank 0 that hosts it waits (bounded) until the others have read it.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing.connection
import os
import pickle
import socket
import threading
import time

import torch.distributed as dist

from ..errors import exit_status, first_line

PREFIX = "lol/live"

_current: Liveness | None = None


def current() -> Liveness | None:
    """This process's :class:`Liveness` (``None`` before :func:`start`)."""
    return _current


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the collective timeout, at most 1 s."""
    return max(0.05, min(1.0, timeout_s / 10))


def _ranks(rs: list[int]) -> str:
    return f"rank {rs[0]}" if len(rs) == 1 else "ranks " + ", ".join(map(str, rs))


def machine_id() -> str:
    """This host's name, kernel boot and PID namespace: two ranks with the same id see each
    other's processes (``/proc``), so a pid can be probed."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:  # no /proc: the host name alone
        pass
    return "|".join(parts)


def process_state(pid: int) -> str:
    """``"gone"``, ``"stopped"``, ``"alive"`` for a process of this host (``/proc``, or a signal
    0 probe where there is no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return "gone" if state in "ZXx" else "stopped" if state in "Tt" else "alive"
    except FileNotFoundError:
        return "gone"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        except OSError:
            pass
        return "alive"


class Liveness:
    """This rank's record in the store ``store``, and the reading of the others' records.

    Args:
        store: the rendezvous store (a ``TCPStore``; it is cloned: the heartbeat thread and
            the diagnosis each get their own connection, the latter with a short timeout so a
            stopped store host cannot block it).
        rank, world: this process's rank and the world size (of the default group).
        interval: seconds between heartbeats.
        store_host: the rank whose process hosts the store, or ``None`` (the launcher).
    """

    def __init__(self, store, rank: int, world: int, *, interval: float,
                 store_host: int | None = 0):
        self.rank, self.world, self.interval, self.store_host = rank, world, interval, store_host
        self.n, self.op, self.ended, self.store_lost = 0, "start-up", None, False
        self.host, self.machine, self.pid = socket.gethostname(), machine_id(), os.getpid()
        try:
            beat, reader = store.clone(), store.clone()
            reader.set_timeout(datetime.timedelta(seconds=max(2.0, 2 * interval)))
        except (AttributeError, RuntimeError):  # a store without clone (HashStore): share it
            beat = reader = store
        self.store = dist.PrefixStore(PREFIX, reader)
        self._stop = threading.Event()
        self._set(self.store, f"hb/{rank}", self.record())
        threading.Thread(target=self._beat, args=(dist.PrefixStore(PREFIX, beat),),
                         name="lol-heartbeat", daemon=True).start()

    def record(self) -> str:
        return json.dumps({"t": time.time(), "n": self.n, "op": self.op, "pid": self.pid,
                           "host": self.host, "machine": self.machine})

    @staticmethod
    def _set(store, key: str, value: str) -> bool:
        try:
            store.set(key, value)
            return True
        except Exception:  # the store's host is gone: nothing left to tell
            return False

    def _beat(self, store) -> None:
        while not self._stop.wait(self.interval):
            if not self._set(store, f"hb/{self.rank}", self.record()):
                return

    def enter(self, op: str) -> None:
        """Count a collective about to start (no store traffic: the heartbeat carries it)."""
        self.n += 1
        self.op = op

    def end(self, why: str) -> None:
        """Record why this rank stops (``failed: ...``, ``exited``, ...)."""
        self.ended = why
        if not self.store_lost:
            self._set(self.store, f"end/{self.rank}", why)

    def close(self, why: str | None = "exited") -> None:
        """Record ``why`` this rank ends (``None``: keep what is recorded, else ``exited``) and
        stop the heartbeat."""
        if why is not None or self.ended is None:
            self.end(why or "exited")
        self._stop.set()

    def read(self) -> dict[int, tuple[dict | None, str | None]]:
        """``{rank: (heartbeat record or None, end record or None)}`` of every rank."""
        out = {}
        for r in range(self.world):
            hb = self.store.get(f"hb/{r}") if self.store.check([f"hb/{r}"]) else None
            end = self.store.get(f"end/{r}") if self.store.check([f"end/{r}"]) else None
            out[r] = (json.loads(hb) if hb else None, end.decode() if end else None)
        return out

    def verdict(self, recs: dict, *, final: bool) -> str | None:
        """The culprit named from the records ``recs`` (:meth:`read`), or ``None`` when they do
        not tell yet; ``final`` also names ranks behind the others in collectives (only
        meaningful once the collective timed out)."""
        now, w = time.time(), self.world
        quiet = {r: hb for r, (hb, end) in recs.items()
                 if r != self.rank and end is None}  # neither survivor nor finished
        failed = [(r, end) for r, (hb, end) in recs.items()
                  if r != self.rank and end and end.startswith("failed: ")]
        if failed:
            return f"rank {failed[0][0]} of {w} {failed[0][1]}"
        missing = [r for r, hb in quiet.items() if hb is None]
        if missing:
            return f"{_ranks(missing)} of {w} never reported (died during start-up)"
        states = {r: process_state(hb["pid"]) if hb["machine"] == self.machine else None
                  for r, hb in quiet.items()}
        age = {r: now - hb["t"] for r, hb in quiet.items()}
        for state, how in (("gone", "died (its process {pid} is gone)"),
                           ("stopped", "is stopped (process {pid} in state T, e.g. SIGSTOP; "
                                       "last heartbeat {age:.1f} s ago)")):
            rs = [r for r, s in states.items() if s == state]
            if rs:
                r = rs[0]
                return f"{_ranks(rs)} of {w} " + how.format(pid=quiet[r]["pid"], age=age[r])
        stale = [r for r in quiet if age[r] > 2 * self.interval]
        if stale:
            return (f"{_ranks(stale)} of {w} died or stopped responding (last heartbeat "
                    f"{age[stale[0]]:.1f} s ago, on {quiet[stale[0]]['host']})")
        if not final:
            return None
        top = max([self.n] + [hb["n"] for r, (hb, end) in recs.items() if hb and end])
        behind = [r for r, hb in quiet.items() if hb["n"] < top]
        if behind:
            hb = quiet[behind[0]]
            return (f"{_ranks(behind)} of {w} stopped responding: alive (heartbeat "
                    f"{age[behind[0]]:.1f} s ago) but stuck {top - hb['n']} collective(s) "
                    f"behind the others, after {hb['op']!r}")
        return None

    def settled(self, hb: dict | None, end: str | None) -> bool:
        """Whether a rank needs the store no more: it told, failed, exited, died or hung."""
        if end is not None:
            return not end.startswith("survivor")
        return hb is None or time.time() - hb["t"] > 2 * self.interval or (
            hb["machine"] == self.machine and process_state(hb["pid"]) != "alive")

    def diagnose(self, what: str) -> str | None:
        """After this rank's collective ``what`` failed: the culprit, or ``None`` when the records
        name none. Takes at most ``2.5 interval`` s (more on a store-hosting rank 0, which
        waits as long again for the others to read)."""
        self.end(f"survivor: {what} failed")  # first, so that no peer blames this rank
        deadline = time.monotonic() + 2.5 * self.interval
        verdict = None
        while True:
            final = time.monotonic() >= deadline
            try:
                verdict = self.verdict(self.read(), final=final)
            except Exception:  # the store is unreachable: its host died
                self.store_lost = True
                self._stop.set()
                host = "the launcher" if self.store_host is None else f"rank {self.store_host}"
                return (f"{host} (of {self.world}, hosting the rendezvous store) died or "
                        f"stopped, or exited after another rank's failure: the store is "
                        f"unreachable")
            if verdict or final:
                break
            time.sleep(self.interval / 4)
        self.end(f"told: {verdict}")
        if self.rank == self.store_host:  # keep the store up until the others have read it
            deadline = time.monotonic() + 2.5 * self.interval
            while time.monotonic() < deadline:
                try:
                    recs = self.read()
                except Exception:
                    break
                if all(self.settled(hb, end) for hb, end in recs.values()):
                    break
                time.sleep(self.interval / 4)
        return verdict


def start(store, rank: int, world: int, *, timeout_s: float,
          store_host: int | None = 0) -> Liveness:
    """Start this process's :class:`Liveness` (one per process; a second call returns it)."""
    global _current
    if _current is None:
        _current = Liveness(store, rank, world, interval=heartbeat_interval(timeout_s),
                            store_host=store_host)
    return _current


def stop(why: str | None = "exited") -> None:
    """Record this rank's end (:meth:`Liveness.close`) and stop its heartbeat."""
    global _current
    if _current is not None:
        _current.close(why)
        _current = None


def record_failure(exc: BaseException) -> None:
    """Record that this rank fails with ``exc`` (its own error, not a peer's): the others'
    diagnosis then names it. Skipped after a failed collective (the error, however wrapped,
    is then a peer's)."""
    if _current is not None and not (_current.ended or "").startswith(("survivor", "told")):
        _current.end(f"failed: {first_line(exc, 500)}"[:500])


# --------------------------------------------------------------------------- launcher
def _error_line(path: str) -> str | None:
    """The last line of the traceback a spawned child left in ``path`` (torch's error file)."""
    try:
        with open(path, "rb") as f:
            lines = [ln for ln in pickle.load(f).strip().splitlines() if ln.strip()]
    except (OSError, EOFError, pickle.UnpicklingError):
        return None
    return lines[-1] if lines else None


def spawn_ranks(fn, nproc: int, args: tuple = (), *, timeout_s: float, poll_s: float = 0.2):
    """Run ``fn(rank, nproc, store_port, *args)`` in ``nproc`` spawned processes while this
    process hosts their rendezvous ``TCPStore`` on 127.0.0.1 (so the store outlives any rank).

    Returns when every rank exits 0. Otherwise kills the rest and raises ``RuntimeError`` with
    one line naming the rank to blame: the first that died (a signal or an exit code other
    than 1), else the first error (a survivor's diagnosis names the culprit itself). A run whose
    heartbeats all stop for ``timeout_s`` + 5 s (no rank timed out by itself) is killed too.
    """
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    live = dist.PrefixStore(PREFIX, store)
    ctx = mp.start_processes(fn, args=(nproc, store.port, *args), nprocs=nproc, join=False,
                             start_method="spawn")
    procs = ctx.processes
    try:
        while True:
            multiprocessing.connection.wait([p.sentinel for p in procs], timeout=poll_s)
            codes = [p.exitcode for p in procs]
            if all(c == 0 for c in codes):
                return
            dead = [r for r, c in enumerate(codes) if c not in (None, 0, 1)]
            if dead:
                r = dead[0]
                raise RuntimeError(f"rank {r} of {nproc} died ({exit_status(codes[r])})")
            err = [r for r, c in enumerate(codes) if c == 1]
            if err:
                r = err[0]
                line = _error_line(ctx.error_files[r]) or "exited with an error"
                end = live.get(f"end/{r}").decode() if live.check([f"end/{r}"]) else ""
                if end.startswith(("told: ", "survivor")):  # its diagnosis names the culprit
                    raise RuntimeError(line.split(": ", 1)[-1])
                cls, _, msg = line.partition(": ")  # lol's own errors read without the class
                raise RuntimeError(f"rank {r} of {nproc} failed: " + (
                    msg if cls.startswith("lol_model.") and msg else line))
            stale = []
            for r, c in enumerate(codes):
                if c is None and live.check([f"hb/{r}"]):
                    age = time.time() - json.loads(live.get(f"hb/{r}"))["t"]
                    if age > timeout_s + 5:
                        stale.append((age, r))
            if stale:
                age, r = max(stale)
                raise RuntimeError(f"rank {r} of {nproc} stopped responding (last heartbeat "
                                   f"{age:.1f} s ago)")
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join()
