"""The operator's view: ``status`` (table, ``--json``, ``--watch``), the Prometheus endpoint, JSON logs, and
static checks of the Dockerfile and docker-compose.yml (no Docker engine runs here)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
import zmq
from prometheus_client.parser import text_string_to_metric_families

from protocol import Kind, decode, encode
from sidecar import cli
from sidecar.auth import is_local
from tests.sidecar_process import SidecarProcess, free_port
from trainer_hook import SidecarClient

ROOT = Path(__file__).resolve().parent.parent
STEPS = 200


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _stream(sidecar: SidecarProcess, tmp_path: Path, run_id: str, steps: int = STEPS) -> SidecarClient:
    """A run with ``steps`` metrics and one checkpoint (seq 1 start, 2..steps+1 metrics, steps+2 checkpoint)."""
    client = SidecarClient(sidecar.addr, run_id=run_id, init_kwargs={"project": "ops"})
    for step in range(steps):
        assert client.log({"loss": 1.0 / (step + 1), "lr": 0.01}, step=step)
    ckpt = tmp_path / "work" / "epoch_1.pth"
    ckpt.parent.mkdir(exist_ok=True)
    ckpt.write_bytes(b"\x01" * 200_000)
    assert client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"], metadata={"epoch": 1})
    return client


def _bad_run(addr: str) -> None:
    """A raw trainer whose second message is invalid: one ``invalid_field`` rejection for run ``badrun``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(addr)
    sock.send_multipart(encode(Kind.RUN_START, "badrun", 1, time.time(), {"init_kwargs": {"project": "ops"}}, incarnation="0123abcd"))
    sock.send_multipart(encode(Kind.METRICS, "badrun", 2, time.time(), {"data": {"x": [1, 2]}}, incarnation="0123abcd"))  # not a scalar
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sock.poll(1000):  # until the sidecar answers the bad one
        if decode(sock.recv_multipart()).kind is Kind.REJECT:
            break
    else:
        raise AssertionError("the sidecar never rejected the bad message")
    sock.close(0)
    ctx.term()


