"""Where trainers find the sidecar by default: a socket only the user who started the sidecar can reach.

``ipc:///tmp/wandb-sidecar-<uid>/sidecar.sock`` lives in a directory the sidecar creates with mode 0700
(and refuses to use when another user owns it or it is open to others), so other local users, which on a
shared GPU server are strangers, can neither send to it nor read its status. The same user's trainers
compute the same path. ``WANDB_SIDECAR_SOCKET_DIR`` moves the directory (both sides must agree).
"""

from __future__ import annotations

import os

DEFAULT_SOCKET_DIR = os.environ.get("WANDB_SIDECAR_SOCKET_DIR") or f"/tmp/wandb-sidecar-{os.getuid()}"
DEFAULT_ADDR = f"ipc://{DEFAULT_SOCKET_DIR}/sidecar.sock"
