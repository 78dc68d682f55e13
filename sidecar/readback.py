"""Read offline wandb runs back with wandb's own reader (``wandb leet inspect --json``).

Every test that checks what reached wandb goes through here: no mock, the real run files.
A resumed run (same id, several ``offline-run-*`` directories) is merged in time order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Artifact:
    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, dict[str, Any]]  # path in the artifact -> manifest entry (size, local_path...)

    def table(self, name: str) -> dict[str, Any]:
        """A W&B Table stored in the artifact (``columns``, ``data``), read from wandb's staged file."""
        entry = self.files[f"{name}.table.json"]
        return json.loads(Path(entry["local_path"]).read_text())


@dataclass
class RunRecords:
    run_id: str
    dirs: list[Path] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    project: str = ""
    files: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int | None:
        return self.exit_codes[-1] if self.exit_codes else None

    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def artifacts_named(self, prefix: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.name.startswith(prefix)]


def _inspect_command(run_file: Path) -> list[str]:
    """``wandb leet inspect --json`` of one run file. ``wandb leet`` is a thin Python wrapper that starts
    wandb-core with these arguments; calling wandb-core directly spares a Python start and ``import wandb``
    (~1.5 s of CPU against ~20 ms), which matters when many runs finish at once. The wrapper is the fallback."""
    try:
        from wandb.util import get_core_path

        return [get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(run_file),
                str(run_file.parent.parent)]
    except Exception:  # wandb-core not found this way (another wandb version): the CLI finds it
        exe = Path(sys.executable).with_name("wandb")
        cli = str(exe) if exe.exists() else shutil.which("wandb") or "wandb"
        return [cli, "leet", "inspect", "--json", str(run_file)]


def inspect(run_file: Path, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Every record of a run's ``.wandb`` file, as wandb's own reader prints them (one JSON object a line),
    streamed: a run of a million rows is never held in memory (the sidecar scans old runs at a restart).
    Raises ``subprocess.SubprocessError`` (the command failed or timed out) or ``ValueError`` (bad JSON)."""
    cmd = _inspect_command(Path(run_file))
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryFile() as err, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "WANDB_SILENT": "true"}) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.strip():
                    yield json.loads(line)
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout or 0)
            code = proc.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
        if code:
            err.seek(0)
            raise subprocess.CalledProcessError(code, cmd, stderr=err.read().decode(errors="replace")[-2000:])


def _apply(run: RunRecords, rec: dict[str, Any]) -> None:
    kind = rec.get("type")
    body = rec.get(kind, {}) if kind else {}
    if kind == "run":
        run.project = body.get("project", run.project)
        for k, v in body.get("config", {}).get("update", {}).items():
            run.config[k] = v
    elif kind == "config":
        run.config.update(body.get("update", {}))
    elif kind == "history":
        run.history.append(body["item"])
    elif kind == "summary":
        run.summary.update(body.get("update", {}))
    elif kind == "artifact":
        files = {e["path"]: e for e in body.get("manifest", {}).get("contents", [])}
        run.artifacts.append(Artifact(body["name"], body["type"], list(body.get("aliases", [])),
                                      json.loads(body.get("metadata") or "{}"), files))
    elif kind == "exit":
        run.exit_codes.append(int(body.get("exit_code", 0)))
    elif kind == "files":
        run.files += [f["path"] for f in body.get("files", [])]


def read_runs(wandb_dir: str | os.PathLike[str]) -> dict[str, RunRecords]:
    """All offline runs under ``wandb_dir`` (the WANDB_DIR given to the sidecar), by run id."""
    root = Path(wandb_dir)
    root = root / "wandb" if (root / "wandb").is_dir() else root
    runs: dict[str, RunRecords] = {}
    # names start with the time, so sorted is in order. The run id is read from the run file's name, not the
    # directory's: a directory made in the same second as an earlier one of the run is named "...-<id>-1".
    for run_file in sorted(root.glob("offline-run-*/run-*.wandb"), key=lambda f: f.parent.name):
        run_id = run_file.stem.removeprefix("run-")
        run = runs.setdefault(run_id, RunRecords(run_id))
        run.dirs.append(run_file.parent)
        for rec in inspect(run_file):
            run.records.append(rec)
            _apply(run, rec)
    return runs


def _rows(artifact: Artifact, table: str) -> int | str:
    try:
        return len(artifact.table(table)["data"])
    except (OSError, KeyError, ValueError):
        return "?"  # the staged file is gone (uploaded and cleaned up)


def describe(run: RunRecords) -> str:
    """A few lines a person can read: what one run holds."""
    keys = sorted({k for row in run.history for k in row if not k.startswith("_")})
    steps = run.steps()
    lines = [f"run {run.run_id} (project {run.project or '-'}, exit code {run.exit_code}, {len(run.dirs)} run dir(s))",
             f"  history: {len(steps)} rows, steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}, "
             f"{len(keys)} keys: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}",
             f"  config: {len(run.config)} keys"]
    for a in run.artifacts:
        tables = [f[: -len(".table.json")] for f in a.files if f.endswith(".table.json")]
        what = ", ".join(f"table {t}: {_rows(a, t)} rows" for t in tables) or ", ".join(
            f for f in a.files if not f.startswith("media/"))
        meta = f", metadata: {len(a.metadata)} keys ({', '.join(sorted(a.metadata)[:4])} ...)" if a.metadata else ""
        lines.append(f"  artifact {a.name} ({a.type}) aliases {sorted(a.aliases)}: {what}{meta}")
    return "\n".join(lines)
