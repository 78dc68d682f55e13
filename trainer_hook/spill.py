"""The client's disk spill: a directory of append-only segment files, each deleted as soon as it is read.

Like Vector's disk buffer: records are appended to the newest segment, read from the oldest, and a segment
is unlinked the moment its last record has been read, so the disk holds what is still to send plus at most
one partly read segment. ``max_bytes`` is a hard limit on the bytes of all segment files together: a
record that does not fit is refused (the caller decides what to do with it), never written past it.

A record is ``<u32 length><msgpack [kind, time, order, frames]>`` (the body frames only: sequence numbers
and the header are assigned when a message is sent, so a spill can be sent later by another process as its
own incarnation). Only the client's I/O thread touches a ``SpillSegments``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

import msgpack

from protocol import Kind, ProtocolError, row_count

from .packed import Packed

_LEN = struct.Struct("<I")
SEGMENT_SUFFIX = ".seg"
#: Segment files are at most this fraction of the limit (and at least ``MIN_SEGMENT_BYTES``), so that
#: deleting read segments frees the disk in steps small compared with the limit.
SEGMENTS_PER_LIMIT = 8
MIN_SEGMENT_BYTES = 256 * 1024


def record_bytes(item: Packed) -> bytes:
    fields = [item.kind.value, item.time, item.order, item.frames]
    if item.origin is not None:
        fields += item.origin
    payload = msgpack.packb(fields)
    return _LEN.pack(len(payload)) + payload


def _segment_name(number: int) -> str:
    return f"{number:012d}{SEGMENT_SUFFIX}"


class SpillSegments:
    """Segments ``NNNNNNNNNNNN.seg`` in ``directory``, oldest first. Existing segments are taken over."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT_BYTES, max_bytes // SEGMENTS_PER_LIMIT)
        self.segments: list[int] = []  # numbers, oldest first
        self.sizes: dict[int, int] = {}
        #: bytes of every segment file on disk (a partly read one counts whole until deleted); kept as a
        #: running total so that another thread (``stats()``) can read it without iterating ``sizes``
        self.disk_bytes = 0
        self.read_pos = 0  # offset of the next record in segments[0]
        self.count = 0  # records not yet read
        self.calls = 0  # the caller's ``log()`` calls those records carry (``Packed.calls``)
        self.segments_deleted = 0
        self.torn_records = 0  # a record cut short (its writer died mid-write): the rest of that segment
        self._writer: BinaryIO | None = None
        self._writer_number = -1
        self._reader: BinaryIO | None = None
        self._reader_number = -1
        if directory.is_dir():
            self._take_over_existing()

    # -- state

    def fits(self, record_len: int) -> bool:
        return self.disk_bytes + record_len <= self.max_bytes

    def _set_size(self, number: int, size: int) -> None:
        self.disk_bytes += size - self.sizes.get(number, 0)
        self.sizes[number] = size

    # -- writing

    def append(self, record: bytes, over_limit: bool = False, calls: int = 1) -> None:
        """Append one record (from :func:`record_bytes`). Raises OSError; never exceeds ``max_bytes``
        unless ``over_limit`` (used only at exit, to keep what was in memory)."""
        if not over_limit and not self.fits(len(record)):
            raise OverflowError("spill full")
        if not self.segments or self.sizes[self.segments[-1]] >= self.segment_bytes:
            number = self.segments[-1] + 1 if self.segments else 1
            self.directory.mkdir(parents=True, exist_ok=True)
            self.segments.append(number)
            self.sizes[number] = 0
        number = self.segments[-1]
        if number != self._writer_number:
            self._open_writer(number)
        assert self._writer is not None
        size = self.sizes[number]
        try:
            written = self._writer.write(record)  # unbuffered: the reader (another handle) sees it at once
        except OSError:
            self._cut(number, size)
            raise
        if written != len(record):  # a short write (disk full): no half record stays behind
            self._cut(number, size)
            raise OSError(f"short write to the spill ({written} of {len(record)} bytes)")
        self._set_size(number, size + len(record))
        self.count += 1
        self.calls += calls

    def _cut(self, number: int, size: int) -> None:
        try:
            os.truncate(self.directory / _segment_name(number), size)
        except OSError:
            pass

    def _open_writer(self, number: int) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = open(self.directory / _segment_name(number), "ab", buffering=0)
        self._writer_number = number

    # -- reading

    def pop(self) -> Packed | None:
        """The oldest unread record, or None when a torn record ended the spill's readable data."""
        while self.segments:
            number = self.segments[0]
            if self.read_pos >= self.sizes[number]:
                self._delete_head()
                continue
            record = self._read_at(number, self.read_pos)
            if record is None:  # torn: its writer died mid-write; nothing after it in this segment
                self.torn_records += 1
                self.read_pos = self.sizes[number]
                continue
            item, length = record
            self.read_pos += length
            self.count -= 1
            self.calls -= item.calls
            if self.read_pos >= self.sizes[number]:
                self._delete_head()  # deleted once read
            return item
        self.count = self.calls = 0
        return None

    def peek_order(self) -> int | None:
        while self.segments:
            number = self.segments[0]
            if self.read_pos < self.sizes[number]:
                record = self._read_at(number, self.read_pos)
                if record is not None:
                    return record[0].order
                self.torn_records += 1
                self.read_pos = self.sizes[number]
            self._delete_head()
        return None

    def _read_at(self, number: int, pos: int) -> tuple[Packed, int] | None:
        if self._reader_number != number:
            if self._reader is not None:
                self._reader.close()
            self._reader = open(self.directory / _segment_name(number), "rb")
            self._reader_number = number
        assert self._reader is not None
        self._reader.seek(pos)
        head = self._reader.read(_LEN.size)
        if len(head) < _LEN.size:
            return None
        (n,) = _LEN.unpack(head)
        payload = self._reader.read(n)
        if len(payload) < n:
            return None
        try:
            kind, t, order, frames, *origin = msgpack.unpackb(payload)
            kind = Kind(kind)
            item = Packed(kind, list(frames), t, sum(len(f) for f in frames), order,
                          origin=(str(origin[0]), int(origin[1])) if origin else None,
                          calls=row_count(frames[0]) if kind is Kind.METRIC_ROWS else 1)
        except (ValueError, TypeError, msgpack.UnpackException, ProtocolError):
            return None
        return item, _LEN.size + n

    def _delete_head(self) -> None:
        number = self.segments.pop(0)
        self.disk_bytes -= self.sizes.pop(number)
        if self._reader_number == number and self._reader is not None:
            self._reader.close()
            self._reader, self._reader_number = None, -1
        if self._writer_number == number and self._writer is not None:
            self._writer.close()
            self._writer, self._writer_number = None, -1
        (self.directory / _segment_name(number)).unlink(missing_ok=True)
        self.segments_deleted += 1
        self.read_pos = 0

    # -- taking over, keeping at exit

    def _take_over_existing(self) -> None:
        """Adopt segments a dead client left: count their records (stopping at a torn one)."""
        numbers = sorted(int(p.name[: -len(SEGMENT_SUFFIX)]) for p in self.directory.glob("*" + SEGMENT_SUFFIX)
                         if p.name[: -len(SEGMENT_SUFFIX)].isdigit())
        for number in numbers:
            self.segments.append(number)
            path = self.directory / _segment_name(number)
            self._set_size(number, path.stat().st_size)
            pos = 0
            while pos < self.sizes[number]:
                record = self._read_at(number, pos)
                if record is None:  # torn by its writer's death: cut it off, so appends follow valid data
                    self.torn_records += 1
                    os.truncate(path, pos)
                    self._set_size(number, pos)
                    break
                pos += record[1]
                self.count += 1
                self.calls += record[0].calls

    def unread_kinds_and_orders(self) -> Iterator[tuple[Kind, int]]:
        """(kind, order) of the unread records, oldest first (used when taking over a dead client's spill)."""
        for i, number in enumerate(list(self.segments)):
            pos = self.read_pos if i == 0 else 0
            while pos < self.sizes.get(number, 0):
                record = self._read_at(number, pos)
                if record is None:
                    break
                yield record[0].kind, record[0].order
                pos += record[1]

    def rewrite_head(self, before: list[Packed]) -> None:
        """Write ``before`` (older than anything spilled) and the unread rest of the oldest segment into
        that segment's place, atomically (a new file renamed over it): used at exit to keep in-memory
        messages on disk, in order, ahead of the spill."""
        if not before:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.segments:
            number = self.segments[0]
            rest: list[Packed] = []
            pos = self.read_pos
            while pos < self.sizes[number]:
                record = self._read_at(number, pos)
                if record is None:
                    break
                rest.append(record[0])
                pos += record[1]
            self.count -= len(rest)
            self.calls -= sum(item.calls for item in rest)
        else:
            number, rest = 1, []
            self.segments.append(number)
            self.sizes[number] = 0
        tmp = self.directory / (_segment_name(number) + ".tmp")
        size = 0
        with open(tmp, "wb") as f:
            for item in [*before, *rest]:
                record = record_bytes(item)
                f.write(record)
                size += len(record)
            f.flush()
            os.fsync(f.fileno())
        for handle in (self._reader, self._writer):
            if handle is not None:
                handle.close()
        self._reader, self._reader_number, self._writer, self._writer_number = None, -1, None, -1
        os.replace(tmp, self.directory / _segment_name(number))
        self._set_size(number, size)
        self.read_pos = 0
        self.count += len(before) + len(rest)
        self.calls += sum(item.calls for item in [*before, *rest])

    def close(self, keep: bool) -> None:
        """Close the files; delete every segment unless ``keep``."""
        for handle in (self._reader, self._writer):
            if handle is not None:
                handle.close()
        self._reader, self._reader_number, self._writer, self._writer_number = None, -1, None, -1
        if not keep:
            for number in self.segments:
                (self.directory / _segment_name(number)).unlink(missing_ok=True)
            self.segments, self.sizes, self.count, self.read_pos, self.disk_bytes = [], {}, 0, 0, 0
            self.calls = 0
