"""The run table and the init allow-list alone: no sockets, no wandb."""

from __future__ import annotations

import pytest

from protocol import Header, Kind
from sidecar.init_policy import InitRefused, check_init_kwargs
from sidecar.run_table import Admit, RunTable

A, B, C = "aaaaaaaa", "bbbbbbbb", "cccccccc"


def _h(seq: int, inc: str, kind: Kind = Kind.METRICS, run_id: str = "r") -> Header:
    return Header(2, kind, run_id, seq, 0.0, 1, inc)


def _admit(table: RunTable, seq: int, inc: str) -> Admit:
    return table.admit(_h(seq, inc), b"peer")[0]


def test_sequence_per_incarnation_duplicates_and_gaps() -> None:
    table = RunTable()
    assert [_admit(table, s, A) for s in (1, 2, 2, 4, 3)] == [
        Admit.ACCEPT, Admit.ACCEPT, Admit.DUPLICATE, Admit.GAP, Admit.ACCEPT]
    st = table.get("r")
    assert (st.last_seq, st.last_index, st.duplicates, st.out_of_order) == (3, 3, 1, 1)


def test_a_live_incarnation_keeps_the_run_and_an_ended_one_hands_it_over() -> None:
    table = RunTable()
    for s in (1, 2, 3):
        _admit(table, s, A)
    st = table.get("r")
    st.journaled_seq = st.last_seq
    assert _admit(table, 1, B) is Admit.IN_USE  # A is live
    assert st.in_use_refused == 1 and st.incarnation == A
    st.state = "finished"
    assert _admit(table, 1, B) is Admit.ACCEPT  # A ended: B takes over, its own sequence from 1
    assert (st.incarnation, st.last_seq, st.last_index, st.incarnations) == (B, 1, 4, 2)
    assert st.index_of(2) == 5
    assert _admit(table, 3, A) is Admit.DUPLICATE  # a late resend of the ended incarnation: re-acknowledged
    assert st.acked_seq(A) == 3
    assert _admit(table, 4, A) is Admit.IN_USE  # but nothing new of it is taken
    assert _admit(table, 1, C) is Admit.IN_USE  # B is live now


def test_heartbeats_refresh_only_their_own_incarnation() -> None:
    table = RunTable()
    _admit(table, 1, A)
    st = table.get("r")
    st.last_seen = 0.0
    assert table.heartbeat(_h(0, B, Kind.HEARTBEAT), b"other") is None
    assert st.last_seen == 0.0
    assert table.heartbeat(_h(0, A, Kind.HEARTBEAT), b"peer") is st and st.last_seen > 0


def test_a_recovered_run_not_heard_from_can_be_taken_over() -> None:
    table = RunTable()
    _admit(table, 1, A)
    st = table.get("r")
    st.heard = False  # what recovery sets: its trainer has not spoken since the restart
    assert _admit(table, 1, B) is Admit.ACCEPT
    st.heard = False
    st.incarnation = B
    assert _admit(table, 2, B) is Admit.ACCEPT and st.heard  # its own trainer simply goes on


def test_a_refused_incarnation_takes_nothing_more_but_a_new_one_may_start() -> None:
    table = RunTable()
    _admit(table, 1, A)
    st = table.get("r")
    st.refused, st.state = "init_refused", "refused"
    assert _admit(table, 2, A) is Admit.REFUSED
    assert _admit(table, 1, B) is Admit.ACCEPT and st.refused == ""


@pytest.mark.parametrize("init", [
    {"project": "p", "entity": "e", "name": "n", "notes": "x", "tags": ["a"], "group": "g", "job_type": "train",
     "config": {"lr": 0.1}, "id": "abc", "resume": "allow", "allow_val_change": True, "mode": "offline",
     "settings": {"disable_git": True}},
])
def test_run_describing_arguments_pass(init: dict) -> None:
    check_init_kwargs(init)


@pytest.mark.parametrize("init, key", [
    ({"dir": "/x"}, "dir"),
    ({"settings": {"base_url": "http://x"}}, "settings.base_url"),
    ({"settings": {"api_key": "k"}}, "settings.api_key"),
    ({"settings": {"root_dir": "/x"}}, "settings.root_dir"),
    ({"settings": {"x_files_dir": "/x"}}, "settings.x_files_dir"),
    ({"settings": {"start_method": "fork"}}, "settings.start_method"),
    ({"anonymous": "must"}, "anonymous"),
    ({"fork_from": "other?_step=1"}, "fork_from"),
    ({"sync_tensorboard": True}, "sync_tensorboard"),
    ({"mode": "shared"}, "mode"),
    ({"tags": "not-a-list"}, "tags"),
])
def test_everything_else_is_refused_by_name(init: dict, key: str) -> None:
    with pytest.raises(InitRefused) as err:
        check_init_kwargs(init)
    assert key in str(err.value) and err.value.reason == "init_refused"
