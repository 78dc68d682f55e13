"""Protect checkpoint files from the runner's ``max_keep_ckpts`` cleanup until the sidecar uploaded them.

A hardlink in a spool directory beside the checkpoint keeps the inode alive whatever the runner deletes:
O(1) and no extra disk. Where links are impossible (another filesystem, no permission) a copy is made.
Runs on the client's I/O thread, never on the caller's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from protocol.limits import SPOOL_DIR_NAME


def spool_checkpoint(path: str, run_id: str, seq_hint: int) -> str:
    """Hardlink (or copy) ``path`` into the spool; return the spooled path. Raises OSError if unreadable."""
    src = Path(path)
    spool_dir = src.parent / SPOOL_DIR_NAME
    spool_dir.mkdir(exist_ok=True)
    dst = spool_dir / f"{run_id}-{seq_hint}-{src.name}"
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        if not src.is_file():
            raise
        shutil.copy2(src, dst)
    return str(dst)
