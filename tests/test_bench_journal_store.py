"""Smoke test of figure 11 (the journal's store compared) at its quick size: the facts that do not depend on
timing. Every store stays under a footprint that does not grow with the stream, and a restart replays
exactly the undelivered records, in order, intact; a torn tail never costs an acknowledged record."""

from __future__ import annotations

from pathlib import Path

from benchmarks.journal_store import benchmark
from benchmarks.journal_stores import KINDS


def test_every_store_is_bounded_and_replays_exactly_what_is_undelivered(tmp_path: Path) -> None:
    r = benchmark(quick=True, root=tmp_path)
    assert len(r["cases"]) == 2
    for case in r["cases"]:
        messages = case["case"]["messages"]
        if not case["case"]["large"]:
            assert case["footprint_bound"] < case["frame_bytes_written"] / 2  # the bound means something
        for kind in KINDS:
            s = case[kind]
            assert 0 < s["max_bytes"] <= case["footprint_bound"], (case["case"]["name"], kind, s["max_bytes"])
            assert s["end_bytes"] <= s["max_bytes"]
            rp = s["replay"]
            assert 0 < s["delivered"] < messages
            assert rp["consecutive"] and rp["first"] == s["delivered"] + 1 and rp["last"] == messages, (kind, rp)
            assert rp["count"] == messages - s["delivered"]
            assert rp["crc"] == rp["expected_crc"]  # the frames came back as they were written
    assert list(r["torn_tail"]) == list(KINDS)
    for kind, t in r["torn_tail"].items():
        assert t["acked_intact"] and t["in_order"] and t["append_after_restart_ok"], (kind, t)
        assert 0 <= t["torn_batch_records_kept"] < 100
    assert r["torn_tail"]["sqlite"]["torn_batch_records_kept"] == 0  # a transaction is all or nothing
