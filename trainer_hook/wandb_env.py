"""The ``WANDB_*`` variables an in-process ``wandb.init`` reads from the trainer's environment.

Job scripts (Slurm, Kubernetes, sweeps) set them where the trainer runs, but ``wandb.init`` runs in the
sidecar, whose environment is another. So the client reads them and puts them into the run start's
``init_kwargs``; arguments the caller passes explicitly win. Everything else (``WANDB_API_KEY``,
``WANDB_BASE_URL``, ``WANDB_DIR`` …) stays the sidecar's business.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

#: variable -> ``wandb.init`` argument
FORWARDED = {
    "WANDB_PROJECT": "project",
    "WANDB_ENTITY": "entity",
    "WANDB_NAME": "name",
    "WANDB_NOTES": "notes",
    "WANDB_TAGS": "tags",
    "WANDB_RUN_GROUP": "group",
    "WANDB_JOB_TYPE": "job_type",
    "WANDB_RUN_ID": "id",
    "WANDB_RESUME": "resume",
    "WANDB_MODE": "mode",
}


def init_kwargs_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``wandb.init`` arguments named by the environment (empty values are ignored)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, arg in FORWARDED.items():
        value = env.get(var, "").strip()
        if not value:
            continue
        if arg == "tags":
            out[arg] = [t.strip() for t in value.split(",") if t.strip()]
        elif arg == "mode" and value == "dryrun":
            out[arg] = "offline"  # wandb's old name for offline
        else:
            out[arg] = value
    return out


def is_disabled(init_kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> bool:
    """True when wandb would be a no-op in-process: ``mode="disabled"`` or the legacy ``WANDB_DISABLED``."""
    env = os.environ if environ is None else environ
    return init_kwargs.get("mode") == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes")
