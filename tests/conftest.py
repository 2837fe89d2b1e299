"""Shared fixtures: `slurm_cluster` (a real local Slurm cluster, tests/slurm_cluster.py)."""

pytest_plugins = ["slurm_cluster"]
