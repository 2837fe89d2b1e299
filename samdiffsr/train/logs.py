"""What a training run reports, on rank 0: TensorBoard, a progress bar, per-step losses, the resolved config.

Files in the run folder:
- ``config.yaml``: the resolved config of the (latest) start.
- ``train.log``: a text log of what the console shows, appended across starts: a header per start, the
  resolved config, resume decisions, every warning / error of samdiffsr's loggers, the losses of each log
  interval, validation, the end (or the error that ended the run). See :func:`train_log`.
- ``tb/``: TensorBoard events (train/*, data/*, val/* scalars; val images; the resolved config as text
  ``config``; the hparams plugin's summary of the flattened config, with ``train/loss`` and the validation
  scalars as its metrics).
- ``losses.jsonl``: one ``{"step", "loss", "skipped"}`` line per optimizer step (global mean loss over
  ranks and micro-batches), appended at log intervals. On resume, lines after the resumed step are
  dropped (they belong to the part of the run that is being redone), like TensorBoard's ``purge_step``.
- ``summary.json``: written when training ends.

Steps whose update was skipped (a NaN/Inf loss, or an fp16 overflow that backed the loss scale off) are also
named in a warning at the log interval that holds them.

Per-step values stay on the device until a log interval (no ``.item()`` per step).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from samdiffsr.cli import UserError
from samdiffsr.config import Config, save_config
from samdiffsr.io import atomic_write_text
from samdiffsr.progress import progress_bar

log = logging.getLogger(__name__)

TRAIN_LOG = "train.log"
PACKAGE_LOGGER = "samdiffsr"
VAL_METRICS = ("val/psnr_y", "val/ssim_y")


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _open_text_log(run_dir: Path) -> IO[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    return (run_dir / TRAIN_LOG).open("a", buffering=1)  # line-buffered: a killed job keeps its last line


@contextmanager
def train_log(run_dir: str | Path, enabled: bool) -> Iterator[None]:
    """Rank 0 (``enabled``): ``run_dir/train.log`` gets a header, every warning or error that samdiffsr's
    loggers emit while the block runs, and the exception that ends it (one line for a user error or
    Ctrl-C, the traceback for anything else), then an end line. The console keeps showing the warnings.
    """
    if not enabled:
        yield
        return
    f = _open_text_log(Path(run_dir))
    f.write(f"=== {_stamp()} start on {socket.gethostname()} (pid {os.getpid()}): {' '.join(sys.argv)}\n")
    handlers = [logging.StreamHandler(f)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    if not logging.getLogger().handlers:  # what Python's last-resort handler showed, now that one is set
        handlers.append(logging.StreamHandler(sys.stderr))
    package = logging.getLogger(PACKAGE_LOGGER)
    for h in handlers:
        h.setLevel(logging.WARNING)
        package.addHandler(h)
    try:
        yield
    except BaseException as exc:
        _best_effort(f.write, f"{_stamp()} {describe_exit(exc)}\n")
        raise
    finally:
        for h in handlers:
            package.removeHandler(h)
        _best_effort(f.write, f"=== {_stamp()} end\n")
        _best_effort(f.close)


def _best_effort(write: Any, *args: Any) -> None:
    """A text-log write that may fail (a full disk) without hiding the error that is ending the run."""
    try:
        write(*args)
    except OSError:
        pass


def describe_exit(exc: BaseException) -> str:
    """How an exception that ends training reads in train.log."""
    if isinstance(exc, UserError):
        return f"error: {' '.join(str(exc).split())}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return f"exit {exc.code}"
    return "error:\n" + "".join(traceback.format_exception(exc)).rstrip()


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """``section.key -> value`` for TensorBoard's hparams (lists, None and dicts as text)."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            name = f"{section}.{key}" if key else section
            out[name] = value if isinstance(value, bool | int | float | str) else json.dumps(value)
    return out


def write_config_summaries(writer: Any, cfg: Config, step: int) -> None:
    """The resolved config as TensorBoard text (``config``) and as the hparams plugin's summary."""
    from torch.utils.tensorboard.summary import hparams

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)  # markdown code
    metrics = {"train/loss": 0.0, **({m: 0.0 for m in VAL_METRICS} if cfg.train.val_every > 0 else {})}
    file_writer = writer._get_file_writer()  # the same run as the scalars, so the metrics link up
    for summary in hparams(flat_hparams(cfg), metrics):
        file_writer.add_summary(summary)


