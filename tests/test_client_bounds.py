"""Issue 14, trainer side: every client stage bounded in bytes, a hard spill limit in segments deleted once
read, one exit deadline for all clients, a spill left at exit delivered by a later process, heartbeats
during a long checkpoint copy, and a bound on spooled checkpoints. Real processes and real ZeroMQ."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol import Kind
from sidecar.readback import read_runs
from tests.fake_peer import FakePeer
from tests.sidecar_process import SidecarProcess, free_port
from trainer_hook import SidecarClient
from trainer_hook.outbox import Outbox
from trainer_hook.packed import Packed
from trainer_hook.spill import SpillSegments, record_bytes

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def _run(script: str, *args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _segment_bytes(directory: Path) -> int:
    """Bytes in spill segments: one whole walk (segments are deleted and directories renamed as we look;
    a walk that meets that is done again, so a sample is never a partial sum)."""
    while True:
        try:
            return sum(p.stat().st_size for p in directory.rglob("*.seg"))
        except FileNotFoundError:
            continue


# ----------------------------------------------------------------------------------------------- memory

RSS_SCRIPT = """
import json, os, sys, time
import numpy as np
from protocol import Kind
from trainer_hook import SidecarClient

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

client = SidecarClient(sys.argv[1], run_id="rssimg", spill_dir=sys.argv[2], max_pending_bytes=16 << 20,
                       max_backlog_bytes=16 << 20, max_spill_bytes=8 << 20, max_inflight_bytes=16 << 20)
np.full((1024, 1024), 7, np.uint8).sum()  # numpy's first use, outside the measurement
time.sleep(0.2)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
for i in range(300):
    client.send(Kind.IMAGE, {"name": "img", "image": np.full((1024, 1024), i % 256, np.uint8), "step": i})
