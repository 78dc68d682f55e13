"""What an offline wandb run already holds, read from wandb's own files with wandb's reader.

After a crash the sidecar cannot trust its own "delivered" mark: wandb writes asynchronously, so its
files may hold rows the mark does not cover yet (duplicates on replay) or miss rows the mark covers
(loss; seen here: a SIGKILL lost the last ~25 rows the SDK had accepted). The run's ``.wandb``
transaction logs are the truth. Resumed offline runs get a new directory each time; each scan of a
directory no process writes any more is cached in the journal directory, so it is read once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .readback import inspect

log = logging.getLogger("sidecar.wandb_files")


@dataclass
class Persisted:
    """Highest history step (-1: none) and the artifacts (name, aliases) already in wandb's files."""

    max_step: int = -1
    artifacts: list[tuple[str, list[str]]] = field(default_factory=list)

    def has_artifact(self, name: str, aliases: list[str]) -> bool | None:
        """True/False when the aliases identify a version (beyond 'latest'); None when they cannot."""
        key = set(aliases) - {"latest"}
        if not key:
            return None
        return any(n == name and key <= set(a) for n, a in self.artifacts)


def wandb_root(init_dir: str | None) -> Path:
    """The directory wandb writes runs under (``<dir>/wandb``), as wandb picks it."""
    base = Path(init_dir or os.environ.get("WANDB_DIR") or os.getcwd())
    return base / ".wandb" if (base / ".wandb").is_dir() else base / "wandb"


def _scan(run_file: Path) -> dict:
    max_step, artifacts = -1, []
    for rec in inspect(run_file, timeout=600):
        kind = rec.get("type")
        if kind == "history":
            max_step = max(max_step, int(rec["history"]["step"].get("num", 0)))
        elif kind == "artifact":
            art = rec["artifact"]
            artifacts.append([art["name"], list(art.get("aliases", []))])
    return {"max_step": max_step, "artifacts": artifacts}


def persisted(root: Path, run_id: str, cache_file: Path, exclude: str = "") -> Persisted:
    """What the offline run directories of ``run_id`` hold, all but ``exclude`` (the live one)."""
    try:
        cache: dict[str, dict] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    out = Persisted()
    # by the run file's name: a directory made in the same second as the run's previous one (a quick restart)
    # is named "offline-run-<time>-<id>-1"
    for run_file in sorted(root.glob(f"offline-run-*/run-{run_id}.wandb"), key=lambda f: f.parent.name):
        key = run_file.parent.name
        if key == exclude:
            continue
        if key not in cache:
            try:
                cache[key] = _scan(run_file)
            except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
                log.warning("run %s: cannot read %s (%s); replayed data may repeat", run_id, run_file, exc)
                continue
        out.max_step = max(out.max_step, cache[key]["max_step"])
        out.artifacts += [(n, a) for n, a in cache[key]["artifacts"]]
    try:
        cache_file.write_text(json.dumps(cache))
    except OSError:
        pass
    return out


def max_step_in(run_file: Path) -> int:
    """The highest history step in one ``.wandb`` file (-1: none, or unreadable yet)."""
    try:
        return int(_scan(run_file)["max_step"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return -1
