"""The wandb sidecar: receives from trainers, journals, and does all wandb work."""
