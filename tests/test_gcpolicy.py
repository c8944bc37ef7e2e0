"""The collector's schedule for the long-running commands (indexer.gcpolicy)."""

from __future__ import annotations

import subprocess
import sys

from indexer.gcpolicy import YOUNG_THRESHOLD

_PROBE = """
import gc
from indexer import gcpolicy
before = gc.get_threshold()
gcpolicy.tune()
after = gc.get_threshold()
print(before[0] != after[0], after[0], before[1:] == after[1:], gc.get_freeze_count() > 0)
"""


def test_tune_freezes_start_up_and_widens_the_young_generation() -> None:
    # In a process of its own: freezing and the thresholds are process-wide.
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["True", str(YOUNG_THRESHOLD), "True", "True"]
