"""Progress bars for a terminal and for a batch job's log file: the one helper every bar goes through.

On a terminal (stderr is a TTY) :func:`progress_bar` returns a tqdm bar. Otherwise (a Slurm ``.err`` file,
``2> log``, CI) it returns a :class:`LineProgress`: periodic one-line updates on stderr, with no ``\\r`` and
no escape codes, e.g. ::

    shards demo: 40/120 img (33%), 2.10 img/s, elapsed 0:00:19, eta 0:00:38
    train: 300/1000 step (30%), 7.45 step/s, elapsed 0:00:40, eta 0:01:34, loss=0.0412, lr=2.00e-04

A line-mode bar prints a line when it starts, then one each period, and one when it ends. A nested bar
(``leave=False``, e.g. the denoising steps inside an image) prints only the periodic lines, on the time
period alone, so that short inner loops add nothing to the file.

Environment variables:

- ``SAMDIFFSR_PROGRESS_EVERY``: the period: seconds (``30``, the default), a percentage of the total
  (``10%``), or both (``30,10%``: whichever comes first).
- ``SAMDIFFSR_PROGRESS``: ``auto`` (default: bars on a terminal, lines otherwise), ``bar``, ``lines`` or ``off``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from samdiffsr.cli import UserError

MODE_ENV = "SAMDIFFSR_PROGRESS"
EVERY_ENV = "SAMDIFFSR_PROGRESS_EVERY"
DEFAULT_SECONDS = 30.0
MODES = ("auto", "bar", "lines", "off")


class ProgressSettingError(UserError, ValueError):
    """A bad value of one of the progress environment variables."""


def period() -> tuple[float | None, float | None]:
    """(seconds, percent) from ``SAMDIFFSR_PROGRESS_EVERY``; either may be None (not used)."""
    text = os.environ.get(EVERY_ENV, "").strip()
    if not text:
        return DEFAULT_SECONDS, None
    seconds = percent = None
    try:
        for part in (p.strip() for p in text.split(",")):
            if part.endswith("%"):
                percent = float(part[:-1])
            else:
                seconds = float(part.removesuffix("s"))
        if (seconds is not None and seconds < 0) or (percent is not None and not 0 < percent <= 100):
            raise ValueError
    except ValueError:
        raise ProgressSettingError(f"{EVERY_ENV}={text!r}: use seconds (30), a percentage (10%) or both "
                                   f"(30,10%)") from None
    return seconds, percent


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ProgressSettingError(f"{MODE_ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (see the module docstring).

    Takes tqdm's arguments; the line form uses ``total``, ``initial``, ``desc``, ``unit``, ``leave``,
    ``disable`` and ``file`` and ignores the rest (``dynamic_ncols`` ...).
    """
    chosen = mode()
    if chosen == "off":
        kwargs["disable"] = True
    if chosen == "bar" or (chosen == "auto" and is_terminal(kwargs.get("file") or sys.stderr)):
        from tqdm import tqdm

        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """The tqdm subset the project uses, printing plain periodic lines (see the module docstring)."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, initial: int = 0,
                 desc: str | None = None, unit: str = "it", leave: bool = True, disable: bool = False,
                 file: IO[str] | None = None, **_ignored: Any) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc or "", unit
        self.leave, self.disable, self.file = leave, disable, file
        self.postfix = ""
        self.seconds, self.percent = period()
        if not leave:
            self.percent = None
        self._start = self._last = time.monotonic()
        self._last_n: float | None = None
        self._start_n = initial
        self._bucket = self._bucket_of(initial)
        self._closed = False
        if leave and not disable:
            self._line()

    # --- what tqdm offers ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now = time.monotonic()
        bucket = self._bucket_of(self.n)
        if (self.seconds is not None and now - self._last >= self.seconds) or bucket > self._bucket:
            self._line(now)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def refresh(self) -> None:
        pass

    @staticmethod
    def write(s: str, file: IO[str] | None = None, end: str = "\n", nolock: bool = False) -> None:
        """Print a message line (to stdout, as tqdm.write does)."""
        out = file or sys.stdout
        out.write(s + end)
        out.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and not self.disable and self.n != self._last_n:  # no repeat of the last line
            self._line()

    # --- lines --------------------------------------------------------------------------------------
    def _bucket_of(self, n: float) -> int:
        if self.percent is None or not self.total:
            return 0
        return int(100.0 * n / self.total // self.percent)

    def format_line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:g}/{self.total:g} {self.unit} ({100.0 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n:g} {self.unit}"
        parts = [f"{self.desc}: {count}" if self.desc else count, f"{rate:.2f} {self.unit}/s",
                 f"elapsed {hms(elapsed)}"]
        if self.total and rate > 0:
            parts.append(f"eta {hms((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _line(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last, self._last_n, self._bucket = now, self.n, self._bucket_of(self.n)
        out = self.file or sys.stderr
        out.write(self.format_line(now) + "\n")
        out.flush()
