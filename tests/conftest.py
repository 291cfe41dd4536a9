"""Session-wide pytest hooks shared by every test: test tiers, the full-width group, worker pools."""
from __future__ import annotations

import sys

import pytest

TIERS = ("unit", "distributed", "e2e")  # registered in pytest.ini


def _tiers(item) -> set:
    return {mark.name for mark in item.iter_markers()} & set(TIERS)


def pytest_collection_modifyitems(config, items):
    """Every test has exactly one tier (its module's `pytestmark`); the full-width group runs only
    when the -m expression names it, so `-m distributed` does not start its ~14 GB checks."""
    untiered = sorted({item.nodeid.split("::")[0] for item in items if len(_tiers(item)) != 1})
    if untiered:
        raise pytest.UsageError(f"{untiered[0]}: a test module needs exactly one tier marker: "
                                "pytestmark = pytest.mark.unit, .distributed or .e2e (pytest.ini)")
    if "full_width" in (config.getoption("markexpr") or ""):
        return
    full_width = [item for item in items if item.get_closest_marker("full_width") is not None]
    if full_width:
        config.hook.pytest_deselected(items=full_width)
        items[:] = [item for item in items if item.get_closest_marker("full_width") is None]


def pytest_sessionfinish(session, exitstatus):
    # Stop the distributed worker pools, if any test started one (imported lazily: cheap otherwise).
    harness = sys.modules.get("tests.distributed_harness")
    if harness is not None:
        harness.shutdown_pools()
