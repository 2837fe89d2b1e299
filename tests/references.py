"""Optional test references (oracles from the dev extra): skipped when missing, a failure in CI.

CI sets SAMDIFFSR_REQUIRE_REFERENCES=1 (see .ci/run), as SAMDIFFSR_REQUIRE_SLURM=1 does for Slurm, so that a
missing or wrong-version reference cannot silently turn its tests into skips there.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from types import ModuleType

import pytest

REQUIRE_ENV = "SAMDIFFSR_REQUIRE_REFERENCES"


def unavailable(reason: str) -> None:
    """Skip the calling test, or fail it when references are required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require(module: str, distribution: str, version_prefix: str = "") -> ModuleType:
    """Import a reference module (of distribution ``distribution`` whose version starts with ``version_prefix``)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        unavailable(f"the test reference {distribution} is not installed ({exc}); pip install -e '.[dev]'")
    version = metadata.version(distribution)
    if not version.startswith(version_prefix):
        unavailable(f"the test reference needs {distribution} {version_prefix}x, found {version}")
    return mod
