"""Benchmark sweep: checkpoints x sets x metrics -> tables and plots. See --help."""

from samdiffsr.evaluation.benchmark_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
