"""Missing optional test references: a skip locally, a failure under SAMDIFFSR_REQUIRE_REFERENCES=1 (CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from references import REQUIRE_ENV, require

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [("samdiffsr_no_such_reference", "samdiffsr-no-such-reference"),
                                  ("numpy", "numpy", "999.")])  # missing, and present in the wrong version
def test_missing_reference_skips_locally_and_fails_when_required(monkeypatch, args):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(*args)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        require(*args)


def test_present_reference_is_returned(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    assert require("numpy", "numpy").__name__ == "numpy"


def test_ci_requires_references_and_the_dev_extra_provides_them():
    ci = (REPO / ".ci" / "run").read_text()
    assert f"export {REQUIRE_ENV}=1" in ci
    assert ci.index(f"export {REQUIRE_ENV}=1") < ci.index("python -m pytest")
    # The dev extra asks for the 0.5.x releases that test_spe's reference needs (a range, not a pin).
    assert '"rotary-embedding-torch>=0.5.3,<0.6"' in (REPO / "setup.py").read_text()