deadline = time.monotonic() + 120
while client.stats()["pending"] and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"base": base, "peak": status("VmHWM"), "end": status("VmRSS"), "stats": client.stats()}))
sys.stdout.flush()
os._exit(0)
"""


def test_client_rss_stays_under_its_byte_bounds_with_300_images_and_no_sidecar(tmp_path: Path) -> None:
    out = _run(RSS_SCRIPT, f"tcp://127.0.0.1:{free_port()}", str(tmp_path / "spill"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    stats = result["stats"]
    growth = result["peak"] - result["base"]
    # pending 16 MiB + backlog 16 MiB + window (one message before any answer) + a copy being packed
    bound = 16 * MiB + 16 * MiB + 2 * MiB
    assert growth < bound + 16 * MiB, (growth / MiB, stats)
    assert stats["unacked"] == 1, "nothing but the run start in the window before the sidecar answers"
    assert stats["spill_bytes"] <= 8 * MiB
    assert stats["backlog_bytes"] <= 16 * MiB
    # every image is accounted for: in memory, on disk, or dropped by a named policy
    accounted = (stats["backlog"] + stats["unacked"] - 1 + stats.get("dropped_queue_full", 0)
                 + stats.get("dropped_backlog_full", 0))
    assert accounted == 300, stats


# ----------------------------------------------------------------------------------------------- spill

def _metrics(order: int, payload: int = 10_000) -> Packed:
    frames = [b"m" * payload]
    return Packed(Kind.METRICS, frames, 0.0, payload, order)


def test_spill_never_exceeds_its_limit_and_shrinks_as_it_drains(tmp_path: Path) -> None:
    limit = 4_000_000
    counters: collections.Counter[str] = collections.Counter()
    spill = SpillSegments(tmp_path / "spill", limit)
    outbox = Outbox(1 * MiB, spill, counters)
    for order in range(1, 1001):  # 10 MB of messages into 1 MiB of memory and 4 MB of disk
        outbox.put(_metrics(order))
        assert _segment_bytes(tmp_path / "spill") <= limit
    assert counters["spilled"] > 0 and counters["dropped_backlog_full"] > 0
    full = _segment_bytes(tmp_path / "spill")
    assert full > limit * 0.9
    sizes, orders = [], []
    while (item := outbox.pop()) is not None:
        orders.append(item.order)
        sizes.append(_segment_bytes(tmp_path / "spill"))
    assert orders == sorted(orders), "order kept"
    assert max(sizes) <= limit and sizes[-1] == 0
    assert sizes == sorted(sizes, reverse=True), "the disk only shrinks while draining"
    assert len(set(sizes)) > 4, "segments are deleted one by one as they are read, not at the end"
    assert spill.segments_deleted >= 4 and not list((tmp_path / "spill").glob("*.seg"))
    # the newest were dropped (drop newest), the oldest kept
    assert orders[0] == 1 and counters["dropped_backlog_full"] == 1000 - len(orders)


def test_never_dropped_messages_wait_behind_a_full_spill_in_order(tmp_path: Path) -> None:
    counters: collections.Counter[str] = collections.Counter()
    outbox = Outbox(100_000, SpillSegments(tmp_path / "spill", 300_000), counters)
    for order in range(1, 60):
        outbox.put(_metrics(order))
    checkpoint = Packed(Kind.CHECKPOINT, [b"c" * 100], 0.0, 100, 60)
    outbox.put(checkpoint)
    outbox.put(_metrics(61))
    assert _segment_bytes(tmp_path / "spill") <= 300_000
    orders = []
    while (item := outbox.pop()) is not None:
        orders.append(item.order)
    assert 60 in orders and orders == sorted(orders)


def test_a_memory_full_of_never_dropped_messages_behind_the_spill_does_not_stall_it(tmp_path: Path) -> None:
    counters: collections.Counter[str] = collections.Counter()
    outbox = Outbox(50_000, SpillSegments(tmp_path / "spill", 100_000), counters)
    for order in range(1, 20):
        outbox.put(_metrics(order))  # memory, then the spill until full
    for order in range(20, 30):  # checkpoints the full spill refuses: behind it, in memory, over its bound
        outbox.put(Packed(Kind.CHECKPOINT, [b"c" * 20_000], 0.0, 20_000, order))
    assert outbox.memory_bytes > 50_000
    orders = []
    while (item := outbox.pop()) is not None:
        orders.append(item.order)
    assert orders == sorted(orders) and orders[-10:] == list(range(20, 30)) and len(outbox) == 0


def test_kept_at_exit_in_order_window_memory_spill_tail_and_taken_over_after_a_torn_write(tmp_path: Path) -> None:
    counters: collections.Counter[str] = collections.Counter()
    outbox = Outbox(50_000, SpillSegments(tmp_path / "spill", 300_000), counters)
    unacked = [_metrics(order) for order in (1, 2, 3)]  # sent, never acknowledged
    for order in range(4, 60):
        outbox.put(_metrics(order))  # memory, then spill, then (spill full) dropped
    outbox.put(Packed(Kind.RUN_FINISH, [b"f" * 40_000], 0.0, 40_000, 60))  # never dropped: waits behind the spill
    assert outbox.tail and counters["dropped_backlog_full"] > 0
    outbox.pop()  # one left for the window since
    kept = outbox.keep_on_disk(unacked)
    outbox.close(keep=True)
    # the process died while appending one more record: a torn tail
    last = sorted((tmp_path / "spill").glob("*.seg"))[-1]
    with open(last, "ab") as f:
        f.write(b"\x40\x00\x00\x00partial")
    taken = SpillSegments(tmp_path / "spill", 10_000_000)  # the adopting client's limit
    assert taken.count == kept and taken.torn_records == 1
    taken.append(record_bytes(_metrics(61)))
    orders = []
    while (item := taken.pop()) is not None:
        orders.append(item.order)
    assert orders[:3] == [1, 2, 3] and orders[-2:] == [60, 61] and orders == sorted(orders)
    assert len(orders) == kept + 1 and 4 not in orders  # 4 had left for the window


def test_spill_drains_through_a_real_sidecar_within_its_limit(tmp_path: Path) -> None:
    limit = 4_000_000
    spill_dir = tmp_path / "spill"
    sidecar = SidecarProcess(tmp_path)
    client = SidecarClient(sidecar.addr, run_id="spilly", spill_dir=spill_dir, max_backlog_bytes=MiB,
                           max_spill_bytes=limit, ack_timeout=0.3)
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_segment_bytes(spill_dir))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for step in range(6000):  # ~1 KB a message: 6 MB, over memory and disk together
            client.log({f"k{i}": float(step) for i in range(40)}, step=step)
        deadline = time.monotonic() + 60
        while client.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = client.stats()
        assert stats["spill_bytes"] <= limit and stats.get("spilled", 0) > 0
        sidecar.start()
        assert client.finish(timeout=120), client.stats()
    finally:
        done.set()
        sampler.join()
    stats = client.stats()
    assert max(samples) <= limit, max(samples)
    assert stats["spill_segments_deleted"] > 0 and _segment_bytes(spill_dir) == 0
    assert sidecar.stop() == 0
    steps = read_runs(sidecar.wandb_dir)["spilly"].steps()
    assert steps == sorted(set(steps)) and steps[0] == 0  # what was kept arrived once each, in order
    assert len(steps) == 6000 - stats.get("dropped_backlog_full", 0) - stats.get("dropped_queue_full", 0)


def test_a_full_spill_disk_is_counted_and_what_was_kept_arrives_whole(tmp_path: Path) -> None:
    from tests.test_durability import _small_tmpfs

    with _small_tmpfs(tmp_path / "small", "256k") as small:
        sidecar = SidecarProcess(tmp_path)
        client = SidecarClient(sidecar.addr, run_id="diskfull", spill_dir=small, max_backlog_bytes=64 * 1024,
                               max_spill_bytes=4_000_000, ack_timeout=0.3)
        for step in range(2000):  # ~1 KB a message: 2 MB into 64 KiB of memory and a 256 KiB disk
            client.log({f"k{i}": float(step) for i in range(40)}, step=step)
        deadline = time.monotonic() + 60
        while client.stats()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = client.stats()
        assert stats.get("spill_failed", 0) > 0 and stats.get("spilled", 0) > 0
        with sidecar:
            assert client.finish(timeout=120), client.stats()
            assert sidecar.stop() == 0
    stats = client.stats()
    steps = read_runs(sidecar.wandb_dir)["diskfull"].steps()
    assert steps == sorted(set(steps)) and steps[0] == 0
    assert len(steps) == 2000 - stats.get("dropped_backlog_full", 0) - stats.get("dropped_queue_full", 0)


# ----------------------------------------------------------------------------------------------- exit

EXIT_SCRIPT = """
import sys
from trainer_hook import SidecarClient
for name in ("one", "two", "three"):
    c = SidecarClient(sys.argv[1], run_id=name, finish_at_exit_timeout=float(sys.argv[2]))
    for step in range(100):
        c.log({"x": step}, step=step)
