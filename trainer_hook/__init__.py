"""Trainer side of the wandb sidecar: cheap to import, never imports wandb.

``trainer_hook.mmdet`` (MMDetection 2.x hook) is imported separately, through mmcv's ``custom_imports``.
"""

from .client import SidecarClient, generate_run_id

__all__ = ["SidecarClient", "generate_run_id"]
