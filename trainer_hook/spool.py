"""Protect checkpoint files from the runner's ``max_keep_ckpts`` cleanup until the sidecar uploaded them.

A hardlink in a spool directory beside the checkpoint keeps the inode alive whatever the runner deletes:
O(1) and no extra disk. Where links are impossible (another filesystem, no permission) a copy is made.
Runs on the client's I/O thread, never on the caller's.

The sidecar removes each spooled file once wandb has it. It often runs as another user (the image's
uid 1000 beside a root trainer container), and removing a directory entry needs write permission on the
directory, whoever owns the file. So the spool directory is group-writable (not sticky: the sticky bit would
keep the sidecar from removing files it does not own), and a sidecar in the trainer's group (compose:
``TRAINER_GID``) frees the links. Other users gain nothing: write access goes to the group only.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from protocol.limits import SPOOL_DIR_NAME

#: Added to the spool directory's mode (whatever the umask): the owner's group may remove spooled files.
SPOOL_GROUP_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IXGRP


def spool_dir_for(path: str | os.PathLike[str]) -> Path:
    """The spool directory beside ``path``, created group-writable (see the module docstring)."""
    spool_dir = Path(path).parent / SPOOL_DIR_NAME
    spool_dir.mkdir(exist_ok=True)
    st = spool_dir.stat()
    if st.st_uid == os.geteuid() and (st.st_mode & SPOOL_GROUP_BITS) != SPOOL_GROUP_BITS:
        spool_dir.chmod(stat.S_IMODE(st.st_mode) | SPOOL_GROUP_BITS)
    return spool_dir


def spool_checkpoint(path: str, run_id: str, order: int) -> str:
    """Hardlink (or copy) ``path`` into the spool; return the spooled path. Raises OSError if unreadable."""
    src = Path(path)
    dst = spool_dir_for(src) / f"{run_id}-{order}-{src.name}"
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        if not src.is_file():
            raise
        shutil.copy2(src, dst)
    return str(dst)