def _table(text: str) -> dict[str, dict[str, str]]:
    """The run table of the plain view: {run: {column: cell}}."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("run "))
    cols = lines[head].split()
    rows = {}
    for line in lines[head + 1:]:
        if not line or line.startswith(" ") or ":" in line.split()[0]:
            break
        cells = line.split()
        rows[cells[0]] = dict(zip(cols, cells))
    return rows


# ------------------------------------------------------------------------------------------- status


def test_status_json_and_table_show_what_was_sent(sidecar: SidecarProcess, tmp_path: Path) -> None:
    client = _stream(sidecar, tmp_path, "opsrun")
    assert client.flush(timeout=30)
    sent = client.stats()["acked_seq"]  # messages: start, the metrics (batched as they waited), checkpoint
    st = sidecar.wait_for(lambda s: s["runs"].get("opsrun", {}).get("wandb", {}).get("checkpoints") == 1
                          and s["runs"]["opsrun"]["delivered_seq"] >= sent - 2)
    run = st["runs"]["opsrun"]
    assert run["journaled_seq"] == sent
    assert run["received"] == sent + run["duplicates"] + run["out_of_order"]  # resends are counted received
    assert run["state"] == "active" and run["worker"] == "running"
    # the newest step's row stays open in wandb until a later step or the finish: not counted delivered yet
    assert run["delivered_seq"] == sent - 2 and run["lag"] == 2
    assert run["project"] == "ops" and run["client"]["pid"] > 0

    assert client.finish(exit_code=0, timeout=60)
    _bad_run(sidecar.addr)
    st = sidecar.wait_for(lambda s: s["runs"]["opsrun"]["state"] == "finished"
                          and s["runs"].get("badrun", {}).get("rejected") == 1)

    out = _cli("status", "--connect", sidecar.addr, "--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    run = js["runs"]["opsrun"]
    assert run["journaled_seq"] == run["delivered_seq"] == sent + 1  # + the finish
    assert run["received"] == sent + 1 + run["duplicates"] + run["out_of_order"]
    assert run["lag"] == 0 and run["queue"] == 0 and run["rejected"] == 0
    assert run["wandb"]["log_calls"] == STEPS and run["wandb"]["checkpoints"] == 1
    assert run["state"] == "finished" and run["last_error"] == ""
    assert js["runs"]["badrun"]["rejected_by"] == {"invalid_field": 1}
    assert js["rejected"] == {"invalid_field": 1}
    assert js["counters"]["journaled"] == sent + 1 + 2  # opsrun, and badrun's start and its rejected message
    assert js["counters"]["journal_errors"] == 0 and js["counters"]["backpressure"] == 0
    assert js["pid"] == sidecar.proc.pid and js["serving"] is True and js["wandb_mode"] == "offline"
    assert js["uptime_s"] > 0 and js["bind"] == sidecar.bind and js["version"]

    out = _cli("status", "--connect", sidecar.addr)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    rows = _table(text)
    assert set(rows) == {"opsrun", "badrun"}
    assert rows["opsrun"] | {"seen": ""} == {
        "run": "opsrun", "state": "finished", "worker": "finished", "received": str(run["received"]),
        "journaled": str(sent + 1), "delivered": str(sent + 1), "lag": "0", "queue": "0",
        "dups": str(run["duplicates"]), "gaps": str(run["out_of_order"]), "backpr": "0", "rejected": "0", "seen": ""}
    assert rows["badrun"]["rejected"] == "1"
    assert f"pid {sidecar.proc.pid}" in text and "wandb offline" in text
    assert re.search(r"^  opsrun: project ops trainer \S+ pid \d+$", text, re.M)
    assert f"    wandb: checkpoints=1 log_calls={STEPS}" in text
    assert "    rejected: invalid_field=1" in text
    assert "runs: finished=1" in text or "runs: active=1 finished=1" in text
    assert re.search(r"^sidecar: .*journal_errors=0 .*journaled=%d " % (sent + 3), text, re.M)
    assert "\nrejected: invalid_field=1" in text


def test_status_exits_1_when_nothing_listens() -> None:
    addr = f"tcp://127.0.0.1:{free_port()}"
    for extra in ((), ("--json",)):
        out = _cli("status", "--connect", addr, "--timeout", "0.5", *extra)
        assert out.returncode == 1
        assert out.stdout == ""
        assert f"no sidecar answered at {addr}" in out.stderr
    out = _cli("status", "--connect", addr, "--timeout", "0.2", "--watch", "0.1", "--count", "2")
    assert out.returncode == 1
    assert out.stdout.count("no sidecar answered") == 2


def test_status_watch_refreshes(sidecar: SidecarProcess, tmp_path: Path) -> None:
    client = _stream(sidecar, tmp_path, "watched", steps=50)
    assert client.finish(exit_code=0, timeout=60)  # journaled: wandb may still be behind
    messages = client.stats()["acked_seq"]
    sidecar.wait_for(lambda s: s["runs"]["watched"]["state"] == "finished")
    out = _cli("status", "--connect", sidecar.addr, "--watch", "0.3", "--count", "3")
    assert out.returncode == 0, out.stderr
    frames = [f for f in re.split(r"^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  wandb-sidecar status)", out.stdout, flags=re.M)
              if f.strip()]
    assert len(frames) == 3
    for i, frame in enumerate(frames, 1):
        assert f"every 0.3 s ({i}/3)" in frame
        assert _table(frame)["watched"]["delivered"] == str(messages)
    assert "in/s" not in frames[0] and "in/s" in frames[1]  # rates from the second refresh on
    assert "\x1b[" not in out.stdout  # not a terminal: frames one after another, no screen control

    out = _cli("status", "--connect", sidecar.addr, "--watch", "0.2", "--count", "2", "--json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert [json.loads(line)["runs"]["watched"]["delivered_seq"] for line in lines] == [messages, messages]


def test_watch_redraws_in_place_on_a_terminal() -> None:
    from sidecar.status_view import watch_status

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    status = {"bind": "tcp://x:1", "pid": 1, "uptime_s": 1.0, "journal": "/j", "counters": {}, "rejected": {},
              "runs": {}}
    out = Tty()
    assert watch_status(lambda: status, "tcp://x:1", 0.01, count=2, out=out)
    assert out.text.count("\x1b[H\x1b[J") == 2 and out.text.count("no runs yet") == 2


# ------------------------------------------------------------------------------------------- metrics


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_matches_status(tmp_path: Path) -> None:
    mport = free_port()
    with SidecarProcess(tmp_path, "--metrics-port", str(mport)) as sidecar:
        assert "Prometheus metrics on http://127.0.0.1:%d/metrics" % mport in sidecar.log()
        # scrape while a trainer streams: status() is read from the HTTP thread
        scrapes, stop = [], threading.Event()

        def scraper() -> None:  # until the stream is done and at least two scrapes were read, however slow
            while not (stop.is_set() and len(scrapes) >= 2):
                scrapes.append(_scrape(mport))

        t = threading.Thread(target=scraper)
        t.start()
        client = _stream(sidecar, tmp_path, "metricsrun", steps=3000)
        assert client.finish(exit_code=0, timeout=60)
        stop.set()
        t.join(60)
        assert not t.is_alive()
        assert len(scrapes) >= 2 and all(s[("wandb_sidecar_up", ())] == 1 for s in scrapes)
        _bad_run(sidecar.addr)
        sidecar.wait_for(lambda s: s["runs"]["metricsrun"]["state"] == "finished"
                         and s["runs"].get("badrun", {}).get("rejected") == 1)

        m = _scrape(mport)
        st = sidecar.status()

    def run_value(name: str, run: str, **labels: str) -> float:
        return m[(name, tuple(sorted({"run": run, **labels}.items())))]

    r = st["runs"]["metricsrun"]
    sent = client.stats()["acked_seq"]  # messages: metrics travel batched
    assert r["journaled_seq"] == r["delivered_seq"] == sent
    assert r["received"] == sent + r["duplicates"] + r["out_of_order"]
    assert run_value("wandb_sidecar_messages_received_total", "metricsrun") == r["received"]
    assert run_value("wandb_sidecar_journaled_seq", "metricsrun") == r["journaled_seq"]
    assert run_value("wandb_sidecar_delivered_seq", "metricsrun") == r["delivered_seq"]
    assert run_value("wandb_sidecar_lag", "metricsrun") == r["lag"] == 0
    assert run_value("wandb_sidecar_queue_depth", "metricsrun") == r["queue"] == 0
    assert run_value("wandb_sidecar_duplicates_total", "metricsrun") == r["duplicates"]
    for event, n in r["wandb"].items():
        assert run_value("wandb_sidecar_wandb_events_total", "metricsrun", event=event) == n
    assert run_value("wandb_sidecar_wandb_events_total", "metricsrun", event="log_calls") == 3000
    assert run_value("wandb_sidecar_run_info", "metricsrun", state="finished", worker="finished", project="ops") == 1
    assert run_value("wandb_sidecar_run_rejected_total", "badrun", reason="invalid_field") == 1
    assert m[("wandb_sidecar_rejected_total", (("reason", "invalid_field"),))] == 1
    assert m[("wandb_sidecar_journaled_total", ())] == st["counters"]["journaled"] == sent + 2
    assert m[("wandb_sidecar_journal_errors_total", ())] == st["counters"]["journal_errors"] == 0
    # the status request after the scrape is itself a received message
    assert m[("wandb_sidecar_received_total", ())] < st["counters"]["received"]
    runs = {state: m[("wandb_sidecar_runs", (("state", state),))] for state in ("active", "finished", "lost", "paused")}
    assert runs["finished"] == 1 and runs["lost"] == runs["paused"] == 0
    assert runs["active"] + runs["finished"] == len(st["runs"]) == 2
    assert m[("wandb_sidecar_up", ())] == 1
    assert m[("wandb_sidecar_info", (("bind", sidecar.bind), ("version", st["version"]), ("wandb_mode", "offline")))] == 1
    assert ("process_resident_memory_bytes", ()) in m


def test_metrics_port_in_use_is_an_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sidecar = SidecarProcess(tmp_path, "--metrics-port", str(port)).start(wait=False)
        assert sidecar.proc.wait(60) == 2
        sidecar._log.close()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in sidecar.log()


# ------------------------------------------------------------------------------------------- logs


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    sidecar = SidecarProcess(tmp_path, "--log-format", "json")
    sidecar.env.pop("WANDB_SILENT", None)  # wandb's own terminal lines must not break the format either
    sidecar.start()
    try:
        client = _stream(sidecar, tmp_path, "jsonrun", steps=20)
        assert client.finish(exit_code=0, timeout=60)
        _bad_run(sidecar.addr)
        sidecar.wait_for(lambda s: s["runs"].get("badrun", {}).get("rejected") == 1)
    finally:
        assert sidecar.stop() == 0
    records = []
    for line in sidecar.log().splitlines():  # stdout and stderr together
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
        records.append(record)
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving on ") for m in messages)
    started = next(r for r in records if "wandb run started" in r["message"] and r.get("run") == "jsonrun")
    assert started["logger"] == "sidecar.wandb" and started["level"] == "INFO"
    ckpt = next(r for r in records if r["message"].startswith("run jsonrun: checkpoint"))
    assert ckpt["bytes"] == 200_000 and ckpt["seconds"] >= 0 and ckpt["artifact"] == "run_jsonrun_model"
    assert "MB/s" in ckpt["message"]
    rejected = next(r for r in records if r["level"] == "WARNING" and "rejected message" in r["message"])
    assert "badrun" in rejected["message"]
    assert any(m == "run jsonrun: finished with exit code 0" for m in messages)
    assert messages[-1] == "stopped: every run drained and finished"


def test_json_formatter_extras_and_exceptions() -> None:
    import io

    from sidecar.logs import setup_logging

    root = logging.getLogger()
    handlers, level, hooks = root.handlers[:], root.level, (sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    try:
        setup_logging("debug", "json", stream)
        logging.getLogger("sidecar.test").info("hello %s", "there", extra={"run": "r1", "bytes": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("sidecar.test").exception("failed")
        t = threading.Thread(target=lambda: 1 / 0, name="crasher")
        t.start()
        t.join()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks
        logging.captureWarnings(False)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "hello there" and first["run"] == "r1" and first["bytes"] == 3
    assert first["logger"] == "sidecar.test" and first["level"] == "INFO"
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    assert third["level"] == "CRITICAL" and "crasher" in third["message"] and "ZeroDivisionError" in third["exception"]


def test_large_checkpoint_logs_before_and_after(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from protocol import Message, decode
    from sidecar import wandb_sink
    from sidecar.wandb_sink import FileGuard, WandbSink

    class FakeRun:
        id = "bigrun"
        logged: list[Any] = []

        def log_artifact(self, artifact: Any, aliases: list[str]) -> None:
            self.logged.append((artifact.name, aliases))

    monkeypatch.setattr(wandb_sink, "LARGE_FILE_BYTES", 1000)
    ckpt = tmp_path / "big.pth"
    ckpt.write_bytes(b"\0" * 5000)
    sink = WandbSink("bigrun", FileGuard([tmp_path]))
    sink.run = FakeRun()
    msg: Message = decode(encode(Kind.CHECKPOINT, "bigrun", 2, time.time(), {"path": str(ckpt), "aliases": ["latest"]}, incarnation="0123abcd"))
    with caplog.at_level(logging.INFO, logger="sidecar.wandb"):
        sink.checkpoint(msg)
    lines = [r for r in caplog.records if r.name == "sidecar.wandb"]
    assert len(lines) == 2
    assert "going to wandb" in lines[0].getMessage() and lines[0].bytes == 5000
    assert "handed to wandb" in lines[1].getMessage() and lines[1].seconds >= 0
    assert FakeRun.logged == [("run_bigrun_model", ["latest"])]


# ------------------------------------------------------------------------------------------- docker


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form: {args}"
    return value


def _env_names_read() -> tuple[set[str], set[str]]:
    """(names the sidecar reads: its CLI's envvars, its own and wandb's variables; names the trainer side reads)."""
    import wandb.env

    cli_src = (ROOT / "sidecar" / "cli.py").read_text()
    sidecar_names = set(re.findall(r'envvar="(WANDB_\w+)"', cli_src))
    for path in (ROOT / "sidecar").glob("*.py"):
        sidecar_names |= set(re.findall(r'environ(?:\.get)?[\[(]"(WANDB_\w+)"', path.read_text()))
    sidecar_names |= {v for v in vars(wandb.env).values() if isinstance(v, str) and v.startswith("WANDB_")}
    trainer_names = set()
    for path in [*(ROOT / "trainer_hook").glob("*.py"), *(ROOT / "protocol").glob("*.py")]:
        trainer_names |= set(re.findall(r'"(WANDB_SIDECAR_\w+)"', path.read_text()))
    return sidecar_names, trainer_names


def _interpolate(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: env.get(m[1]) or m[2] or "", value)


def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _parse_cli(args: list[str]) -> click.Context:
    """Parse ``wandb-sidecar ...`` arguments with the real CLI (unknown options fail), without running it."""
    assert args[0] == "wandb-sidecar", args
    command = cli.main.commands[args[1]]
    return command.make_context(args[1], list(args[2:]))


def test_dockerfile() -> None:
    instructions = _dockerfile()
    names = [i for i, _ in instructions]
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", froms[0]), froms
    runs = " ".join(a for i, a in instructions if i == "RUN")
    installs = re.findall(r"pip install [^&;]*", runs)
    assert installs and all("'.[sidecar]'" in i or '".[sidecar]"' in i or ".[sidecar]" in i for i in installs)
    assert not re.search(r"\b(torch|torchvision|mmcv|mmcv-full|mmdet|mmengine)\b", runs)
    # every package pyproject installs is copied in (else `pip install .` fails in the build)
    copied = " ".join(a for i, a in instructions if i == "COPY")
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = json.loads(re.search(r"^packages = (\[.*\])$", pyproject, re.M)[1])
    for needed in [*packages, "pyproject.toml", "README.md"]:
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), needed
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0") and names.index("USER") < names.index("CMD")
    assert _exec_form(dict(instructions)["CMD"]) == ["wandb-sidecar", "serve"]
    health = dict(instructions)["HEALTHCHECK"]
    hc = _exec_form(health.split(" CMD ", 1)[1])
    assert hc[:2] == ["wandb-sidecar", "status"]
    _parse_cli(hc)
    assert "5555" in dict(instructions)["EXPOSE"].split()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in instructions if i == "ENV")))
    sidecar_names, _ = _env_names_read()
    assert {k for k in env if k.startswith("WANDB_")} <= sidecar_names
    # the bind serves 5555 on all interfaces (a container), the healthcheck asks on loopback
    assert env["WANDB_SIDECAR_BIND"] == "tcp://0.0.0.0:5555" and env["WANDB_SIDECAR_ADDR"] == "tcp://127.0.0.1:5555"
    assert (ROOT / ".env.example").is_file()


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    sidecar, trainer = compose["services"]["sidecar"], compose["services"]["trainer"]
    sidecar_names, trainer_names = _env_names_read()
    dockerfile_env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in _dockerfile() if i == "ENV")))

    assert sidecar["build"] in (".", {"context": "."}) or sidecar["build"].get("context") == "."
    assert sidecar["restart"] == "unless-stopped"
    assert "profiles" not in sidecar and trainer["profiles"]
    command = sidecar["command"]
    assert command[:2] == ["wandb-sidecar", "serve"]
    ctx = _parse_cli(command)
    env = _environment(sidecar)
    bind = env.get("WANDB_SIDECAR_BIND") or dockerfile_env["WANDB_SIDECAR_BIND"]
    assert bind.endswith(":5555")
    # a non-loopback bind needs keys or the explicit --insecure, or the sidecar refuses to start
    assert is_local(bind) or ctx.params["insecure"] or ctx.params["curve_secret_key"]
    assert any(str(p).endswith(":5555:5555") or str(p) == "5555:5555" for p in sidecar["ports"])

    # every environment key is one the sidecar reads (its CLI envvars, wandb's own variables)
    assert set(env) <= sidecar_names, set(env) - sidecar_names
    trainer_env = _environment(trainer)
    assert {k for k in trainer_env if k.startswith("WANDB_")} <= trainer_names
    # ...and so is every WANDB_* name mentioned anywhere in compose, .env.example and Dockerfile, comments too
    mentioned = set()
    for name in ("docker-compose.yml", ".env.example", "Dockerfile"):
        mentioned |= set(re.findall(r"\bWANDB_[A-Z0-9_]+\b", (ROOT / name).read_text()))
    assert mentioned <= sidecar_names | trainer_names, mentioned - sidecar_names - trainer_names
    assert {"WANDB_SIDECAR_BIND", "WANDB_SIDECAR_JOURNAL", "WANDB_SIDECAR_ALLOW_ROOTS", "WANDB_SIDECAR_ADDR"} <= sidecar_names

    # variables interpolated in the compose file have a default or come from .env.example
    example = _env_example()
    for var, default in re.findall(r"\$\{(\w+)(?::?-([^}]*))?\}", (ROOT / "docker-compose.yml").read_text()):
        assert default or var in example, var
    assert Path(example["WORK_DIRS"]).is_absolute()  # a mount target must be absolute
    assert {"WANDB_API_KEY", "WANDB_PROJECT"} <= set(example) | {
        m for m in re.findall(r"#\s*(WANDB_\w+)=", (ROOT / ".env.example").read_text())}
    env_files = sidecar["env_file"]
    assert any((f if isinstance(f, str) else f["path"]) == ".env" for f in env_files)

    for values in ({}, example):  # with the defaults, and with .env.example's values
        def targets(service: dict[str, Any]) -> dict[str, str]:
            out = {}
            for v in service["volumes"]:
                src, target = _interpolate(v, values).split(":")[:2]
                out[target] = src
            return out

        sc, tr = targets(sidecar), targets(trainer)
        # the journal and the wandb files are volumes at the image's paths
        assert sc[dockerfile_env["WANDB_SIDECAR_JOURNAL"]] == "journal"
        assert sc[dockerfile_env["WANDB_DIR"]] == "wandb"
        assert set(compose["volumes"]) >= {"journal", "wandb"}
        # the work dirs: same host directory at the same path in both, and that path is the allowed root
        allow = _interpolate(env["WANDB_SIDECAR_ALLOW_ROOTS"], values)
        assert allow in sc and allow in tr and sc[allow] == tr[allow] and Path(allow).is_absolute()
        # the trainer's work dir is under it
        work_dir = _interpolate(trainer["command"][trainer["command"].index("--work-dir") + 1], values)
        assert Path(work_dir).is_relative_to(allow)

    hc = sidecar["healthcheck"]
    assert hc["test"][0] in ("CMD", "CMD-SHELL")
    args = hc["test"][1:] if hc["test"][0] == "CMD" else hc["test"][1].split()
    assert args[:2] == ["wandb-sidecar", "status"]
    _parse_cli(args)
    assert sidecar.get("stop_signal", "SIGTERM") == "SIGTERM"

    assert trainer["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert 'sidecar_addr="tcp://sidecar:5555"' in (ROOT / "docker-compose.yml").read_text()
