"""The cyclic garbage collector's schedule for the long-running commands (run, ingest, backfill).

CPython runs a young-generation collection every 700 container allocations by default. A replica
allocates tens of objects per event (entries, decoded records, rows, statement arguments) and
keeps nearly all of them until its batch commits, so those collections mostly walk live objects
and free nothing; and the objects built at start-up (modules, plugins, settings) are walked again
by every full collection. `tune` moves what start-up built out of the collector's sight
(`gc.freeze`) and collects the young generation every `YOUNG_THRESHOLD` allocations instead:
reference counting still frees everything that is not in a cycle at once, and the rare cycles
(exceptions caught with their tracebacks, for one) wait a little longer.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune() -> None:
    """Call once, when start-up is done and before the hot loop."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