"""


def test_exit_with_three_clients_and_no_sidecar_waits_one_deadline_and_keeps_their_data(tmp_path: Path) -> None:
    deadline = 5.0
    started = time.monotonic()
    out = _run(EXIT_SCRIPT, f"tcp://127.0.0.1:{free_port()}", str(deadline),
               env={"WANDB_SIDECAR_SPILL_DIR": str(tmp_path / "spill")})
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    # one client after another would take 3 x 5 s; one shared deadline takes 5 s plus start-up
    assert took < 3 * deadline - 3, took
    kept = sorted(p.name.split(".")[0] for p in (tmp_path / "spill").iterdir() if list(p.glob("*.seg")))
    assert kept == ["one", "three", "two"]
    assert out.stderr.count("not fully delivered") == 3 and out.stderr.count("102 message(s)") == 3


LATER_SCRIPT = """
import sys, time
from pathlib import Path
from trainer_hook import SidecarClient
client = SidecarClient(sys.argv[1], run_id="later")
client.log({"y": 1}, step=0)
assert client.finish(timeout=60)
spill = Path(sys.argv[2])
deadline = time.monotonic() + 120
while any(spill.glob("orphaned.*")) and time.monotonic() < deadline:
    time.sleep(0.1)
print("orphans left:", [p.name for p in spill.iterdir()])
"""


def test_spill_left_at_exit_is_delivered_by_a_later_process(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    env = {"WANDB_SIDECAR_SPILL_DIR": str(spill)}
    sidecar = SidecarProcess(tmp_path)
    script = ("import sys\nfrom trainer_hook import SidecarClient\n"
              "c = SidecarClient(sys.argv[1], run_id='orphaned', init_kwargs={'project': 'p'}, "
              "finish_at_exit_timeout=1, max_backlog_bytes=200_000)\n"
              "[c.log({'a': s, 'b': s * 2}, step=s) for s in range(3000)]\n")
    first = _run(script, sidecar.addr, env=env)  # no sidecar yet: exits with everything kept on disk
    assert first.returncode == 0, first.stderr
    assert "3002 message(s) not acknowledged" in first.stderr, first.stderr
    with sidecar:
        later = _run(LATER_SCRIPT, sidecar.addr, str(spill), env=env)
        assert later.returncode == 0, later.stderr
        assert "orphans left: []" in later.stdout, later.stdout + later.stderr
        assert sidecar.stop() == 0
    runs = read_runs(sidecar.wandb_dir)
    run = runs["orphaned"]
    assert run.steps() == list(range(3000)), "every step once"
    assert all(row["b"] == row["_step"] * 2 for row in run.history)
    assert run.exit_code == 0 and run.project == "p"
    assert runs["later"].steps() == [0]


def test_only_dead_owners_spills_of_this_machine_are_taken_over(tmp_path: Path) -> None:
    from trainer_hook.spill_owner import SpillOwner, claim_orphans

    start = Packed(Kind.RUN_START, [b"s"], 0.0, 1, 1)
    alive = SpillOwner.create(tmp_path, "alive", "aaaaaaaa", start, "tcp://x")  # its owner holds the lock
    elsewhere = SpillOwner.create(tmp_path, "elsewhere", "bbbbbbbb", start, "tcp://x")
    dead = SpillOwner.create(tmp_path, "dead", "cccccccc", start, "tcp://x")
    for owner in (alive, elsewhere, dead):
        SpillSegments(owner.directory, 1 << 20).append(record_bytes(_metrics(2)))
    (elsewhere.directory / "owner.json").write_text(json.dumps({"host": "another-node"}))
    elsewhere.release()
    dead.release()
    claimed = claim_orphans(tmp_path, limit=10, run_id="x")
    assert [o.directory.name for o in claimed] == ["dead.cccccccc"]
    assert elsewhere.directory.exists() and alive.directory.exists()
    for owner in (*claimed, alive):
        owner.remove()


RESUMED_SCRIPT = """
import sys
from trainer_hook import SidecarClient
first, last = int(sys.argv[2]), int(sys.argv[3])
c = SidecarClient(sys.argv[1], run_id="resumed", init_kwargs={"resume": "allow"}, finish_at_exit_timeout=1)
for s in range(first, last):
    c.log({"x": float(s)}, step=s)
