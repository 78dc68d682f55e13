"""The client against what a sidecar may answer (issue 16, trainer side): run_in_use, init_refused, an ack
for a sequence number never sent, an answer for another incarnation, and no answer at all. A small fake
peer (a real ROUTER socket) plays the sidecar where its support for a reply lands separately."""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import Header, Kind
from tests.fake_peer import FakePeer, ack_everything
from tests.sidecar_process import SidecarProcess, free_port
from trainer_hook import SidecarClient


def test_run_in_use_keeps_every_message_and_lands_once_the_other_trainer_ends(caplog) -> None:
    other_alive = threading.Event()
    other_alive.set()

    def reply(header: Header, peer: FakePeer) -> list:
        if header.kind is Kind.HEARTBEAT:
            return []
        if other_alive.is_set():
            return [(Kind.REJECT, 0, {"reason": "run_in_use", "detail": "incarnation 0123abcd is live",
                                      "rejected_seq": header.seq}, header.incarnation)]
        return ack_everything(header, peer)

    caplog.set_level(logging.WARNING, logger="trainer_hook")
    with FakePeer(reply) as peer:
        client = SidecarClient(peer.addr, run_id="shared", ack_timeout=0.2, spill_dir=None)
        for step in range(20):
            client.log({"x": step}, step=step)
        peer.wait_for(lambda p: client.stats().get("rejected_run_in_use", 0) >= 3)
        assert client.stats()["acked_seq"] == 0
        assert not client.flush(timeout=0.5)  # nothing accepted while the other trainer lives
        sequenced = {(h.kind, h.seq) for h in peer.headers() if h.kind is not Kind.HEARTBEAT}
        assert sequenced == {(Kind.RUN_START, 1)}, "only the run start is offered while the id is in use"
        other_alive.clear()  # the other trainer ended: the resends are accepted now
        assert client.finish(timeout=60), client.stats()
        stats = client.stats()
    assert stats["acked"] == 22  # run start + 20 metrics + finish, none dropped
    assert stats.get("undelivered", 0) == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "another live trainer" in r.getMessage()]
    assert len(errors) == 1, "run_in_use is logged once, loudly"
    assert "shared" in errors[0].getMessage()


