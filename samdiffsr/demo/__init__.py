"""The one-command demo on built-in photos: shards -> RRDB -> SAM-DiffSR -> benchmark, table and picture."""

from samdiffsr.demo.pipeline import DemoError, DemoSettings, main, run_demo

__all__ = ["DemoError", "DemoSettings", "main", "run_demo"]
