"""Durable, append-only journal: the sidecar writes every accepted message here before acknowledging it.

One file per run (``<run_id>.log``) of records ``<u32 length><u32 crc32><msgpack [frames...]>``, fsynced
in batches by the receiver. Beside it ``<run_id>.delivered`` holds the last sequence number that reached
wandb, so a restart replays only what wandb does not have yet. A finished run's log is removed
(compaction) and ``<run_id>.done`` keeps what is needed to acknowledge late duplicates and to resume.
A torn record at the tail (a crash mid-write) is cut off on replay.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import msgpack

log = logging.getLogger("sidecar.journal")

_RECORD = struct.Struct("<II")


class JournalError(OSError):
    """Writing or syncing the journal failed (disk full, read-only...). Nothing of the batch is acknowledged."""


class Journal:
    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._files: dict[str, "object"] = {}
        self._lock = threading.Lock()  # the receiver writes, run workers compact

    def _path(self, run_id: str, suffix: str) -> Path:
        return self.root / f"{run_id}.{suffix}"

    def _file(self, run_id: str):  # type: ignore[no-untyped-def]
        f = self._files.get(run_id)
        if f is None:
            f = open(self._path(run_id, "log"), "ab")
            self._files[run_id] = f
        return f

    def write_batch(self, batch: Sequence[tuple[str, Sequence[bytes]]]) -> None:
        """Append and sync a batch of ``(run_id, frames)``. All or nothing: on failure every touched
        file is cut back to its size before the batch and :class:`JournalError` is raised."""
        with self._lock:
            self._write_batch(batch)

    def _write_batch(self, batch: Sequence[tuple[str, Sequence[bytes]]]) -> None:
        touched: dict[str, int] = {}
        records: dict[str, list[bytes]] = {}
        bin32 = struct.Struct(">BI")
        for run_id, frames in batch:
            parts = records.setdefault(run_id, [])
            frames = [bytes(fr) for fr in frames]  # no copy of bytes (what recv_multipart gives)
            if sum(map(len, frames)) < 65536:
                payload = msgpack.packb(frames)  # one C call; copying a few KiB costs nothing
                parts += (_RECORD.pack(len(payload), zlib.crc32(payload)), payload)
                continue
            # large (validation images): the same record bytes as packb would make (a fixarray of bin 32
            # values, which replay reads back the same), as pieces, so the frames are never copied
            pieces = [bytes([0x90 | len(frames)])]
            for fr in frames:
                pieces += (bin32.pack(0xC6, len(fr)), fr)
            crc = 0
            for piece in pieces:
                crc = zlib.crc32(piece, crc)
            parts += (_RECORD.pack(sum(map(len, pieces)), crc), *pieces)
        try:
            for run_id, parts in records.items():
                f = self._file(run_id)
                touched[run_id] = f.tell()
                f.writelines(parts)  # buffered: small parts coalesce, large frames go straight to the file
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

    def replay(self, run_id: str) -> Iterator[list[bytes]]:
        """Every record of a run, in order. A torn or corrupt tail is truncated away."""
        path = self._path(run_id, "log")
        if not path.exists():
            return
        good = 0
        with open(path, "rb") as f:
            data = f.read()
        while good + _RECORD.size <= len(data):
            length, crc = _RECORD.unpack_from(data, good)
            start = good + _RECORD.size
            payload = data[start : start + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            yield msgpack.unpackb(payload)
            good = start + length
        if good != len(data):
            log.warning("journal: %s has a torn tail (%d bytes); cut off", path, len(data) - good)
            os.truncate(path, good)

    def runs(self) -> list[str]:
        """Runs with a live log (not compacted)."""
        return sorted(p.stem for p in self.root.glob("*.log"))

    def delivered(self, run_id: str) -> int:
        try:
            return int(self._path(run_id, "delivered").read_text())
        except (OSError, ValueError):
            return 0

    def mark_delivered(self, run_id: str, seq: int) -> None:
        """Atomically record the last sequence number that reached wandb (no fsync: replay is idempotent)."""
        tmp = self._path(run_id, "delivered.tmp")
        tmp.write_text(str(seq))
        os.replace(tmp, self._path(run_id, "delivered"))

    def compact(self, run_id: str, last_seq: int, start_frames: Sequence[bytes] | None) -> None:
        """The run is finished and in wandb: drop its log, keep a small ``done`` record."""
        with self._lock:
            self._compact(run_id, last_seq, start_frames)

    def _compact(self, run_id: str, last_seq: int, start_frames: Sequence[bytes] | None) -> None:
        f = self._files.pop(run_id, None)
        if f is not None:
            f.close()
        done = msgpack.packb({"last_seq": last_seq, "start": [bytes(x) for x in start_frames or []]})
        tmp = self._path(run_id, "done.tmp")
        tmp.write_bytes(done)
        os.replace(tmp, self._path(run_id, "done"))
        for suffix in ("log", "delivered"):
            self._path(run_id, suffix).unlink(missing_ok=True)

    def done_runs(self) -> dict[str, dict]:
        """``run_id -> {"last_seq", "start"}`` for compacted runs."""
        out = {}
        for p in self.root.glob("*.done"):
            try:
                out[p.stem] = msgpack.unpackb(p.read_bytes())
            except Exception as exc:  # a damaged marker only costs us duplicate detection for that run
                log.warning("journal: unreadable %s: %s", p, exc)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
