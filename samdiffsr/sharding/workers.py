"""Run :class:`~samdiffsr.sharding.samples.SampleMaker` over images in worker processes, results in input order.

Each worker process builds its own masker once (a SAM model per process), then takes ``(index, skip)``
tasks from a queue. The parent keeps at most ``2 * workers + 1`` images in flight and yields results in the
order the tasks were given, so the shards' content does not depend on which worker finishes first.
A worker that raises (anything but a reported bad input) or dies stops the run with :class:`WorkerError`.
``workers <= 1`` runs everything in the calling process.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import queue
import signal
import traceback
from collections import deque
from collections.abc import Iterable, Iterator

from samdiffsr.sharding.samples import ImageJob, ImageResult, SampleMaker


class WorkerError(RuntimeError):
    """A worker process failed on an image (the message names it) or died."""


def _worker_main(job: ImageJob, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it stops the workers)
    parent = os.getppid()
    maker = SampleMaker(job)
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed: do not linger as an orphan
                results.cancel_join_thread()  # nobody will read what is still buffered
                return
            continue
        if task is None:
            return
        index, skip = task
        try:
            results.put(("ok", maker.process(index, skip)))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                results.put(("fatal", index, traceback.format_exc()))
            else:  # raised as such in the parent: a full disk is not a worker failure
                results.put(("no_space", index, exc.filename))
            return
        except BaseException:  # report everything, including KeyboardInterrupt, then stop
            results.put(("fatal", index, traceback.format_exc()))
            return


def start_method(job: ImageJob) -> str:
    """``spawn`` when workers may touch CUDA (SAM), else ``fork`` where available (fast start)."""
    if job.masks.kind == "sam" or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


def ordered_results(job: ImageJob, tasks: Iterable[tuple[int, int]], workers: int) -> Iterator[ImageResult]:
    """Yield ``SampleMaker(job).process(index, skip)`` for each task, in task order."""
    if workers <= 1:
        maker = SampleMaker(job)
        for index, skip in tasks:
            yield maker.process(index, skip)
        return
    ctx = mp.get_context(start_method(job))
    task_q, result_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(job, task_q, result_q), daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    finished = False
    try:
        todo = iter(tasks)
        order: deque[int] = deque()
        ready: dict[int, ImageResult] = {}

        def submit() -> None:
            task = next(todo, None)
            if task is not None:
                task_q.put(task)
                order.append(task[0])

        for _ in range(2 * workers + 1):
            submit()
        while order:
            want = order[0]
            while want not in ready:
                result = _receive(job, result_q, procs, order)
                ready[result.index] = result
            order.popleft()
            yield ready.pop(want)
            submit()
        finished = True
    finally:
        _stop(procs, task_q, result_q, finished)


def _receive(job: ImageJob, result_q, procs: list, in_flight: deque[int]) -> ImageResult:
    """The next result any worker sends; a worker that failed or died, or a full disk, raises instead."""
    while True:
        try:
            message = result_q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise WorkerError(
                    f"a sharding worker died (exit code {dead[0].exitcode}) while images "
                    f"{', '.join(job.files[i] for i in in_flight)} were in flight; rerun to resume"
                ) from None
            continue
        if message[0] == "no_space":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), message[2])
        if message[0] == "fatal":
            raise WorkerError(f"failed on image {job.files[message[1]]}:\n{message[2]}")
        return message[1]


def _stop(procs: list, task_q, result_q, finished: bool) -> None:
    """Let the workers finish (all results taken) or terminate them (stopped early), then close the queues."""
    if finished:
        for _ in procs:
            task_q.put(None)
        for proc in procs:
            proc.join()
    else:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join()
    task_q.close()
    result_q.close()
