"""For tests that drive the sidecar's wandb side (a sink, a run worker) in the test process itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from protocol import Kind, Message, decode, encode


def offline_init_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, project: str) -> dict[str, Any]:
    """``init_kwargs`` of an offline run under ``tmp_path``. Mode and dir are given to ``wandb.init``, not only
    by the environment: wandb keeps the settings of its first use in a process, whatever test that was."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return {"project": project, "mode": "offline", "dir": str(tmp_path)}


def journaled(kind: Kind, run_id: str, seq: int, body: dict[str, Any]) -> Message:
    """A message as a run's worker gets it from the receiver: decoded, at journal index ``seq``."""
    msg = decode(encode(kind, run_id, seq, time.time(), body, incarnation="0123abcd"))
    msg.index = seq
    return msg
