"""How a run's messages become ``run.log`` calls: one per step, the newest step held open (no wandb)."""

from __future__ import annotations

from sidecar.step_rows import Row, StepRows


def test_messages_of_one_step_become_one_row_logged_when_a_later_step_arrives() -> None:
    rows = StepRows()
    assert rows.add({"loss": 1.0}, 10, True, index=2) == []
    assert rows.add({"lr": 0.1}, 10, True, index=3) == []
    assert rows.undelivered_from() == 2
    assert rows.add({"loss": 0.5}, 11, True, index=4) == [Row({"loss": 1.0, "lr": 0.1}, 10)]
    assert rows.undelivered_from() == 4 and rows.last_step_logged == 10
    assert rows.flush() == [Row({"loss": 0.5}, 11)]
    assert rows.undelivered_from() == 0 and rows.last_step_logged == 11
    assert rows.flush() == []


def test_validation_at_the_training_step_joins_its_row_and_a_late_step_is_flagged() -> None:
    rows = StepRows()
    rows.add({"train/loss": 1.0}, 12, True, index=1)
    rows.add({"val/bbox_mAP": 0.3}, 12, True, index=2)  # mmdet logs validation at the iteration it follows
    assert rows.add({"x": 1}, 5, True, index=3) == [Row({"x": 1}, 5, True, late=True)]
    assert rows.flush() == [Row({"train/loss": 1.0, "val/bbox_mAP": 0.3}, 12)]


def test_unstepped_and_uncommitted_messages_pass_through_after_the_open_row() -> None:
    rows = StepRows()
    rows.add({"a": 1}, 3, True, index=1)
    assert rows.add({"b": 2}, None, True, index=2) == [Row({"a": 1}, 3), Row({"b": 2}, None, True)]
    assert rows.add({"c": 3}, 4, False, index=3) == [Row({"c": 3}, 4, False)]
    assert rows.undelivered_from() == 0


def test_held_tells_what_a_message_of_the_same_step_would_join() -> None:
    rows = StepRows()
    rows.add({"img": "first"}, 7, True, index=1)
    assert rows.held("img", 7, True) == "first"
    assert rows.held("img", 8, True) is None and rows.held("img", 7, False) is None
    assert rows.held("img", None, True) is None and rows.held("other", 7, True) is None


def test_the_caller_dict_is_not_kept() -> None:
    rows = StepRows()
    data = {"a": 1}
    rows.add(data, 1, True, index=1)
    data["a"] = 99
    assert rows.flush() == [Row({"a": 1}, 1)]
