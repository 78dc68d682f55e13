"""One packed message as the client's buffers hold it: body frames ready to send, header added at send."""

from __future__ import annotations

from dataclasses import dataclass

from protocol import Kind

#: Python's own cost of one queued message beyond its payload bytes (the Packed object, its frame list,
#: bytes headers, the header frame added later): counted, so a byte bound is a bound on real memory.
ITEM_OVERHEAD = 320


@dataclass(slots=True)
class Packed:
    kind: Kind
    frames: list[bytes]  # body frames; the header is prepended when a sequence number is assigned
    time: float
    nbytes: int  # payload bytes of ``frames``
    order: int  # position in the order the caller queued messages (flush markers wait on it)
    seq: int = 0  # sequence number, once in the window
    #: (incarnation, seq) this message was sent under before, unacknowledged, by a client that exited
    origin: tuple[str, int] | None = None
    calls: int = 1  # the caller's ``log()`` calls it carries (a ``metric_rows`` message: its rows); drops count these

    @property
    def cost(self) -> int:
        """Memory this message holds, as the byte bounds count it."""
        return self.nbytes + ITEM_OVERHEAD
