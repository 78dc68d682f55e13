"""Durable, append-only journal: the sidecar writes every accepted message here before acknowledging it.

Each run's log is a series of segment files ``<run_id>.<first index>.log`` (``<run_id>.log``, a journal
written before segments, counts as the first) of records ``<u32 length><u32 crc32><msgpack [index,
[frames...]]>``, fsynced in batches by the receiver. ``index`` is the run's journal index (one counter per
run across trainer incarnations, see :mod:`sidecar.run_table`). Beside them ``<run_id>.delivered`` holds
the highest index that reached wandb, so a restart replays only what wandb does not have yet.

Compaction drops the records up to an index (never past one): at a run's finish (``<run_id>.done`` then keeps
what is needed to acknowledge late duplicates and to resume) and during a run, up to what wandb already
holds, so an open run's journal stays small. Segments because that is cheap: a trim unlinks the segments
wandb holds whole, where one file per run had to be rewritten (figure 11 measured both, and SQLite: the
single file's trims cost up to 6.6× its writes, SQLite writes every row twice). A reader can also start at
the segment that holds an index, which is how a worker that fell behind reads its backlog from here.
A torn record at the tail (a crash mid-write) is cut off on replay.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import msgpack

log = logging.getLogger("sidecar.journal")

_RECORD = struct.Struct("<II")
_READ_CHUNK = 1 << 20
#: A run's current segment is closed, and the next batch starts a new one, once it holds this many bytes.
SEGMENT_BYTES = 1 << 20


class JournalError(OSError):
    """Writing or syncing the journal failed (disk full, read-only...). Nothing of the batch is acknowledged."""


_BIN32 = struct.Struct(">BI")


def _record(index: int, frames: Sequence[bytes]) -> list[bytes]:
    """The record's bytes as pieces to write one after the other. A large message (validation images) is
    not copied: its frames are pieces of their own, behind the msgpack headers ``packb`` would have made
    for them (bin 32: valid msgpack, read back the same)."""
    if sum(map(len, frames)) < 65536:
        payload = msgpack.packb([index, list(frames)])  # one C call; copying a few KiB costs nothing
        return [_RECORD.pack(len(payload), zlib.crc32(payload)), payload]
    pieces = [b"\x92" + msgpack.packb(index) + bytes([0x90 | len(frames)])]  # [index, [frames]]: <= 3 frames
    for frame in frames:
        pieces += (_BIN32.pack(0xC6, len(frame)), frame)
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return [_RECORD.pack(sum(map(len, pieces)), crc), *pieces]


class Journal:
    def __init__(self, root: str | os.PathLike[str], fsync: bool = True, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._files: dict[str, BinaryIO] = {}  # each run's current (last) segment, open for appending
        self._sizes: dict[str, int] = {}  # bytes of each run's segments, kept up to date by writes and trims
        self._lock = threading.Lock()  # the receiver writes; run workers trim and compact

    def _path(self, run_id: str, suffix: str) -> Path:
        return self.root / f"{run_id}.{suffix}"

    def segments(self, run_id: str) -> list[tuple[int, Path]]:
        """``(first index, path)`` of a run's segments, in order."""
        out = []
        for p in self.root.glob(f"{run_id}.*log"):  # run ids have no dots: only this run's files match
            first = p.name[len(run_id) + 1:-4]
            if first == "" or first.isdigit():
                out.append((int(first or 0), p))
        return sorted(out)

    def _file(self, run_id: str, first_index: int) -> BinaryIO:
        """The segment to append to: the current one, or a new one starting at ``first_index`` once the
        current one is full."""
        f = self._files.get(run_id)
        if f is not None and f.tell() < self.segment_bytes:
            return f
        if f is not None:
            f.close()
        else:
            segs = self.segments(run_id)
            if segs and segs[-1][1].stat().st_size < self.segment_bytes:
                f = self._files[run_id] = open(segs[-1][1], "ab")
                return f
        f = self._files[run_id] = open(self._path(run_id, f"{first_index:012d}.log"), "ab")
        if self.fsync:  # the new name must survive a crash as well as what is written into it
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return f

    # ------------------------------------------------------------------------------------ writing

    def write_batch(self, batch: Sequence[tuple[str, int, Sequence[bytes]]]) -> None:
        """Append and sync a batch of ``(run_id, index, frames)``. All or nothing: on failure every touched
        file is cut back to its size before the batch and :class:`JournalError` is raised."""
        records: dict[str, list[bytes]] = {}
        first: dict[str, int] = {}
        for run_id, index, frames in batch:
            parts = records.get(run_id)
            if parts is None:
                parts = records[run_id] = []
                first[run_id] = index
            parts.extend(_record(index, frames))
        with self._lock:
            touched: dict[str, tuple[str, int]] = {}  # run -> (its segment, that segment's size before)
            try:
                for run_id, parts in records.items():
                    f = self._file(run_id, first[run_id])
                    touched[run_id] = (f.name, f.tell())
                    f.writelines(parts)  # buffered: small records coalesce, large frames go straight to the file
                for run_id, (_, size) in touched.items():
                    f = self._files[run_id]
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                    if run_id in self._sizes:  # else counted from the files when asked
                        self._sizes[run_id] += f.tell() - size
            except OSError as exc:
                for run_id, (name, size) in touched.items():
                    self._rollback(run_id, name, size)
                raise JournalError(exc.errno, f"journal write failed in {self.root}: {exc.strerror or exc}") from exc

    def _rollback(self, run_id: str, name: str, size: int) -> None:
        f = self._files.pop(run_id, None)
        self._sizes.pop(run_id, None)  # counted again from the files
        try:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
            if size:
                os.truncate(name, size)
            else:
                os.unlink(name)  # a segment this batch began
        except OSError as exc:
            log.error("journal: cannot roll back %s to %d bytes: %s", name, size, exc)

    # ------------------------------------------------------------------------------------ reading

    def replay(self, run_id: str, after: int = 0, repair: bool = False) -> Iterator[tuple[int, list[bytes]]]:
        """``(index, frames)`` of every record of a run with an index above ``after``, in order, streamed from
        disk (a long run's journal is never held in memory). With ``repair`` (at startup, when nothing writes)
        a torn or corrupt tail is truncated away; otherwise reading stops there. Segments that hold only
        indices up to ``after`` are not read."""
        segs = self.segments(run_id)
        for i, (_, path) in enumerate(segs):
            if i + 1 < len(segs) and segs[i + 1][0] - 1 <= after:
                continue
            tail = [0, 0]
            try:
                for index, frames in _records(path, tail):
                    if index > after:
                        yield index, frames
            except FileNotFoundError:  # trimmed while we read: what it held is in wandb
                continue
            good, size = tail
            if good == size:
                continue
            if i + 1 < len(segs):  # not a crash mid-write (that is the last segment's tail): damage
                log.error("journal: %s is damaged after %d bytes; the rest of it is lost, later segments are read",
                          path, good)
            elif repair:
                log.warning("journal: %s has a torn tail (%d bytes); cut off", path, size - good)
                os.truncate(path, good)
                self._sizes.pop(run_id, None)

    def runs(self) -> list[str]:
        """Runs with a live log (not compacted away)."""
        return sorted({p.name.split(".", 1)[0] for p in self.root.glob("*.log")})

    def size(self, run_id: str) -> int:
        """Bytes of the run's log (all segments)."""
        size = self._sizes.get(run_id)
        if size is None:
            size = 0
            for _, path in self.segments(run_id):
                try:
                    size += path.stat().st_size
                except OSError:
                    pass
            self._sizes[run_id] = size
        return size

    def delivered(self, run_id: str) -> int:
        try:
            return int(self._path(run_id, "delivered").read_text())
        except (OSError, ValueError):
            return 0

    def mark_delivered(self, run_id: str, index: int) -> None:
        """Atomically record the highest journal index that reached wandb (no fsync: replay is idempotent)."""
        tmp = self._path(run_id, "delivered.tmp")
        tmp.write_text(str(index))
        os.replace(tmp, self._path(run_id, "delivered"))

    def save_start(self, run_id: str, frames: Sequence[bytes]) -> None:
        """Keep the run's latest run start apart from the log (compaction may drop its record), synced."""
        tmp = self._path(run_id, "start.tmp")
        with open(tmp, "wb") as f:
            f.write(msgpack.packb([bytes(x) for x in frames]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(run_id, "start"))

    def start(self, run_id: str) -> list[bytes] | None:
        try:
            return list(msgpack.unpackb(self._path(run_id, "start").read_bytes()))
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------------------------ compaction

    def trim(self, run_id: str, upto: int, keep_last: bool = True) -> int:
        """Drop the records with an index up to ``upto`` (they are in wandb); later ones stay, in order.
        Whole segments go; with ``keep_last`` the last segment always stays (at most ``segment_bytes``): its
        last record tells a restarted sidecar the run's incarnation, sequence number and index. Without it
        (a finished run) the one segment left that holds some of them is rewritten without. Returns the
        bytes freed."""
        with self._lock:
            segs = self.segments(run_id)
            freed = gone = 0
            for (_, path), (next_first, _) in zip(segs, segs[1:]):
                if next_first - 1 > upto:
                    break
                freed += path.stat().st_size
                path.unlink()
                gone += 1
            rest = segs[gone:]
            if rest and not keep_last and rest[0][0] <= upto:  # only the first one left can hold some
                freed += self._trim_segment(run_id, rest[0][1], upto)
            self._sizes.pop(run_id, None)
            return freed

    def _trim_segment(self, run_id: str, path: Path, upto: int) -> int:
        """Rewrite one segment without its records up to ``upto`` (removed when none is left)."""
        f = self._files.pop(run_id, None)
        if f is not None:
            f.close()
        before = path.stat().st_size
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as out:
            for index, frames in _records(path):
                if index > upto:
                    out.writelines(_record(index, frames))
            out.flush()
            os.fsync(out.fileno())
        if tmp.stat().st_size == 0:
            tmp.unlink()
            path.unlink()
            return before
        os.replace(tmp, path)
        return before - path.stat().st_size

    def compact(self, run_id: str, upto: int, done: dict[str, Any]) -> None:
        """The run finished and everything up to ``upto`` is in wandb: drop those records (a trainer that
        came back meanwhile keeps its newer ones) and keep a small ``done`` record."""
        tmp = self._path(run_id, "done.tmp")  # first: a crash between the two leaves a consistent pair
        tmp.write_bytes(msgpack.packb(done))
        os.replace(tmp, self._path(run_id, "done"))
        self.trim(run_id, upto, keep_last=False)
        if not self.segments(run_id):
            self._path(run_id, "delivered").unlink(missing_ok=True)

    def done_runs(self) -> dict[str, dict[str, Any]]:
        """``run_id -> done record`` for finished runs."""
        out = {}
        for p in self.root.glob("*.done"):
            try:
                out[p.stem] = msgpack.unpackb(p.read_bytes())
            except Exception as exc:  # a damaged marker only costs us duplicate detection for that run
                log.warning("journal: unreadable %s: %s", p, exc)
        return out

    def forget(self, run_id: str) -> None:
        """A finished run's retention is over: remove everything the journal keeps of it."""
        with self._lock:
            f = self._files.pop(run_id, None)
            if f is not None:
                f.close()
            self._sizes.pop(run_id, None)
            for p in self.root.glob(f"{run_id}.*"):
                if p.name.split(".", 1)[0] == run_id:
                    p.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def _records(path: Path, tail: list[int] | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """``(index, frames)`` per record until the end of the file or the first bad record; then, if given,
    ``tail`` is set to ``[bytes of good records, file size]``."""
    with open(path, "rb", buffering=_READ_CHUNK) as f:
        size = os.fstat(f.fileno()).st_size
        good = 0
        while True:
            head = f.read(_RECORD.size)
            if len(head) < _RECORD.size:
                break
            length, crc = _RECORD.unpack(head)
            payload = f.read(length)
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            good += _RECORD.size + length
            index, frames = msgpack.unpackb(payload)
            yield index, frames
    if tail is not None:
        tail[:] = [good, size]
