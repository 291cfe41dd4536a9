"""Test package: importable as `tests` so distributed jobs can name their module-level functions."""
