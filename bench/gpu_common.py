"""Shared by the scripts of bench/gpu.sh: the card's name and bf16 peak, the JSON hand-over between the
sections (one file per section in the work folder), and a GPU memory / utilisation poller."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
from results_file import cpu_name  # bench/results_file.py

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets. The first name that is
# part of torch.cuda.get_device_name() wins, so the PCIe / NVL variants come before plain "H100".
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 (get_device_name: "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"


def peak_bf16(name: str) -> float | None:
    """The dense bf16 peak of a card by its name; None for CPUs and cards not in :data:`PEAK_BF16`."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(work: str | Path | None, name: str, data: dict[str, Any]) -> None:
    """Hand a section's figures to the later sections and the summary: ``<work>/<name>.json``."""
    if work:
        Path(work).mkdir(parents=True, exist_ok=True)
        (Path(work) / f"{name}.json").write_text(json.dumps(data, indent=2))


def read_json(work: str | Path | None, name: str) -> dict[str, Any] | None:
    """An earlier section's figures, or None when it did not run (or failed before writing them)."""
    path = Path(work or ".") / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gpu_samples_per_s(work: str | Path | None) -> tuple[float, str] | None:
    """The fastest training-step variant's samples/s at the largest timed batch (section 1), with its label."""
    steps = read_json(work, "train_step")
    if not steps or not steps.get("batches"):
        return None
    batch = max(steps["batches"], key=int)
    rates = {v: r["samples_per_s"] for v, r in steps["batches"][batch]["variants"].items() if r.get("samples_per_s")}
    if not rates:
        return None
    best = max(rates, key=rates.get)
    return rates[best], f"{best}, batch {batch}"


class GpuPoller:
    """Samples ``nvidia-smi`` (memory used, utilisation) every ``interval`` seconds in a thread.

    Device-wide figures: they include every process's CUDA context, which is what decides how many
    processes fit on one card. Without nvidia-smi (CPU runs) it records nothing.
    """

    def __init__(self, index: int = 0, interval: float = 0.25) -> None:
        self.index, self.interval = index, interval
        self.memory_mib: list[float] = []
        self.util: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def query(self) -> tuple[float, float] | None:
        try:
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=memory.used,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            used, util = (float(x) for x in out.stdout.strip().split(","))
            return used, util
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self) -> GpuPoller:
        self.baseline = self.query()
        if self.baseline is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self.query()
            if got:
                self.memory_mib.append(got[0])
                self.util.append(got[1])
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak_over_baseline_gib(self) -> float | None:
        if not self.memory_mib or self.baseline is None:
            return None
        return (max(self.memory_mib) - self.baseline[0]) / 1024

    def mean_util(self) -> float | None:
        return sum(self.util) / len(self.util) if self.util else None


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f}"
