"""A bound on spooled checkpoints the sidecar has not acknowledged yet (it is down, or far behind).

Every announced checkpoint is hardlinked (or copied) into ``.wandb_sidecar_spool/`` so the runner's
``max_keep_ckpts`` cannot delete it before upload. With the sidecar down for days that keeps every
checkpoint of the run. ``SpoolBudget`` bounds them by count and by bytes, with this policy when full
("keep newest and aliased"): the newest checkpoint is kept, and so is, for every alias that moves from
version to version (``latest``, ``best``, …), the newest checkpoint carrying it; the oldest of the others
are given up first: the spooled file is deleted and the checkpoint's message is never sent (counter
``checkpoints_given_up``, one warning each). Aliases that name one checkpoint (``epoch_3``, ``iter_400``)
protect nothing. Once the sidecar acknowledges a checkpoint's message, the file is the sidecar's (it
deletes it after upload) and leaves the budget. If everything left is protected, the bound is exceeded
and counted (``spool_over_budget``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger("trainer_hook")

#: Aliases that name exactly one checkpoint: they do not make a checkpoint "still needed".
PER_CHECKPOINT_ALIAS = re.compile(r"^(epoch|iter|step)_\d+$")


@dataclass(slots=True)
class _Spooled:
    path: str
    nbytes: int
    aliases: tuple[str, ...]


class SpoolBudget:
    def __init__(self, max_count: int | None, max_bytes: int | None, counters: collections.Counter[str]) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.counters = counters
        self.entries: dict[int, _Spooled] = {}  # by the message's order, oldest first
        self.given_up: set[int] = set()  # orders of checkpoint messages that must not be sent
        #: running total of ``entries``' bytes (read by ``stats()`` on another thread: no iteration there)
        self.spooled_bytes = 0

    def add(self, order: int, path: str, aliases: list[str]) -> None:
        """Account a newly spooled checkpoint, then give up the oldest unprotected ones while over budget."""
        try:
            nbytes = os.stat(path).st_size
        except OSError:
            nbytes = 0
        self.entries[order] = _Spooled(path, nbytes, tuple(aliases))
        self.spooled_bytes += nbytes
        self.counters["checkpoints_spooled"] += 1
        self._forget_uploaded()
        while self._over():
            victim = self._oldest_unprotected()
            if victim is None:
                self.counters["spool_over_budget"] += 1
                log.warning("wandb sidecar client: %d spooled checkpoints (%.1f MB) over the spool bound, all "
                            "kept: the newest and those aliases still need", len(self.entries),
                            self.spooled_bytes / 1e6)
                return
            self._give_up(victim)

    def acknowledged(self, order: int) -> None:
        """The sidecar journaled this checkpoint's message: the file is its to upload and delete."""
        self._remove(order)

    def _remove(self, order: int) -> "_Spooled | None":
        entry = self.entries.pop(order, None)
        if entry is not None:
            self.spooled_bytes -= entry.nbytes
        return entry

    def _over(self) -> bool:
        return ((self.max_count is not None and len(self.entries) > self.max_count)
                or (self.max_bytes is not None and self.spooled_bytes > self.max_bytes))

    def _forget_uploaded(self) -> None:
        for order in [o for o, e in self.entries.items() if not os.path.exists(e.path)]:
            self._remove(order)

    def _protected(self) -> set[int]:
        keep: set[int] = set()
        newest_by_alias: dict[str, int] = {}
        for order, entry in self.entries.items():  # oldest first: later ones overwrite
            for alias in entry.aliases:
                if not PER_CHECKPOINT_ALIAS.match(alias):
                    newest_by_alias[alias] = order
        keep.update(newest_by_alias.values())
        if self.entries:
            keep.add(max(self.entries))
        return keep

    def _oldest_unprotected(self) -> int | None:
        protected = self._protected()
        return next((o for o in self.entries if o not in protected), None)

    def _give_up(self, order: int) -> None:
        entry = self._remove(order)
        assert entry is not None
        self.given_up.add(order)
        self.counters["checkpoints_given_up"] += 1
        try:
            os.unlink(entry.path)
        except OSError:
            pass
        log.warning("wandb sidecar client: spool bound reached (max %s checkpoints, %s bytes): gave up checkpoint "
                    "%s %s (policy: keep the newest and each moving alias's newest); it will not be uploaded",
                    self.max_count, self.max_bytes, entry.path, list(entry.aliases))
