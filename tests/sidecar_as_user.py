"""Run a command as another user, for tests of what a process of another uid than the trainer's can do (the
image's uid 1000 beside a root trainer): real kernel permission checks, no fake.

``setpriv_argv`` keeps one capability, CAP_DAC_READ_SEARCH: the process may read any file (this machine's
Python lives under /root, mode 0700) but creates, writes, removes and chowns files strictly as its uid.

    SIDECAR_AS_UID=1000 SIDECAR_AS_GROUPS=0 python -m tests.sidecar_as_user serve ...   (as root)

runs the real ``wandb-sidecar`` so; ``SIDECAR_AS_GROUPS``: comma-separated supplementary group ids
(empty: none), as compose's ``group_add``.
"""

from __future__ import annotations

import os
import sys


def setpriv_argv(uid: int, groups: str = "") -> list[str]:
    """The ``setpriv`` prefix: uid and gid ``uid``, supplementary ``groups`` ('' for none)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", *(["--groups", groups] if groups else ["--clear-groups"]),
            "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search"]


if __name__ == "__main__":
    argv = setpriv_argv(int(os.environ["SIDECAR_AS_UID"]), os.environ.get("SIDECAR_AS_GROUPS", ""))
    os.execvp(argv[0], [*argv, sys.executable, "-m", "sidecar", *sys.argv[1:]])
