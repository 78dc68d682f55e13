"""The client's buffer of packed, not yet sent messages: memory first, a disk spill file behind it.

Order is kept: the oldest messages are in memory, the newer ones in the spill file once memory is full,
and memory is refilled from the file as messages leave. Only the client's I/O thread touches it.

Policies when full (counted in the client's stats):
- memory full and a spill file configured: new messages go to disk (``spilled``);
- disk full too (``max_spill_bytes``), or no spill file: the oldest droppable message in memory is
  dropped (``dropped_backlog_full``), else the new one if it is droppable; checkpoints, validation data,
  run start and finish are never dropped (they may exceed the bound, they are few and small);
- the spill file cannot be written (disk full, read-only): as if it were full (``spill_failed``).
"""

from __future__ import annotations

import collections
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import msgpack

from protocol import NEVER_DROPPED, Kind

log = logging.getLogger("trainer_hook")
_LEN = struct.Struct("<I")
#: Python's own cost of one queued message beyond its payload bytes (the Packed object, its frame list,
#: bytes headers, the header frame added later): counted, so the memory bound is a bound on real memory.
ITEM_OVERHEAD = 320


@dataclass(slots=True)
class Packed:
    kind: Kind
    frames: list[bytes]  # body frames; the header is added when a sequence number is assigned
    time: float
    nbytes: int
    lid: int  # local order, for flush markers
    seq: int = 0


def _cost(item: Packed) -> int:
    return item.nbytes + ITEM_OVERHEAD


class _SpillFile:
    """Append-only records ``<u32 len><msgpack [kind, time, lid, frames]>`` with a read position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None
        self.read_pos = 0
        self.write_pos = 0
        self.count = 0

    @property
    def nbytes(self) -> int:
        return self.write_pos - self.read_pos

    def append(self, item: Packed) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w+b")
        payload = msgpack.packb([item.kind.value, item.time, item.lid, item.frames])
        self.file.seek(self.write_pos)
        self.file.write(_LEN.pack(len(payload)) + payload)
        self.write_pos += _LEN.size + len(payload)
        self.count += 1

    def pop(self) -> Packed:
        assert self.file is not None and self.count
        self.file.seek(self.read_pos)
        (n,) = _LEN.unpack(self.file.read(_LEN.size))
        kind, t, lid, frames = msgpack.unpackb(self.file.read(n))
        self.read_pos += _LEN.size + n
        self.count -= 1
        if not self.count:  # drained: start the file over instead of growing it forever
            self.file.truncate(0)
            self.read_pos = self.write_pos = 0
        return Packed(Kind(kind), frames, t, sum(len(f) for f in frames), lid)

    def peek_lid(self) -> int:
        assert self.file is not None and self.count
        self.file.seek(self.read_pos)
        (n,) = _LEN.unpack(self.file.read(_LEN.size))
        return msgpack.unpackb(self.file.read(n))[2]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.path.unlink(missing_ok=True)


class Outbox:
    def __init__(self, max_memory_bytes: int, spill_path: Path | None, max_spill_bytes: int,
                 counters: collections.Counter[str]) -> None:
        self.max_memory_bytes = max_memory_bytes
        self.max_spill_bytes = max_spill_bytes
        self.memory: collections.deque[Packed] = collections.deque()
        self.memory_bytes = 0
        self.spill = _SpillFile(spill_path) if spill_path is not None else None
        self.counters = counters

    def __len__(self) -> int:
        return len(self.memory) + (self.spill.count if self.spill else 0)

    @property
    def spill_bytes(self) -> int:
        return self.spill.nbytes if self.spill else 0

    def put(self, item: Packed) -> None:
        spill = self.spill
        if spill is None:  # memory only: make room first, so the bound holds at every moment
            while self.memory_bytes + _cost(item) > self.max_memory_bytes:
                if not self._drop_oldest(keep=item):
                    if item.kind not in NEVER_DROPPED:
                        self.counters["dropped_backlog_full"] += 1
                        return
                    break  # never dropped: may exceed the bound (such messages are few and small)
            self._to_memory(item)
            return
        if not spill.count and self.memory_bytes + _cost(item) <= self.max_memory_bytes:
            self._to_memory(item)
            return
        if spill.nbytes + item.nbytes > self.max_spill_bytes and not self._make_room(item):
            return
        try:
            spill.append(item)
            self.counters["spilled"] += 1
        except OSError as exc:
            self.counters["spill_failed"] += 1
            log.warning("wandb sidecar client: cannot write the spill file %s (%s)", spill.path, exc)
            if self._make_room(item):
                self._to_memory(item)  # kept in memory, order with the spill file aside

    def _to_memory(self, item: Packed) -> None:
        self.memory.append(item)
        self.memory_bytes += _cost(item)

    def _make_room(self, item: Packed) -> bool:
        """Drop the oldest droppable message in memory, else ``item`` if droppable. True: keep ``item``."""
        if self._drop_oldest(keep=item):
            return True
        if item.kind not in NEVER_DROPPED:
            self.counters["dropped_backlog_full"] += 1
            return False
        return True

    def _drop_oldest(self, keep: Packed) -> bool:
        for i, old in enumerate(self.memory):
            if old is not keep and old.kind not in NEVER_DROPPED:
                del self.memory[i]
                self.memory_bytes -= _cost(old)
                self.counters["dropped_backlog_full"] += 1
                return True
        return False

    def pop(self) -> Packed | None:
        if not self.memory and self.spill is not None and self.spill.count:
            self._refill()
        if not self.memory:
            return None
        item = self.memory.popleft()
        self.memory_bytes -= _cost(item)
        return item

    def _refill(self) -> None:
        assert self.spill is not None
        try:
            while self.spill.count and self.memory_bytes < self.max_memory_bytes // 2:
                self._to_memory(self.spill.pop())
        except (OSError, ValueError) as exc:
            self.counters["spill_failed"] += 1
            log.error("wandb sidecar client: spill file %s unreadable (%s); its %d messages are lost",
                      self.spill.path, exc, self.spill.count)
            self.spill.close()
            self.spill = None

    def oldest_lid(self) -> int | None:
        if self.memory:
            return self.memory[0].lid
        if self.spill is not None and self.spill.count:
            return self.spill.peek_lid()
        return None

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
