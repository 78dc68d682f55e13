"""Compaction of an open run's journal, up to what wandb provably holds.

A week-long run must not keep every message it ever sent on the sidecar's disk. Records can go once wandb
has them: online, once ``run.log``/``log_artifact`` returned (wandb's own service owns them then); offline,
once wandb's transaction log on disk holds them. wandb writes asynchronously (a SIGKILL was seen to lose the
last ~25 rows the SDK had accepted), so offline a trim is two-phase: note a *candidate* (the delivery mark and
the step of the last row handed to wandb) every ``NOTE_EVERY`` messages, and trim up to the newest candidate
whose step a later read of the run's ``.wandb`` file shows (wandb persists records in the order it receives
them, so everything before that row is on disk too; it writes its file in 32 KiB blocks, so the newest rows
show only once more data follows them). Runs that log only without steps are not trimmed offline (nothing in wandb's files orders
them); their journal is compacted at finish as before.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("sidecar.journal")

#: An open run's journal is trimmed once it is larger than this.
TRIM_BYTES = 4 * 1024 * 1024
#: Seconds between two looks at the journal's size (and, offline, at wandb's files).
TRIM_EVERY = 5.0
#: Journal indexes between two candidates (the granularity of offline trimming).
NOTE_EVERY = 1000
_MAX_CANDIDATES = 512


@dataclass
class _Candidate:
    index: int
    step: int


class JournalTrimmer:
    """Owned by a run's worker; ``maybe_trim`` is called between messages."""

    def __init__(self, run_id: str, journal_bytes: Callable[[], int], trim: Callable[[int], int],
                 trim_bytes: int = TRIM_BYTES, every: float = TRIM_EVERY) -> None:
        self.run_id = run_id
        self.journal_bytes = journal_bytes
        self.trim = trim
        self.trim_bytes = trim_bytes
        self.every = every
        self.candidates: collections.deque[_Candidate] = collections.deque(maxlen=_MAX_CANDIDATES)
        self.next_look = time.monotonic() + every
        self.trimmed_bytes = 0

    def note(self, mark: int, last_step: int) -> None:
        """Every journal index up to ``mark`` was handed to wandb, the last row at ``last_step``."""
        if last_step >= 0 and (not self.candidates or mark - self.candidates[-1].index >= NOTE_EVERY):
            self.candidates.append(_Candidate(mark, last_step))

    def maybe_trim(self, mark: int, last_step: int, offline: bool,
                   persisted_step: Callable[[], int]) -> None:
        """``mark``: every journal index up to it was handed to wandb; ``last_step``: the step of the last
        row handed over (-1: none); ``persisted_step``: the highest step in wandb's files (offline)."""
        now = time.monotonic()
        if now < self.next_look:
            return
        self.next_look = now + self.every
        if mark <= 0 or self.journal_bytes() < self.trim_bytes:
            return
        if not offline:
            self._trim(mark)
            return
        self.note(mark, last_step)
        held = persisted_step() if self.candidates else -1
        upto = 0
        while self.candidates and self.candidates[0].step <= held:
            upto = self.candidates.popleft().index
        if upto:
            self._trim(upto)

    def _trim(self, upto: int) -> None:
        try:
            freed = self.trim(upto)
        except OSError as exc:
            log.warning("run %s: cannot trim the journal: %s", self.run_id, exc)
            return
        self.trimmed_bytes += freed
        log.info("run %s: journal trimmed up to index %d (%.1f MB freed: wandb holds it)", self.run_id, upto,
                 freed / 1e6)


def live_run_file(run_dir: str, run_id: str) -> Path:
    """wandb's transaction log of the open run (``.../offline-run-*-<id>/run-<id>.wandb``)."""
    return Path(run_dir).parent / f"run-{run_id}.wandb"
