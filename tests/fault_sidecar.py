"""The real sidecar with one injected fault the real wandb cannot be made to show on demand:
``wandb.init`` raising its first ``FAULT_INIT_FAILURES`` calls (an unreachable wandb server, say).

    python -m tests.fault_sidecar serve ...   (same arguments as ``wandb-sidecar``)
"""

from __future__ import annotations

import os

import wandb

from sidecar.cli import main

_real_init = wandb.init
_left = int(os.environ.get("FAULT_INIT_FAILURES", "0"))


def _failing_init(*args, **kwargs):  # type: ignore[no-untyped-def]
    global _left
    if _left > 0:
        _left -= 1
        raise wandb.errors.CommError("injected: wandb server unreachable")
    return _real_init(*args, **kwargs)


wandb.init = _failing_init

if __name__ == "__main__":
    main()
