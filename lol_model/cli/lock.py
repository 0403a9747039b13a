"""The run lock: one ``lol generate`` at a time on an output.

:class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<path>.lock`` for the output and state
folders of one run, so a second run with the same ``--out`` (or ``--checkpoint-dir``) fails at
once instead of mixing its segments into the first run's. The kernel releases a flock when its
process dies, so a killed run never leaves a lock that blocks the next one.
"""

from __future__ import annotations

import os


class RunLock:
    """Exclusive locks on ``<path>.lock`` for each path, held until :meth:`release`.

    ``acquire`` never waits: a path locked by a live process raises ``ValueError`` naming it
    and the holder's pid. The lock files are removed on release (and re-checked after locking,
    so a file unlinked by a releasing holder is never trusted).
    """

    def __init__(self, paths):
        self.paths = sorted({os.path.abspath(p) + ".lock" for p in paths})
        self._fds: list[tuple[str, int]] = []

    def acquire(self) -> RunLock:
        try:
            for path in self.paths:
                self._fds.append((path, self._lock(path)))
        except BaseException:
            self.release()
            raise
        return self

    @staticmethod
    def _lock(path: str) -> int:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ValueError(f"{path[:-5]} is in use by another lol run (pid {holder}; "
                                 f"lock {path}); wait for it, or use another --out / "
                                 f"--checkpoint-dir") from None
            try:  # the holder we waited on may have unlinked the file: lock the live one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
            os.close(fd)

    def release(self) -> None:
        for path, fd in reversed(self._fds):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fds = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