def step_ranges(steps: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``'3-5, 9'``."""
    parts: list[str] = []
    start = prev = None
    for s in [*steps, None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    return ", ".join(parts)


def truncate_losses(path: Path, last_step: int) -> None:
    """Keep only the lines of ``losses.jsonl`` up to ``last_step`` (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLog:
    """Reporting: every rank buffers its step values, only rank 0 (``enabled``) writes anything."""

    def __init__(self, cfg: Config, *, enabled: bool, start_step: int, max_steps: int,
                 global_batch: int) -> None:
        self.enabled = enabled
        self.run_dir = Path(cfg.train.run_dir)
        self.global_batch = global_batch
        self.losses_path = self.run_dir / "losses.jsonl"
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._skipped: list[torch.Tensor] = []
        self._data_wait = 0.0
        self._t0 = time.perf_counter()
        self._interval_start_step = start_step
        self.max_steps = max_steps
        self.writer = None
        self.bar = None
        self.text: IO[str] | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.text = _open_text_log(self.run_dir)
        save_config(cfg, self.run_dir / "config.yaml")
        config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self._text("resolved config (config.yaml):\n" + "".join(f"  {line}\n" for line in config_text.splitlines()))
        truncate_losses(self.losses_path, start_step)
        # purge_step drops events a killed run wrote after the checkpoint we (re)start from.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
        write_config_summaries(self.writer, cfg, start_step)
        self.bar = progress_bar(total=max_steps, initial=start_step, desc=cfg.train.task, unit="step",
                                dynamic_ncols=True)

    def _text(self, text: str) -> None:
        """A line (or block) in train.log, time-stamped."""
        if self.text is not None:
            self.text.write(f"{_stamp()} {text.rstrip()}\n")

    def step(self, step: int, loss: torch.Tensor, skipped: torch.Tensor, data_wait: float) -> None:
        """Buffer one step's (device) values; every rank buffers, so every rank knows the last loss."""
        self._data_wait += data_wait
        self._steps.append(step)
        self._losses.append(loss)
        self._skipped.append(skipped)
        if self.enabled:
            self.bar.update(1)

    def exclude(self, seconds: float) -> None:
        """Leave time spent on checkpoints and validation out of the throughput figures."""
        self._t0 += seconds

    def flush(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
        """Write the buffered steps and ``scalars`` (host values): the host sync of a log interval.

        Returns, on every rank, the last step's loss and the interval's samples/s and data-wait fraction
        (time spent waiting for the next batch over wall time).
        """
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        steps = step - self._interval_start_step
        out = {"loss": float("nan"), "samples_per_s": steps * self.global_batch / elapsed,
               "data_wait_fraction": self._data_wait / elapsed}
        self._t0, self._data_wait, self._interval_start_step = time.perf_counter(), 0.0, step
        if not self._steps:
            return out
        losses = torch.stack(self._losses).float().cpu().tolist()
        skipped = torch.stack(self._skipped).cpu().tolist()
        out["loss"] = losses[-1]
        bad = [s for s, skip in zip(self._steps, skipped, strict=True) if skip]
        if self.enabled and bad:
            log.warning("step(s) %s: update skipped (NaN/Inf loss or gradients)", step_ranges(bad))
        if self.enabled:
            with self.losses_path.open("a") as f:
                for s, loss, skip in zip(self._steps, losses, skipped, strict=True):
                    f.write(json.dumps({"step": s, "loss": loss, "skipped": bool(skip)}) + "\n")
                    self.writer.add_scalar("train/loss", loss, s)
            scalars = {**scalars, "train/samples_per_s": out["samples_per_s"],
                       "data/wait_fraction": out["data_wait_fraction"]}
            for name, value in scalars.items():
                self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
            self.writer.flush()
            self.bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scalars.get('lr', 0):.2e}",
                                 sps=f"{out['samples_per_s']:.1f}")
            self._text(f"step {step}/{self.max_steps}: loss {losses[-1]:.4f}, lr {scalars.get('lr', 0):.2e}, "
                       f"{out['samples_per_s']:.1f} samples/s, data wait {out['data_wait_fraction']:.0%}"
                       + (f", skipped steps {step_ranges(bad)}" if bad else ""))
        self._steps, self._losses, self._skipped = [], [], []
        return out

    def validation(self, step: int, metrics: dict[str, float], images: dict[str, torch.Tensor]) -> None:
        """Scalars ``val/<metric>`` and images ``val/<name>`` (uint8 3 x H x W)."""
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"val/{name}", value, step)
        for name, image in images.items():
            self.writer.add_image(f"val/{name}", image, step, dataformats="CHW")
        self.writer.flush()
        line = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.bar.write(line)
        self._text(f"validation {line}")

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)
            self._text(text)

    def close(self, summary: dict[str, Any] | None) -> None:
        """Write ``summary.json`` (when given: the run ended normally) and close the writer and bar."""
        if not self.enabled:
            return
        if summary is not None:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            how = "stopped (a checkpoint was saved; rerun to resume)" if summary.get("stopped") else "finished"
            self._text(f"{how} at step {summary.get('step')}, loss {summary.get('loss', float('nan')):.4f}")
        self.writer.close()
        self.bar.close()
        self.text.close()
        self.text = None
