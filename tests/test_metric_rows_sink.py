"""How the sidecar applies a ``metric_rows`` message to a real (offline) wandb run: row by row, as each
row's own ``metrics`` message would be, also when it is applied again after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import Kind
from sidecar.paths import FileGuard
from sidecar.readback import read_runs
from sidecar.wandb_files import Persisted
from sidecar.wandb_sink import WandbSink
from tests.in_process_wandb import journaled, offline_init_kwargs


def test_rows_are_skipped_one_by_one_where_wandb_has_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_kwargs = offline_init_kwargs(tmp_path, monkeypatch, "p")
    sink = WandbSink("rowsink", FileGuard([tmp_path]), state_dir=tmp_path)
    sink.start(journaled(Kind.RUN_START, "rowsink", 1, {"init_kwargs": init_kwargs}))
    # after a restart: wandb's files hold steps up to 4, and this message's index is at or below the
    # delivered mark, so its row without a step (its last) reached wandb too
    sink.persisted = Persisted(max_step=4)
    rows = [{"data": {"x": float(s)}, "step": s} for s in range(10)]
    rows.append({"data": {"note": 1.0}, "step": None})
    sink.metric_rows(journaled(Kind.METRIC_ROWS, "rowsink", 2, {"rows": rows}), True)
    assert sink.all_counters()["replay_skipped"] == 6  # steps 0-4 and the row without a step
    # not delivered before: its row without a step is logged
    more = [{"data": {"x": float(s)}, "step": s} for s in range(10, 12)]
    more.append({"data": {"note": 2.0}, "step": None})
    sink.metric_rows(journaled(Kind.METRIC_ROWS, "rowsink", 3, {"rows": more}), False)
    assert sink.finish(0) == ""  # wandb's files hold every step logged
    history = read_runs(tmp_path)["rowsink"].history
    assert [row.get("x") for row in history] == [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, None]
    assert [row.get("note") for row in history if "note" in row] == [2.0]
