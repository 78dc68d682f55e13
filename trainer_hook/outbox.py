"""The client's buffer of packed, not yet sent messages: memory first, disk segments behind it.

Order is kept: the oldest messages are in memory (``head``), newer ones in the spill segments once memory
is full, and memory is refilled from disk as messages leave. A never-dropped message that the full (or
unwritable) spill refuses waits in memory behind the spill (``tail``), and so does everything after it
until the spill has drained, so order still holds. Only the client's I/O thread touches it.

Policies when full (counted in the client's stats):
- memory full (``max_memory_bytes``, head and tail together, each message counted with Python's
  overhead) and a spill configured: new messages go to disk (``spilled``);
- spill full (``max_spill_bytes``, a hard limit on the segment files) or no spill: with a spill, the new
  message is dropped if droppable (drop newest, as Vector's ``when_full: drop_newest``); memory only, the
  oldest droppable message in memory is dropped, else the new one (``dropped_backlog_full``);
  checkpoints, validation data, run start and finish are never dropped (they may exceed the memory bound;
  they are few);
- the spill cannot be written (disk full, read-only): as if it were full (``spill_failed``).
"""

from __future__ import annotations

import collections
import logging

from protocol import NEVER_DROPPED

from .packed import Packed
from .spill import SpillSegments, record_bytes

log = logging.getLogger("trainer_hook")


class Outbox:
    def __init__(self, max_memory_bytes: int, spill: SpillSegments | None, counters: collections.Counter[str]) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.head: collections.deque[Packed] = collections.deque()
        self.tail: collections.deque[Packed] = collections.deque()
        self.memory_bytes = 0
        self.spill = spill
        self.counters = counters

    def __len__(self) -> int:
        return len(self.head) + len(self.tail) + (self.spill.count if self.spill else 0)

    def calls(self) -> int:
        """The caller's ``log()`` calls (and other messages) held, in memory and on disk."""
        return (sum(item.calls for item in self.head) + sum(item.calls for item in self.tail)
                + (self.spill.calls if self.spill else 0))

    @property
    def spill_bytes(self) -> int:
        """Bytes of the spill's segment files on disk."""
        return self.spill.disk_bytes if self.spill else 0

    # -- adding

    def put(self, item: Packed) -> None:
        if self.spill is None:
            self._put_memory_only(item)
        elif not self.tail and not self.spill.count and self.memory_bytes + item.cost <= self.max_memory_bytes:
            self._to_head(item)
        elif not self.tail and self._to_spill(item):
            return
        elif item.kind in NEVER_DROPPED or self.memory_bytes + item.cost <= self.max_memory_bytes:
            self.tail.append(item)  # behind the spill, in order
            self.memory_bytes += item.cost
        else:
            self.counters["dropped_backlog_full"] += item.calls

    def put_first(self, item: Packed) -> None:
        """Put ``item`` ahead of everything (a run start for a spill taken over from a dead client)."""
        self.head.appendleft(item)
        self.memory_bytes += item.cost

    def _put_memory_only(self, item: Packed) -> None:
        # make room first, so the bound holds at every moment
        while self.memory_bytes + item.cost > self.max_memory_bytes:
            if not self._drop_oldest():
                if item.kind not in NEVER_DROPPED:
                    self.counters["dropped_backlog_full"] += item.calls
                    return
                break  # never dropped: may exceed the bound (such messages are few)
        self._to_head(item)

    def _to_spill(self, item: Packed) -> bool:
        """True if written to disk; False if the spill refused it (full or unwritable)."""
        assert self.spill is not None
        record = record_bytes(item)
        if not self.spill.fits(len(record)):
            self.counters["spill_full"] += 1
            return False
        try:
            self.spill.append(record, calls=item.calls)
        except OSError as exc:
            self.counters["spill_failed"] += 1
            log.warning("wandb sidecar client: cannot write the spill in %s (%s)", self.spill.directory, exc)
            return False
        self.counters["spilled"] += 1
        return True

    def _to_head(self, item: Packed) -> None:
        self.head.append(item)
        self.memory_bytes += item.cost

    def _drop_oldest(self) -> bool:
        for i, old in enumerate(self.head):
            if old.kind not in NEVER_DROPPED:
                del self.head[i]
                self.memory_bytes -= old.cost
                self.counters["dropped_backlog_full"] += old.calls
                return True
        return False

    # -- taking

    def pop(self) -> Packed | None:
        if not self.head and self.spill is not None and self.spill.count:
            self._refill()
        if self.head:
            item = self.head.popleft()
        elif self.tail and not (self.spill and self.spill.count):
            item = self.tail.popleft()
        else:
            return None
        self.memory_bytes -= item.cost
        return item

    def _refill(self) -> None:
        assert self.spill is not None
        try:
            # at least one, even when never-dropped messages behind the spill fill memory
            while self.spill.count and (not self.head or self.memory_bytes < self.max_memory_bytes // 2):
                item = self.spill.pop()
                if item is None:
                    break
                self._to_head(item)
        except OSError as exc:
            self.counters["spill_failed"] += 1
            log.error("wandb sidecar client: spill in %s unreadable (%s); its %d messages are lost",
                      self.spill.directory, exc, self.spill.count)
            self.spill.close(keep=False)
            self.spill = None

    def oldest_order(self) -> int | None:
        if self.head:
            return self.head[0].order
        if self.spill is not None and self.spill.count:
            order = self.spill.peek_order()
            if order is not None:
                return order
        return self.tail[0].order if self.tail else None

    # -- ending

    def keep_on_disk(self, unacked: list[Packed]) -> int:
        """At exit: write ``unacked`` (sent, not acknowledged; body frames only), memory and tail into the
        spill, in order, past its limit if need be (what was in memory is bounded by the memory bounds).
        Returns how many of the caller's calls are on disk (``Packed.calls``); 0 with no spill."""
        if self.spill is None:
            return 0
        before = [*unacked, *self.head]
        self.head.clear()
        self.spill.rewrite_head(before)
        while self.tail:
            item = self.tail.popleft()
            self.spill.append(record_bytes(item), over_limit=True, calls=item.calls)
        self.memory_bytes = 0
        return self.spill.calls

    def discard(self) -> int:
        """Throw everything away (the sidecar refused the run for good); returns how many calls."""
        n = self.calls()
        self.head.clear()
        self.tail.clear()
        self.memory_bytes = 0
        if self.spill is not None:
            self.spill.close(keep=False)
        return n

    def close(self, keep: bool = False) -> None:
        if self.spill is not None:
            self.spill.close(keep=keep)
