"""What a two-epoch training resumed after its first epoch must leave in wandb, for both MMDetection hooks."""

from __future__ import annotations

from sidecar.readback import RunRecords


def assert_each_epochs_artifacts_once(run: RunRecords, run_id: str) -> None:
    """Each epoch's checkpoint (with its metadata) and prediction table once, the validation table once."""
    models = run.artifacts_named(f"run_{run_id}_model")
    assert [(sorted(m.aliases), list(m.files)) for m in models] == [
        (["epoch_1", "latest"], ["epoch_1.pth"]), (["epoch_2", "latest"], ["epoch_2.pth"])]
    assert [m.metadata["epoch"] for m in models] == [1, 2]
    preds = run.artifacts_named(f"run_{run_id}_pred")
    assert [sorted(p.aliases) for p in preds] == [["epoch_1", "latest"], ["epoch_2", "latest"]]
    assert len(run.artifacts_named("val")) == 1  # the validation table once, not again by the second trainer
