"""The stop request: a signal asks every rank to save a checkpoint at the next step boundary, then stop.

The ranks do not save inside the signal handler (a DeepSpeed save is collective): the handler sets a flag,
the training loop polls it after every step and all-reduces it (samdiffsr/train/loop.py). SIGTERM (``kill``,
``scancel``, preemption with a grace time, a launcher shutting its ranks down) and SIGUSR2 (Slurm's warning
before the time limit, ``scancel --signal=USR2``) are caught this way under every launcher. The DataLoader
workers ignore both (samdiffsr/data/stream.py), so a signal to the whole process group does not kill them
before their rank has saved.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
EXIT_TERMINATED = 128 + signal.SIGTERM  # stopped at a SIGTERM checkpoint, as a process killed by it


class StopRequest:
    """A flag set by signal handlers; the training loop calls it after every step (``stop_requested``)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.received: list[signal.Signals] = []

    def __call__(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int) -> None:
        self.received.append(signal.Signals(signum))
        self._event.set()

    @contextmanager
    def catching(self, *signums: int) -> Iterator[dict[int, Any]]:
        """While inside: these signals only set the flag. Yields the handlers they replaced."""
        previous = {s: signal.getsignal(s) for s in signums}

        def handler(signum: int, frame: object) -> None:
            log.warning("caught %s: every rank saves a checkpoint at the next step boundary, then stops",
                        signal.Signals(signum).name)
            self.request(signum)

        for s in signums:
            signal.signal(s, handler)
        try:
            yield previous
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
