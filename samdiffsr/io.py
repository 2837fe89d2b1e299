"""Files: written atomically with a full disk reported as such, checkpoints read safely, and the error
for a file that cannot be used.

A write that runs out of space raises ``OSError(ENOSPC, ..., PATH)`` naming the file, which the command
lines turn into "no space left on device writing PATH" and exit status 5 (:mod:`samdiffsr.cli`). torch's
file writer hides the cause (``unexpected pos``, ``basic_ios::clear``); :func:`no_space_error` recognises
it from the exception chain or, failing that, from a file system with no space left.
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# torch's file writer failing (its messages hide errno) with less free space than this left: a full disk.
TORCH_WRITE_ERRORS = ("inline_container", "iostream error", "PytorchStreamWriter", "file write failed")
NEARLY_FULL_BYTES = 1 << 20


class FileProblem(Exception):
    """A file that cannot be used: ``path`` names it, ``reason`` says why; the message is ``PREFIXPATH: reason``.

    Subclasses pick a builtin base too (``ValueError``, ``RuntimeError``) and may set ``prefix``.
    """

    prefix = ""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.prefix}{self.path}: {reason}")

    def __reduce__(self):  # keep both fields when sent between worker processes
        return type(self), (self.path, self.reason)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes available to us on the file system holding ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def no_space_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """``OSError(ENOSPC)`` naming ``path`` when ``exc`` came from a full disk while writing it, else None.

    An ``OSError(ENOSPC)`` that already names its file is returned as it is.
    """
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and exc.filename:
        return exc
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _chain(exc)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in TORCH_WRITE_ERRORS):
        free = free_bytes(path)
        if free is not None and free < NEARLY_FULL_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside: a failure caused by a full disk becomes ``OSError(ENOSPC)`` naming ``path``."""
    try:
        yield
    except Exception as exc:
        full = no_space_error(exc, path)
        if full is None or full is exc:
            raise
        raise full from exc


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` beside ``path``, then rename it over ``path``; on any failure no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with writing(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to ``path`` atomically and durably (fsynced before the rename); missing folders are made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: _write_synced(tmp, data))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTO = b"\x80"  # the older format: a pickle stream


def torch_load(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU (plain data, no code unpickled).

    A missing, foreign or damaged file raises ``error`` with one line naming it: ``WHAT not found: PATH``,
    ``PATH: not a checkpoint ...`` or ``PATH: not a readable checkpoint, damaged or truncated (...)``.
    torch's own advice to set ``weights_only=False``, which would run code from the file, is never passed on.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO)):
        raise error(f"{path}: not a checkpoint (neither a torch zip file nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise error(f"{path}: not a checkpoint, or one holding objects other than tensors and plain containers "
                    "(refused by the safe loader)") from exc
    except Exception as exc:  # truncated zip, legacy tar format, ...: torch raises many types
        reason = short_reason(exc)
        if "weights_only" in reason or "weights only" in reason.lower():
            reason = "an old or foreign format the safe loader cannot read"
        raise error(f"{path}: not a readable checkpoint, damaged or truncated ({reason})") from exc


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The gist of an exception in one short line (torch's reader errors run to several sentences)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."
