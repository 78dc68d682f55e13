"""Who owns a spill directory, and finding the ones whose owner is gone (orphans) to deliver them later.

Each client spills into its own directory ``<spill_dir>/<run id>.<incarnation>/`` holding its segment
files, ``start.rec`` (the run start, one spill record: enough to resume the run) and ``owner.json``
(pid, host, address; for people). The owner holds an exclusive ``flock`` on ``lock`` for as long as it
lives; the kernel drops the lock when the process dies, however it dies. So a directory whose lock can
be taken is an orphan: its client exited with messages the sidecar never acknowledged. The next
``SidecarClient`` on the same machine (``owner.json``'s host: a home directory may be shared) takes it over (keeping the lock) and delivers it as a new incarnation of
the same run id (see ``SidecarClient`` and the README), the way an offline wandb run is synced later.
A directory is created under a temporary name and renamed once locked, so nobody adopts it half made.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

import msgpack

from protocol import Kind

from .packed import Packed
from .spill import SEGMENT_SUFFIX, record_bytes

LOCK_NAME = "lock"
START_NAME = "start.rec"
OWNER_NAME = "owner.json"


class SpillOwner:
    """An owned (locked) spill directory. ``release`` drops the lock; ``remove`` deletes the directory."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, spill_dir: Path, run_id: str, incarnation: str, start: Packed, addr: str) -> "SpillOwner":
        spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = spill_dir / f"{run_id}.{incarnation}"
        tmp = spill_dir / f".{run_id}.{incarnation}.tmp"
        tmp.mkdir(mode=0o700)
        fd = os.open(tmp / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner = cls(tmp, fd)
        owner.write_identity(run_id, incarnation, start, addr)
        os.rename(tmp, final)
        owner.directory = final
        return owner

    def write_identity(self, run_id: str, incarnation: str, start: Packed, addr: str) -> None:
        (self.directory / START_NAME).write_bytes(record_bytes(start))
        (self.directory / OWNER_NAME).write_text(json.dumps({
            "run_id": run_id, "incarnation": incarnation, "pid": os.getpid(), "host": socket.gethostname(),
            "addr": addr, "since": time.time()}))

    def read_start(self) -> Packed | None:
        """The run start its first owner stored (None if missing or unreadable)."""
        try:
            return _parse_record((self.directory / START_NAME).read_bytes())
        except OSError:
            return None

    def host(self) -> str | None:
        """The machine its first owner ran on (None if unreadable)."""
        try:
            return json.loads((self.directory / OWNER_NAME).read_text()).get("host")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.release()


def _parse_record(data: bytes) -> Packed | None:
    if len(data) < 4:
        return None
    n = int.from_bytes(data[:4], "little")
    try:
        kind, t, order, frames, *_ = msgpack.unpackb(data[4:4 + n])
        return Packed(Kind(kind), list(frames), t, sum(len(f) for f in frames), order)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def run_id_of(directory: Path) -> str:
    return directory.name.rsplit(".", 1)[0]


def claim_orphans(spill_dir: Path, limit: int, run_id: str) -> list[SpillOwner]:
    """Lock and return up to ``limit`` orphaned spill directories in ``spill_dir`` that still hold
    segments, those of ``run_id`` first (all of them); remove orphans with nothing left to send. Never
    raises (a spill dir we cannot read is not ours to fix)."""
    found: list[SpillOwner] = []
    try:
        candidates = [p for p in spill_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return found
    for directory in sorted(candidates, key=lambda d: (run_id_of(d) != run_id, d.name)):
        if len(found) >= limit and run_id_of(directory) != run_id:
            break
        try:
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its owner is alive
            continue
        owner = SpillOwner(directory, fd)
        if not directory.exists():  # removed by another adopter between listing and locking
            owner.release()
        elif owner.host() not in (None, socket.gethostname()):
            owner.release()  # another machine's (a shared home directory): its own next client delivers it
        elif any(directory.glob("*" + SEGMENT_SUFFIX)):
            found.append(owner)
        else:
            owner.remove()
    return found
