"""Ablations: arms that differ only in config overrides, trained and scored paired, and their statistics."""