if sys.argv[4] == "finish":
    assert c.finish(timeout=120), c.stats()
"""


def test_a_resumed_training_sends_what_its_crashed_predecessor_left_first(tmp_path: Path) -> None:
    """The everyday resume: a trainer crashes while no sidecar answers; the training is resumed with the
    same run id (a sidecar is up by then): the steps the first one left go first, then the new ones."""
    env = {"WANDB_SIDECAR_SPILL_DIR": str(tmp_path / "spill")}
    sidecar = SidecarProcess(tmp_path)
    crashed = _run(RESUMED_SCRIPT, sidecar.addr, "0", "50", "crash", env=env)
    assert crashed.returncode == 0 and "52 message(s) not acknowledged" in crashed.stderr, crashed.stderr
    with sidecar:
        resumed = _run(RESUMED_SCRIPT, sidecar.addr, "50", "100", "finish", env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert "50 messages an earlier trainer of this run left undelivered" in resumed.stderr
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["resumed"]
    assert run.steps() == list(range(100)) and [r["x"] for r in run.history] == [float(s) for s in range(100)]
    assert run.exit_code == 0
    assert not any((tmp_path / "spill").iterdir())


# ----------------------------------------------------------------------------------------------- checkpoints

def test_heartbeats_go_on_during_a_long_checkpoint_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy across filesystems can take minutes; it must not stop the heartbeats (fault injected: a
    copy that lasts until the test has seen heartbeats)."""
    import trainer_hook.client as client_module

    release = threading.Event()
    copying = threading.Event()
    real_spool = client_module.spool_checkpoint

    def slow_spool(path: str, run_id: str, order: int) -> str:
        copying.set()
        release.wait(60)
        return real_spool(path, run_id, order)

    monkeypatch.setattr(client_module, "spool_checkpoint", slow_spool)
    ckpt = tmp_path / "epoch_1.pth"
    ckpt.write_bytes(b"weights")
    with FakePeer() as peer:
        client = SidecarClient(peer.addr, run_id="copying", heartbeat_interval=0.1, spill_dir=None)
        client.log_checkpoint(ckpt, aliases=["epoch_1", "latest"])
        client.log({"x": 1}, step=1)
        assert copying.wait(30)
        beats = len(peer.headers(Kind.HEARTBEAT))
        peer.wait_for(lambda p: len(p.headers(Kind.HEARTBEAT)) >= beats + 3)  # while the copy still runs
        assert not peer.headers(Kind.CHECKPOINT), "order kept: the checkpoint waits for its copy"
        release.set()
        assert client.finish(timeout=30)
    kinds = [h.kind for h in peer.headers() if h.kind is not Kind.HEARTBEAT]
    assert kinds[:4] == [Kind.RUN_START, Kind.CHECKPOINT, Kind.METRICS, Kind.RUN_FINISH]


