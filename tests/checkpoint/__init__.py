"""Checkpoint layout, converter and resharding tests (importable: distributed jobs name functions here)."""
