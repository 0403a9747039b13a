"""The exceptions a run raises and the one-line texts that describe failures.

The bottom layer of ``lol_model``: every other module may import it; it imports nothing of
the project. ``lol`` maps them to exit codes: :class:`GenerationError` (and its
:class:`SegmentError`, :class:`RankFailure`) exit 1, :class:`Interrupted` exits 130, and a
``ValueError`` / ``OSError`` raised before any work (a bad option or file) exits 2.
"""

from __future__ import annotations

import signal


class GenerationError(RuntimeError):
    """A run stopped because its output went wrong (non-finite latents); ``lol`` exits 1.

    ``block``: the 1-based block that went wrong (blocks before it were written), if known.
    """

    def __init__(self, message: str, *, block: int | None = None):
        super().__init__(message)
        self.block = block


class SegmentError(GenerationError):
    """An mp4 or latent segment could not be written or closed (ffmpeg died, disk full), or the
    final join failed. The broken segment was discarded and never recorded, so no checkpoint
    refers to it; ``--resume`` regenerates it."""


class RankFailure(RuntimeError):
    """A collective failed: another rank died, timed out or failed first. The message names
    that rank when the liveness records tell (:mod:`lol_model.parallel.liveness`)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with a message saying at which block and what was kept."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters (one-line errors)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def exit_status(code: int) -> str:
    """How a child process ended, from its return code: ``"exited with status 1"``, or for a
    negative code (killed by a signal) ``"killed by signal 9, SIGKILL"``."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"killed by signal {-code}, {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
