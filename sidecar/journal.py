"""Durable, append-only journal: the sidecar writes every accepted message here before acknowledging it.

One file per run (``<run_id>.log``) of records ``<u32 length><u32 crc32><msgpack [index, [frames...]]>``,
fsynced in batches by the receiver. ``index`` is the run's journal index (one counter per run across
trainer incarnations, see :mod:`sidecar.run_table`). Beside it ``<run_id>.delivered`` holds the highest
index that reached wandb, so a restart replays only what wandb does not have yet.

Compaction drops the records up to an index (never past one): at a run's finish (``<run_id>.done`` then keeps
what is needed to acknowledge late duplicates and to resume) and during a run, up to what wandb already
holds, so an open run's journal stays small. A torn record at the tail (a crash mid-write) is cut off on
replay.
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
    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._files: dict[str, BinaryIO] = {}
        self._lock = threading.Lock()  # the receiver writes; run workers compact

    def _path(self, run_id: str, suffix: str) -> Path:
        return self.root / f"{run_id}.{suffix}"

    def _file(self, run_id: str) -> BinaryIO:
        f = self._files.get(run_id)
        if f is None:
            f = self._files[run_id] = open(self._path(run_id, "log"), "ab")
        return f

    # ------------------------------------------------------------------------------------ writing

    def write_batch(self, batch: Sequence[tuple[str, int, Sequence[bytes]]]) -> None:
        """Append and sync a batch of ``(run_id, index, frames)``. All or nothing: on failure every touched
        file is cut back to its size before the batch and :class:`JournalError` is raised."""
        records: dict[str, list[bytes]] = {}
        for run_id, index, frames in batch:
            records.setdefault(run_id, []).extend(_record(index, frames))
        with self._lock:
            touched: dict[str, int] = {}
            try:
                for run_id, parts in records.items():
                    f = self._file(run_id)
                    touched[run_id] = f.tell()
                    f.writelines(parts)  # buffered: small records coalesce, large frames go straight to the file
                for run_id in touched:
                    f = self._files[run_id]
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
            except OSError as exc:
                for run_id, size in touched.items():
                    self._rollback(run_id, size)
                raise JournalError(exc.errno, f"journal write failed in {self.root}: {exc.strerror or exc}") from exc

    def _rollback(self, run_id: str, size: int) -> None:
        f = self._files.pop(run_id, None)
        try:
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
            os.truncate(self._path(run_id, "log"), size)
        except OSError as exc:
            log.error("journal: cannot roll back %s to %d bytes: %s", run_id, size, exc)

    # ------------------------------------------------------------------------------------ reading

    def replay(self, run_id: str, after: int = 0, repair: bool = False) -> Iterator[tuple[int, list[bytes]]]:
        """``(index, frames)`` of every record of a run with an index above ``after``, in order, streamed from
        disk (a long run's journal is never held in memory). With ``repair`` (at startup, when nothing writes)
        a torn or corrupt tail is truncated away; otherwise reading stops there."""
        path = self._path(run_id, "log")
        tail = [0, 0]
        try:
            for index, frames in _records(path, tail):
                if index > after:
                    yield index, frames
        except FileNotFoundError:
            return
        good, size = tail
        if repair and good != size:
            log.warning("journal: %s has a torn tail (%d bytes); cut off", path, size - good)
            os.truncate(path, good)

    def runs(self) -> list[str]:
        """Runs with a live log (not compacted away)."""
        return sorted(p.stem for p in self.root.glob("*.log"))

    def size(self, run_id: str) -> int:
        try:
            return self._path(run_id, "log").stat().st_size
        except OSError:
            return 0

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
        """Drop every record with an index up to ``upto`` (they are in wandb); later ones stay, in order.
        With ``keep_last`` the last record always stays: it tells a restarted sidecar the run's incarnation,
        sequence number and index. Returns the bytes freed."""
        with self._lock:
            path = self._path(run_id, "log")
            if not path.exists():
                return 0
            before = path.stat().st_size
            f = self._files.pop(run_id, None)
            if f is not None:
                f.close()
            tmp = self._path(run_id, "log.tmp")
            with open(tmp, "wb") as out:
                last: tuple[int, list[bytes]] | None = None
                kept = False
                for index, frames in _records(path):
                    if index > upto:
                        out.writelines(_record(index, frames))
                        kept = True
                    last = (index, frames)
                if keep_last and not kept and last is not None:
                    out.writelines(_record(*last))
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
        if not self._path(run_id, "log").exists():
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
