"""Shared by the bench scripts: describe the machine, and replace one section of bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (falls back to platform), with the core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``## name`` section of a results file, keeping the other sections.

    ``body`` is the section's text without its ``## name`` heading."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
