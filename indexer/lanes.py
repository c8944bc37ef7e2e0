"""A replica's entries routed to its workers by account, so its batches in flight share none.

Two batches in flight that touch one record, or one new account, serialize on it: the second
waits at the rev guard (or the actor insert) for the first to commit. Within a replica that need
not happen. Every entry goes to the lane of its account (a did's CRC-32 modulo the workers), and
each worker takes its batches from its own lane only, so the records, actor rows and account
states of one did are only ever written by one of the replica's batches at a time. Across
replicas batches may still meet; the rev guard orders them as before.

Entries read from the stream wait in their lane until their worker takes them, the live
stream's first. They are pending on this consumer from the moment they are read: held for a
worker, never ACKed before the commit, and redelivered (or claimed by another replica) if this
one stops first. When one lane is full and another empty (a backfill adds a repo's records one
after the other, all of one account), the idle worker helps with the full lane: its batches
and the owner's may then wait for each other, as they would without lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque
from collections.abc import AsyncIterator

import msgspec

from indexer.pipeline import Entry


class _Account(msgspec.Struct):
    did: str = ""


_account = msgspec.json.Decoder(_Account)


def lane_of(entry: Entry, lanes: int) -> int:
    """The lane of an entry's account; entries without a readable did go to lane 0 (the
    pipeline rejects them with the reason)."""
    if lanes == 1 or entry.raw is None:
        return 0
    try:
        did = _account.decode(entry.raw).did
    except (msgspec.DecodeError, RecursionError):
        return 0
    return zlib.crc32(did.encode()) % lanes


class Lanes:
    """Per-worker queues of entries read but not yet taken: one batch per lane at most, in all
    (a read of up to `batch_size` entries happens only when it fits, by one worker at a time;
    a worker whose lane is empty while another reads, or while the others' lanes are full,
    waits for them instead of reading)."""

    def __init__(self, lanes: int, batch_size: int, first: str = "") -> None:
        # Per lane, entries of the `first` stream (the live one), then the others'.
        self._queues: list[tuple[deque[Entry], deque[Entry]]] = [
            (deque(), deque()) for _ in range(lanes)
        ]
        self._first = first
        self._batch_size = batch_size
        self._limit = lanes * batch_size
        self._held = 0
        self._changed = asyncio.Event()
        self.reading = False  # a worker is reading the stream for all of them

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[None]:
        """One worker reads at a time, so the others wait for what it routes to them instead
        of blocking on the stream; the waiting workers are woken when it is done."""
        self.reading = True
        try:
            yield
        finally:
            self.reading = False
            self._wake()

    def __len__(self) -> int:
        """Entries held, in all lanes."""
        return self._held

    def waiting(self, lane: int) -> int:
        return sum(len(q) for q in self._queues[lane])

    def fullest(self) -> int:
        """The lane holding the most entries."""
        return max(range(len(self._queues)), key=self.waiting)

    def room(self) -> bool:
        """Whether another read of a batch fits."""
        return self._held + self._batch_size <= self._limit

    def put(self, entries: list[Entry]) -> None:
        """Route entries to their lanes and wake the workers waiting."""
        for entry in entries:
            first, rest = self._queues[lane_of(entry, len(self._queues))]
            (first if entry.stream == self._first else rest).append(entry)
        self._held += len(entries)
        self._wake()

    def take(self, lane: int, count: int) -> list[Entry]:
        """Up to `count` entries of a lane: the first stream's, then the others', oldest first
        (a live entry does not wait behind backfill entries read before it)."""
        taken: list[Entry] = []
        for queue in self._queues[lane]:
            taken += [queue.popleft() for _ in range(min(count - len(taken), len(queue)))]
        if taken:
            self._held -= len(taken)
            self._wake()
        return taken

    async def changed(self, timeout_s: float) -> None:
        """Return once entries were put or taken (or after `timeout_s`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