def test_spooled_checkpoints_are_bounded_while_the_sidecar_is_down(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    spool = work / ".wandb_sidecar_spool"
    sidecar = SidecarProcess(tmp_path)
    client = SidecarClient(sidecar.addr, run_id="ckpts", max_spooled_checkpoints=3, ack_timeout=0.3)
    for epoch in range(1, 21):
        path = work / f"epoch_{epoch}.pth"
        path.write_bytes(bytes([epoch]) * 100_000)
        aliases = [f"epoch_{epoch}", "latest"] + (["best"] if epoch == 5 else [])
        client.log_checkpoint(path, aliases=aliases, metadata={"epoch": epoch})
        deadline = time.monotonic() + 60  # a runner saves minutes apart: the link is made by then
        while client.stats().get("checkpoints_spooled", 0) < epoch and time.monotonic() < deadline:
            time.sleep(0.02)
        if epoch > 2:
            (work / f"epoch_{epoch - 2}.pth").unlink()  # the runner's max_keep_ckpts=2
    stats = client.stats()
    assert stats["checkpoints_spooled"] == 20 and "checkpoint_spool_failed" not in stats
    kept = sorted(p.name for p in spool.iterdir())
    assert kept == ["ckpts-20-epoch_19.pth", "ckpts-21-epoch_20.pth", "ckpts-6-epoch_5.pth"], kept
    assert stats["checkpoints_given_up"] == 17
    with sidecar:
        assert client.finish(timeout=120), client.stats()
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["ckpts"]
    versions = {a.metadata["epoch"]: a.aliases for a in run.artifacts_named("run_ckpts_model")}
    assert sorted(versions) == [5, 19, 20]
    assert "best" in versions[5] and "latest" in versions[20]
    assert "checkpoint_missing" not in sidecar.log()


# ----------------------------------------------------------------------------------------------- WANDB_*

def test_wandb_variables_in_the_trainer_reach_the_run(tmp_path: Path) -> None:
    env = {"WANDB_PROJECT": "envproj", "WANDB_NAME": "env-name", "WANDB_NOTES": "from the job script",
           "WANDB_TAGS": "slurm, ablation", "WANDB_RUN_GROUP": "grp1", "WANDB_JOB_TYPE": "train",
           "WANDB_RUN_ID": "envrunid"}
    with SidecarProcess(tmp_path) as sidecar:
        out = _run("import sys\nfrom trainer_hook import SidecarClient\n"
                   "c = SidecarClient(sys.argv[1])\nc.log({'x': 1}, step=0)\nassert c.finish(timeout=60)\n",
                   sidecar.addr, env=env)
        assert out.returncode == 0, out.stderr
        assert sidecar.stop() == 0
    run = read_runs(sidecar.wandb_dir)["envrunid"]
    record = next(r["run"] for r in run.records if r.get("type") == "run")
    assert run.project == "envproj"
    assert record.get("display_name") == "env-name"
    assert record.get("notes") == "from the job script"
    assert record.get("tags") == ["slurm", "ablation"]
    assert record.get("run_group") == "grp1"
    assert record.get("job_type") == "train"
