"""wandb in a process that hosts many runs: what every ``wandb.init`` would redo is done once, ahead.

A node's sweep starts its trainers together, so the sidecar's first ``wandb.init`` calls come all at once,
on one GIL, while the trainers already log. Two of their costs are the same for every run (profiled with
16 runs starting, ``benchmarks/sweep.py``):

- the wandb service (``wandb-core``) is launched by the first ``wandb.init`` (~0.4 s here):
  :func:`prepare_wandb` starts it when the sidecar starts, with ``wandb.setup()``;
- the first ``wandb.init`` imports wandb's launch package (``Run._detect_and_apply_job_inputs``; ~0.14 s
  here, and the other inits wait on its import lock: half their time): imported ahead;
- every ``wandb.init`` lists the installed packages for the run's ``requirements.txt``
  (``wandb.util.working_set``: each distribution's METADATA parsed, ~33 ms here, holding the GIL; 82 % of
  the time the 16 inits took). The list is this process's, the same for every run: it is read once and
  again only when a directory on ``sys.path`` changed (a package installed or removed meanwhile).
  Each run's ``requirements.txt`` stays what wandb writes without the cache (tested).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterable

import wandb
import wandb.util

log = logging.getLogger("sidecar.wandb")

#: Modules the first ``wandb.init`` of a process imports (wandb 0.31), with what they import.
_IMPORTED_BY_INIT = ("wandb.sdk.launch.inputs.internal",)
_lock = threading.Lock()
_cache: tuple[tuple[tuple[str, int], ...], list[Any]] | None = None
_uncached: Callable[[], Iterable[Any]] | None = None


def _path_state() -> tuple[tuple[str, int], ...]:
    """The modification time of each directory on ``sys.path``: installing or removing a package changes it."""
    state = []
    for entry in sys.path:
        try:
            state.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            state.append((entry, -1))
    return tuple(state)


def cached_working_set() -> list[Any]:
    """``wandb.util.working_set()``, read once per state of ``sys.path``'s directories."""
    global _cache
    assert _uncached is not None
    state = _path_state()
    with _lock:  # 16 runs starting together read it once, not 16 times
        if _cache is None or _cache[0] != state:
            _cache = (state, list(_uncached()))
        return list(_cache[1])


def cache_package_list() -> bool:
    """Make ``wandb.util.working_set`` (called by every ``wandb.init``) the cached one; False when this
    wandb has no such function (then every init lists them itself, as before)."""
    global _uncached
    current = getattr(wandb.util, "working_set", None)
    if current is None:
        return False
    if current is not cached_working_set:
        _uncached = current
        wandb.util.working_set = cached_working_set
    return True


def _warm_up() -> None:
    try:
        if _uncached is not None:
            cached_working_set()
        wandb.setup()
        for module in _IMPORTED_BY_INIT:
            importlib.import_module(module)
    except Exception as exc:  # wandb raises anything; the sidecar serves regardless
        log.warning("could not start wandb's service ahead of the first run: %s: %s", type(exc).__name__, exc)


def prepare_wandb() -> threading.Thread:
    """Before the first run: cache the package list, and start the wandb service and read the list on a
    thread of its own (the receiver serves meanwhile; a ``wandb.init`` that comes first waits for them, as
    wandb's own locks and ours make it). A failure is logged; each ``wandb.init`` then does it itself."""
    if not cache_package_list():
        log.info("this wandb has no wandb.util.working_set: every run lists the installed packages itself")
    thread = threading.Thread(target=_warm_up, name="wandb-warm-up", daemon=True)
    thread.start()
    return thread
