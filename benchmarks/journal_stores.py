"""Three ways to keep one open run's journal on disk, behind one small interface, for
``benchmarks/journal_store.py`` to compare under the same workload.

- ``file``: one file per run, trimmed by rewriting the live tail once the file passes its trim threshold
  (the journal before segments: :class:`sidecar.journal.Journal` with one unbounded segment, whose
  finishing trim rewrites it).
- ``sqlite``: stdlib ``sqlite3`` in WAL mode, ``synchronous=FULL`` (a commit is fsynced, as the journal's
  batch is), one transaction per batch; delivered rows are deleted, the WAL is checkpointed automatically
  and cut back to a size limit, freed pages go back to the OS by incremental vacuum.
- ``segments``: the product's journal as it is: records appended to the current segment file (fsync per
  batch), a new segment every ``segment_bytes``; a segment is deleted once every record in it is delivered.

Every store: ``write_batch`` (durable when it returns), ``trim(upto)`` (delivered up to ``upto``),
``replay(after)`` streaming ``(index, frames)`` in order, ``disk_bytes()`` (every file it has, ``-wal`` and
``-shm`` included), ``close()``. A store opened on a directory a crashed one left behind recovers from it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterator, Sequence

import msgpack

from sidecar.journal import Journal

RUN = "bench-run"
Batch = Sequence[tuple[int, Sequence[bytes]]]


def dir_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (a store's whole footprint)."""
    return sum(e.stat().st_size for e in os.scandir(root) if e.is_file())


class FileStore:
    """One file per run, rewritten without the delivered records once it passes ``trim_bytes``."""

    def __init__(self, root: Path, trim_bytes: int) -> None:
        self.root = root
        self.journal = Journal(root, fsync=True, segment_bytes=1 << 62)
        self.trim_bytes = trim_bytes

    def write_batch(self, batch: Batch) -> None:
        self.journal.write_batch([(RUN, index, frames) for index, frames in batch])

    def trim(self, upto: int) -> None:
        if upto > 0 and self.journal.size(RUN) >= self.trim_bytes:  # JournalTrimmer.maybe_trim's test
            self.journal.trim(RUN, upto, keep_last=False)

    def replay(self, after: int) -> Iterator[tuple[int, list[bytes]]]:
        return self.journal.replay(RUN, after, repair=True)

    def disk_bytes(self) -> int:
        return dir_bytes(self.root)

    def close(self) -> None:
        self.journal.close()


class SegmentStore(FileStore):
    """The product's journal: segments of ``segment_bytes``, the delivered ones unlinked."""

    def __init__(self, root: Path, segment_bytes: int) -> None:
        self.root = root
        self.journal = Journal(root, fsync=True, segment_bytes=segment_bytes)

    def trim(self, upto: int) -> None:
        if upto > 0:
            self.journal.trim(RUN, upto)


class SqliteStore:
    """One table ``(run_id, idx, frames)``; a batch is one ``synchronous=FULL`` transaction in WAL mode."""

    def __init__(self, root: Path, wal_limit_bytes: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(root / "journal.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table: freed pages can leave the file
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # WAL: the commit fsyncs the -wal file
        self.db.execute(f"PRAGMA journal_size_limit={wal_limit_bytes}")  # -wal cut back after a checkpoint
        self.db.execute("CREATE TABLE IF NOT EXISTS journal (run_id TEXT NOT NULL, idx INTEGER NOT NULL, "
                        "frames BLOB NOT NULL, PRIMARY KEY (run_id, idx))")
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.free_limit_pages = max(1, wal_limit_bytes // page)
        self.db.execute(f"PRAGMA wal_autocheckpoint={self.free_limit_pages}")  # checkpoint at the same size

    def write_batch(self, batch: Batch) -> None:
        rows = [(RUN, index, msgpack.packb(list(frames))) for index, frames in batch]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT INTO journal VALUES (?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def trim(self, upto: int) -> None:
        """Delete the delivered rows. Not fsynced on its own (replay is idempotent: the delivery mark decides);
        the next batch's synced commit makes it durable along with itself."""
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("DELETE FROM journal WHERE run_id = ? AND idx <= ?", (RUN, upto))
            if self.db.execute("PRAGMA freelist_count").fetchone()[0] > self.free_limit_pages:
                self.db.execute("PRAGMA incremental_vacuum").fetchall()
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def replay(self, after: int) -> Iterator[tuple[int, list[bytes]]]:
        cur = self.db.execute("SELECT idx, frames FROM journal WHERE run_id = ? AND idx > ? ORDER BY idx",
                              (RUN, after))
        for index, blob in cur:  # the cursor steps through the b-tree: streamed
            yield index, msgpack.unpackb(blob)

    def disk_bytes(self) -> int:
        return dir_bytes(self.root)

    def close(self) -> None:
        self.db.close()


Store = FileStore | SqliteStore | SegmentStore
KINDS = ("file", "sqlite", "segments")


def open_store(kind: str, root: Path, limit_bytes: int, segment_bytes: int) -> Store:
    """``limit_bytes``: the file journal's trim threshold and SQLite's ``-wal`` size limit."""
    if kind == "file":
        return FileStore(root, limit_bytes)
    if kind == "sqlite":
        return SqliteStore(root, limit_bytes)
    if kind == "segments":
        return SegmentStore(root, segment_bytes)
    raise ValueError(f"unknown store {kind!r}")
