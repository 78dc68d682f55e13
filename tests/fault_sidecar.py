"""The real sidecar with faults the real wandb cannot be made to show on demand: ``wandb.init``
raising its first ``FAULT_INIT_FAILURES`` calls (an unreachable wandb server, say), ``Run.log_artifact``
its first ``FAULT_ARTIFACT_FAILURES`` calls (a failed upload).

    python -m tests.fault_sidecar serve ...   (same arguments as ``wandb-sidecar``)
"""

from __future__ import annotations

import os

import wandb

from sidecar.cli import main

def _failing(real, env: str, what: str):  # type: ignore[no-untyped-def]
    left = [int(os.environ.get(env, "0"))]

    def call(*args, **kwargs):  # type: ignore[no-untyped-def]
        if left[0] > 0:
            left[0] -= 1
            raise wandb.errors.CommError(f"injected: {what}")
        return real(*args, **kwargs)

    return call


wandb.init = _failing(wandb.init, "FAULT_INIT_FAILURES", "wandb server unreachable")
if os.environ.get("FAULT_INIT_TYPEERROR"):  # arguments this wandb will never take (a permanent failure)

    def _init_type_error(*args, **kwargs):  # type: ignore[no-untyped-def]
        with open(os.environ["FAULT_INIT_CALLS_FILE"], "a") as f:
            f.write("init\n")
        raise TypeError("init() got an unexpected keyword argument (injected)")

    wandb.init = _init_type_error
wandb.Run.log_artifact = _failing(wandb.Run.log_artifact, "FAULT_ARTIFACT_FAILURES", "upload failed")

if __name__ == "__main__":
    main()
