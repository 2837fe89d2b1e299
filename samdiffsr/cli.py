"""Command-line conventions shared by every launcher: exit codes, user errors, one-line messages.

A *user error* is something the person running the command can fix (a bad option, config key or value, a
missing or unreadable input file, a file that is not a checkpoint): it is printed as one line,
``PROG: error: message``, once per job, and exits with :data:`EXIT_USAGE`. Before a process group exists
every rank sees the same error and rank 0 prints it; in a group of several ranks the first rank to report an
error prints it (`samdiffsr.distributed.claim_error_report`), whichever rank that is, and a rank that then
fails because that rank is gone exits with the same status, silently (`PeerFailure`, `peer_error_code`).
Anything else is a bug and keeps its traceback. Library exceptions opt in by subclassing :class:`UserError`;
an expected failure with a clear message (a demo stage, training stopped by too many NaN/Inf losses) sets
``exit_code = EXIT_FAILED``.

Exit codes (the README's table):

====  =====================================================================================
0     done
1     done, bad inputs skipped (make_shards; infer: some images failed)
2     user error: bad option, config key or value, missing or invalid input file
3     not finished: stopped for a requeue (SIGUSR2), ``--stop-after``, merge with parts missing
4     failed (a worker error, a demo stage, too many NaN/Inf losses in a row): rerun to resume
5     no space left on device
130   interrupted (Ctrl-C): rerun to resume
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from typing import NoReturn

from samdiffsr.distributed import claim_error_report, peer_error_code

EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_USAGE = 2
EXIT_UNFINISHED = 3
EXIT_FAILED = 4
EXIT_NO_SPACE = 5
EXIT_INTERRUPTED = 130

EXIT_CODES = {EXIT_OK: "done", EXIT_SKIPPED: "done, bad inputs skipped", EXIT_USAGE: "user error",
              EXIT_UNFINISHED: "not finished", EXIT_FAILED: "failed (rerun to resume)",
              EXIT_NO_SPACE: "no space left on device", EXIT_INTERRUPTED: "interrupted (rerun to resume)"}


class UserError(Exception):
    """A problem the user can fix; the message alone (one line) is what they see, then ``exit_code``."""

    exit_code = EXIT_USAGE


class PeerFailure(UserError):
    """Another rank failed, and says why; this rank exits with that rank's status and prints nothing."""

    def __init__(self, rank: int, exit_code: int) -> None:
        super().__init__(f"rank {rank} failed")
        self.rank, self.exit_code = rank, exit_code


_REPORT_HERE = "_samdiffsr_report_here"


def report_on_this_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as this rank's alone (the ranks agreed on it): it is printed here, whatever the rank."""
    setattr(exc, _REPORT_HERE, True)
    return exc


def fail(prog: str, message: str, code: int = EXIT_USAGE, kind: str = "error", here: bool = False) -> int:
    """Print ``PROG: kind: message`` on one line (once per job: see the module) and return ``code``.

    ``here``: print on this rank, whatever its rank (the ranks agreed that it reports the error).
    """
    if here or claim_error_report(code):
        print(f"{prog}: {kind}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def describe_os_error(exc: OSError) -> str:
    """``No such file or directory: PATH`` rather than Python's ``[Errno 2] ...`` form."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    return f"{exc.strerror or 'cannot open'}: {exc.filename}"


def run_cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's ``main`` and turn user errors, a full disk and Ctrl-C into one line and an exit code."""
    try:
        return main() or EXIT_OK
    except PeerFailure as exc:
        return exc.exit_code
    except UserError as exc:
        return fail(prog, str(exc), exc.exit_code, here=getattr(exc, _REPORT_HERE, False))
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        return fail(prog, describe_os_error(exc))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        return fail(prog, f"no space left on device{where}", EXIT_NO_SPACE)
    except KeyboardInterrupt:
        return fail(prog, "rerun the same command to resume", EXIT_INTERRUPTED, kind="interrupted")
    except Exception:
        # A collective failing because another rank ended with an error it printed: that rank's status,
        # without this rank's traceback (which would only say that the peer is gone).
        code = peer_error_code()
        if code is None:
            raise
        return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``PROG: error: message (see --help)``, exit 2, rank 0 only."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")
        raise SystemExit(EXIT_USAGE)
