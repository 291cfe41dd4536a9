"""Session-wide pytest hooks shared by every test."""
from __future__ import annotations

import sys


def pytest_sessionfinish(session, exitstatus):
    # Stop the distributed worker pools, if any test started one (imported lazily: cheap otherwise).
    harness = sys.modules.get("tests.distributed_harness")
    if harness is not None:
        harness.shutdown_pools()