def test_init_refused_stops_resending_and_finish_is_false_promptly(caplog) -> None:
    def reply(header: Header, peer: FakePeer) -> list:
        if header.kind is Kind.RUN_START:
            return [(Kind.REJECT, 0, {"reason": "init_refused", "detail": "settings.base_url may not be set by a peer",
                                      "rejected_seq": header.seq}, header.incarnation)]
        return []

    caplog.set_level(logging.WARNING, logger="trainer_hook")
    with FakePeer(reply) as peer:
        client = SidecarClient(peer.addr, run_id="refused", ack_timeout=0.2, spill_dir=None)
        for step in range(10):
            client.log({"x": step}, step=step)
        peer.wait_for(lambda p: client.stats().get("rejected_init_refused", 0) == 1)
        sent_at_refusal = client.stats()["sent"]
        for step in range(10, 20):
            client.log({"x": step}, step=step)
        started = time.monotonic()
        assert client.finish(timeout=60) is False
        took = time.monotonic() - started
        stats = client.stats()
    assert took < 30, "finish returns promptly once the run is refused for good, not at its timeout"
    assert stats["sent"] == sent_at_refusal, "nothing sent (nor resent) after the refusal"
    assert stats["undelivered"] == 22  # run start + 20 metrics + finish
    errors = [r for r in caplog.records if "refused run refused for good" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    assert "base_url" in errors[0].getMessage()
    assert any("22 message(s) not acknowledged" in r.getMessage() for r in caplog.records)


def test_ack_for_a_never_sent_seq_and_for_another_incarnation_are_reported(caplog) -> None:
    def reply(header: Header, peer: FakePeer) -> list:
        if header.kind is Kind.RUN_START:
            return [(Kind.ACK, 999, {"delivered": None}, header.incarnation),  # never sent
                    (Kind.ACK, 1, {"delivered": None}, "00000000deadbeef")]  # someone else's
        return []

    caplog.set_level(logging.WARNING, logger="trainer_hook")
    with FakePeer(reply) as peer:
        client = SidecarClient(peer.addr, run_id="bogusack", ack_timeout=0.3, spill_dir=None)
        peer.wait_for(lambda p: client.stats().get("protocol_error_ack_unsent", 0) >= 1
                      and client.stats().get("protocol_error_foreign_reply", 0) >= 1)
        stats = client.stats()
        assert stats["acked_seq"] == 0, "a bogus ack is not taken (nor clamped)"
        assert stats["unacked"] == 1
        client._stop.set()
    unsent = [r for r in caplog.records if "acknowledged seq 999" in r.getMessage()]
    assert len(unsent) == 1 and "protocol error" in unsent[0].getMessage()
    assert len([r for r in caplog.records if "00000000deadbeef" in r.getMessage()]) == 1


_TRAINER = """
import os, sys, time, json
from trainer_hook import SidecarClient
client = SidecarClient(sys.argv[1], run_id="lonely", ack_timeout=0.3)
step = 0
while not os.path.exists(sys.argv[2]):
    client.log({"x": step}, step=step)
    step += 1
    time.sleep(0.01)
ok = client.finish(timeout=60)
print(json.dumps({"ok": ok, "steps": step, **client.stats()}), flush=True)
"""


def test_no_sidecar_warns_once_then_says_when_one_answers(tmp_path: Path) -> None:
    """As a new user sees it: plain logging (no handler configured), the trainer's stderr."""
    sidecar = SidecarProcess(tmp_path)
    stop_file = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, sidecar.addr, str(stop_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=60)  # the trainer's first line on stderr
        assert "no answer from " + sidecar.addr in first, first
        assert f"wandb-sidecar serve --bind {sidecar.addr}" in first
        assert "MiB in memory" in first and "on disk in" in first
        sidecar.start()
        second = lines.get(timeout=60)
        assert "answers now" in second and sidecar.addr in second, second
        stop_file.touch()
        out = proc.communicate(timeout=120)[0]
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = "".join(lines.queue)
    result = json.loads(out)
    assert result["ok"] and result["acked"] == result["steps"] + 2
    assert "no answer" not in rest and "answers now" not in rest, "each line once"
    assert sidecar.stop() == 0


def test_finish_false_says_how_many_were_not_delivered_and_where(caplog, tmp_path: Path) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_hook")
    client = SidecarClient(f"tcp://127.0.0.1:{free_port()}", run_id="nobody", spill_dir=tmp_path / "spill")
    for step in range(50):
        client.log({"x": step}, step=step)
    assert client.finish(timeout=1) is False
    stats = client.stats()
    assert stats["undelivered"] == 52  # run start + 50 + finish
    line = next(r.getMessage() for r in caplog.records if "not fully delivered" in r.getMessage())
    kept = tmp_path / "spill" / f"nobody.{client.incarnation}"
    assert "52 message(s) not acknowledged" in line and str(kept) in line
    assert list(kept.glob("*.seg")), "kept on disk for the next client"


def test_wandb_mode_disabled_never_connects(tmp_path: Path) -> None:
    """A ROUTER whose monitor must see no connection at all from a trainer run with WANDB_MODE=disabled."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED)
    script = ("import sys, threading, time\nfrom trainer_hook import SidecarClient\n"
              "c = SidecarClient(sys.argv[1], init_kwargs={'project': 'p'})\n"
              "t = time.perf_counter()\nok = all(c.log({'x': i}, step=i) for i in range(1000))\n"
              "assert ok and c.finish(timeout=5) is True and c.stats() == {'disabled': 1}\n"
              "assert threading.active_count() == 1, threading.enumerate()\nprint('done')\n")
    try:
        out = subprocess.run([sys.executable, "-c", script, f"tcp://127.0.0.1:{port}"], capture_output=True, text=True,
                             env={**os.environ, "WANDB_MODE": "disabled"}, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
        # the trainer has exited: any connection it made is in the monitor's queue by now
        events = []
        while monitor.poll(0):
            events.append(recv_monitor_message(monitor))
        assert events == []
        assert router.poll(0) == 0, "the ROUTER received nothing"
    finally:
        router.disable_monitor()
        monitor.close(0)
        router.close(0)
        ctx.term()


def test_wandb_mode_disabled_in_init_kwargs_and_explicit_kwargs_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_TAGS", "a, b,,c")
    monkeypatch.setenv("WANDB_MODE", "offline")
    client = SidecarClient("tcp://127.0.0.1:1", init_kwargs={"project": "explicit", "mode": "disabled"})
    assert client.disabled and client.stats() == {"disabled": 1}
    assert client.init_kwargs["project"] == "explicit" and client.init_kwargs["tags"] == ["a", "b", "c"]
    assert client.log({"x": 1}) is True and client.flush() is True and client.finish() is True


def test_a_run_start_that_cannot_be_encoded_fails_the_run_loudly_not_the_thread(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="trainer_hook")
    with FakePeer() as peer:
        client = SidecarClient(peer.addr, run_id="badconfig", config={"model": object()}, spill_dir=None)
        client.log({"x": 1}, step=0)
        assert client.finish(timeout=30) is False
        assert peer.headers() == []
    assert any("cannot encode the run start" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert client.stats()["dropped_unencodable"] == 1
