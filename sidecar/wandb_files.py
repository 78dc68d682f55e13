"""What an offline wandb run already holds, read from wandb's own files with wandb's reader.

After a crash the sidecar cannot trust its own "delivered" mark for metrics: wandb may have written rows
the mark does not cover yet (duplicates on replay), or not yet written rows it does cover (loss). The
run's ``.wandb`` transaction logs are the truth; resumed offline runs get a new directory each time, and
each finished scan is cached in the journal directory so a directory is read once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("sidecar.wandb_files")


def wandb_root(init_dir: str | None) -> Path:
    """The directory wandb writes runs under (``<dir>/wandb``), as wandb picks it."""
    base = Path(init_dir or os.environ.get("WANDB_DIR") or os.getcwd())
    return base / ".wandb" if (base / ".wandb").is_dir() else base / "wandb"


def _wandb_cli() -> str:
    exe = Path(sys.executable).with_name("wandb")
    return str(exe) if exe.exists() else "wandb"


def _max_step(run_file: Path) -> int:
    out = subprocess.run([_wandb_cli(), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                         text=True, timeout=600)
    best = -1
    for line in out.stdout.splitlines():
        if '"type":"history"' in line:
            best = max(best, int(json.loads(line)["history"]["step"].get("num", 0)))
    return best


def persisted_max_step(root: Path, run_id: str, cache_file: Path, exclude: str = "") -> int:
    """Highest history step in the offline run directories of ``run_id`` but ``exclude`` (-1 when none).

    Call it for directories no process writes any more (``exclude`` the live one): their scans are cached."""
    try:
        cache: dict[str, int] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    best = -1
    for run_file in sorted(root.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        key = run_file.parent.name
        if key == exclude:
            continue
        if key not in cache:
            try:
                cache[key] = _max_step(run_file)
            except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
                log.warning("run %s: cannot read %s (%s); replayed metrics may repeat", run_id, run_file, exc)
                continue
        best = max(best, cache[key])
    try:
        cache_file.write_text(json.dumps(cache))
    except OSError:
        pass
    return best
