"""Checks for a machine with a GPU (run_checks.sh)."""
