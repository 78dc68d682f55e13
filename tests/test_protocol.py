"""The wire format: round trips, strict refusal of anything else, and a property test of the decoder."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    InvalidField,
    Kind,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    UnknownKind,
    UnsupportedVersion,
    decode,
    encode,
)
from protocol.limits import MAX_HEADER_BYTES


def test_metrics_round_trip_keeps_values_and_numpy_scalars() -> None:
    frames = encode(Kind.METRICS, "run1", 7, 12.5, {"data": {"a": np.float32(0.5), "b": 3, "nan": math.nan}, "step": 4}, incarnation="0123abcd")
    assert len(frames) == 2  # no arrays, no blob
    msg = decode(frames)
    assert (msg.kind, msg.run_id, msg.seq, msg.header.time) == (Kind.METRICS, "run1", 7, 12.5)
    assert msg.body["data"]["a"] == 0.5 and msg.body["data"]["b"] == 3 and math.isnan(msg.body["data"]["nan"])
    assert msg.body["step"] == 4


def test_arrays_travel_in_one_blob_and_come_back_equal() -> None:
    boxes = [np.random.default_rng(i).random((i + 1, 4), dtype=np.float32) for i in range(50)]
    body = {"tag": "epoch_1", "indices": list(range(50)), "boxes": boxes,
            "scores": [b[:, 0].copy() for b in boxes], "labels": [np.arange(len(b)) for b in boxes]}
    frames = encode(Kind.PRED_BATCH, "run1", 2, 0.0, body, incarnation="0123abcd")
    assert len(frames) == 3  # header, body, one blob for 150 arrays
    out = decode(frames).body
    for a, b in zip(out["boxes"], boxes):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32


@pytest.mark.parametrize(
    "frames, error",
    [
        ([b"\xc1"], MalformedFrame),
        ([msgpack.packb([1, "metrics", "r", 1, 0.0, 1]), msgpack.packb({"data": {}})], UnsupportedVersion),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1]), msgpack.packb({"data": {}})], MalformedFrame),  # v1 layout
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, ""]), msgpack.packb({"data": {}})], InvalidField),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "../x"]), msgpack.packb({"data": {}})], InvalidField),
        ([msgpack.packb([2, "nope", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({})], UnknownKind),
        ([msgpack.packb([2, "metrics", "a/b", 1, 0.0, 1, "0123abcd"]), msgpack.packb({"data": {}})], InvalidField),
        ([msgpack.packb([2, "metrics", "r", 0, 0.0, 1, "0123abcd"]), msgpack.packb({"data": {}})], InvalidField),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({"data": {"x": {"y": 1}}})], InvalidField),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({"step": 1})], InvalidField),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({"data": {}, "extra": 1})], InvalidField),
        ([msgpack.packb([2, "run_finish", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({"exit_code": "0"})], InvalidField),
        ([b"\x00" * (MAX_HEADER_BYTES + 1)], LimitExceeded),
        ([msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "0123abcd"]), msgpack.packb({}), b"", b""], LimitExceeded),
    ],
)
def test_bad_messages_raise_the_protocol_error_for_their_reason(frames, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        decode(frames)


def test_array_reference_outside_blob_and_bad_dtype_are_refused() -> None:
    frames = encode(Kind.PRED_BATCH, "r", 1, 0.0, {"tag": "t", "indices": [0], "boxes": [np.zeros((1, 4), np.float32)],
                                                   "scores": [np.zeros(1, np.float32)], "labels": [np.zeros(1, np.int64)]}, incarnation="0123abcd")
    with pytest.raises(MalformedFrame):
        decode([frames[0], frames[1], frames[2][:-4]])  # truncated blob
    with pytest.raises(TypeError):
        encode(Kind.PRED_BATCH, "r", 1, 0.0, {"x": np.zeros(2, dtype=object)}, incarnation="0123abcd")
    ref = msgpack.packb(["complex128", [1], 0, 16])
    body = msgpack.packb({"tag": "t", "indices": [], "boxes": [msgpack.ExtType(1, ref)], "scores": [], "labels": []})
    with pytest.raises(LimitExceeded):
        decode([frames[0], body, b"\x00" * 16])


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_any_bytes_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(list(Kind)), st.text(max_size=10), st.integers(-5, 2**64 - 1), _msgpack_values,
       st.dictionaries(st.text(max_size=12), _msgpack_values, max_size=6))
def test_structured_garbage_decodes_or_raises_protocol_error(kind, run_id, seq, t, body) -> None:  # type: ignore[no-untyped-def]
    frames = [msgpack.packb([2, kind.value, run_id, seq, t, 1, "0123abcd"]), msgpack.packb(body)]
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    assert msg.kind is kind


def test_image_and_config_round_trip_and_bad_images_are_refused() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    msg = decode(encode(Kind.IMAGE, "r", 2, 0.0, {"name": "val_img", "image": image, "step": 3}, incarnation="0123abcd"))
    np.testing.assert_array_equal(msg.body["image"], image)
    assert decode(encode(Kind.CONFIG, "r", 3, 0.0, {"config": {"a": [1, {"b": None}]}}, incarnation="0123abcd")).body == {
        "config": {"a": [1, {"b": None}]}}
    code = {"root": "/work", "name": None, "program": "tools/train.py"}
    assert decode(encode(Kind.RUN_START, "r", 1, 0.0, {"init_kwargs": {}, "code": code}, incarnation="0123abcd")).body["code"] == code
    for body in ({"name": "x", "image": image.astype(np.float32)},  # not uint8
                 {"name": "x", "image": np.zeros((4, 4, 2), np.uint8)},  # 2 channels
                 {"name": "x", "image": np.zeros((0, 4, 3), np.uint8)},  # empty
                 {"name": "", "image": image},
                 {"name": "x", "image": image, "step": -1}):
        with pytest.raises(InvalidField):
            decode(encode(Kind.IMAGE, "r", 2, 0.0, body, incarnation="0123abcd"))
    with pytest.raises(InvalidField):
        decode(encode(Kind.RUN_START, "r", 1, 0.0, {"init_kwargs": {}, "code": {"root": "/w", "extra": "x"}}, incarnation="0123abcd"))


def test_one_multipart_carries_a_batch_of_messages() -> None:
    from protocol import split

    msgs = [encode(Kind.METRICS, "r", i, 0.0, {"data": {"x": float(i)}, "step": i}, incarnation="0123abcd") for i in range(1, 4)]
    msgs.insert(1, encode(Kind.PRED_BATCH, "r", 9, 0.0, {"tag": "t", "indices": [0], "boxes": [np.zeros((1, 4), np.float32)],
                                                        "scores": [np.ones(1, np.float32)], "labels": [np.zeros(1, np.int64)]}, incarnation="0123abcd"))
    multipart = [f for m in msgs for f in m]
    parts = list(split(multipart))
    assert [len(f) for _, f in parts] == [2, 3, 2, 2]
    assert [h.seq for h, _ in parts] == [1, 9, 2, 3]
    assert decode(parts[1][1]).body["scores"][0][0] == 1.0
    broken = multipart[:5] + [b"\xc1"] + multipart[5:]
    seen = []
    with pytest.raises(MalformedFrame):
        for header, _ in split(broken):
            seen.append(header.seq)
    assert seen == [1, 9]  # what came before the break was handed out


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=60), min_size=0, max_size=8))
def test_split_of_any_bytes_yields_or_raises_protocol_error(frames: list[bytes]) -> None:
    from protocol import split

    try:
        for header, message in split(frames):
            assert message[0] is not None and len(message) == 1 + header.nbody
    except ProtocolError:
        pass


def test_free_form_values_are_bounded_in_depth_and_length() -> None:
    from protocol.limits import MAX_NESTING, MAX_STR_LEN

    def nested(depth: int) -> dict:
        value: dict = {}
        for _ in range(depth - 1):
            value = {"x": value}
        return value

    ok = encode(Kind.CONFIG, "r", 3, 0.0, {"config": nested(MAX_NESTING)}, incarnation="0123abcd")
    assert decode(ok).body["config"] == nested(MAX_NESTING)
    for config in (nested(MAX_NESTING + 1), nested(600), {"a": "x" * (MAX_STR_LEN + 1)}):
        with pytest.raises(LimitExceeded):
            decode(encode(Kind.CONFIG, "r", 3, 0.0, {"config": config}, incarnation="0123abcd"))
    body = b"\x81\xa6config\x81\xa1a" + b"\x91" * 5000 + b"\x90"  # deeper than msgspec's own recursion limit
    with pytest.raises(LimitExceeded):
        decode([encode(Kind.CONFIG, "r", 3, 0.0, {"config": {}}, incarnation="0123abcd")[0], body])
    with pytest.raises(LimitExceeded):  # a metric key longer than the limit
        decode(encode(Kind.METRICS, "r", 3, 0.0, {"data": {"k" * 300: 1.0}}, incarnation="0123abcd"))
    with pytest.raises(InvalidField):  # non-string keys in a free-form tree
        decode(encode(Kind.CONFIG, "r", 3, 0.0, {"config": {"a": {1: 2}}}, incarnation="0123abcd"))


def test_decoded_body_reads_like_the_dict_it_was_sent_as_and_re_encodes_the_same() -> None:
    sent = {"init_kwargs": {"project": "p"}, "code": {"root": "/w", "program": "train.py"}, "client": {"pid": 1}}
    body = decode(encode(Kind.RUN_START, "r", 1, 0.0, sent, incarnation="0123abcd")).body
    assert body["init_kwargs"] == {"project": "p"} and body.get("config") is None and body.get("files", []) == []
    assert "code" in body and "config" not in body and sorted(body) == ["client", "code", "init_kwargs"]
    assert body["code"].get("root") == "/w" and body["code"].get("name") is None and body == sent
    with pytest.raises(KeyError):
        body["config"]
    again = decode(encode(Kind.RUN_START, "r", 1, 0.0, body, incarnation="0123abcd")).body  # the sidecar does this
    assert again == body and again.to_dict() == sent
    metrics = decode(encode(Kind.METRICS, "r", 2, 0.0, {"data": {"a": 1}}, incarnation="0123abcd")).body
    assert metrics.get("step") is None and metrics.get("commit", True) is True


def test_image_bytes_travel_as_uint8_arrays_in_the_blob() -> None:
    files = [bytes(range(256)) * 3, b"\xff\xd8jpeg"]
    body = {"class_names": ["a"], "image_names": ["x.png", "y.jpg"],
            "image_bytes": [np.frombuffer(f, np.uint8) for f in files],
            "gt_boxes": [np.zeros((0, 4), np.float32)] * 2, "gt_labels": [np.zeros(0, np.int64)] * 2}
    frames = encode(Kind.VAL_DATA, "r", 2, 0.0, body, incarnation="0123abcd")
    assert len(frames[1]) < 200 and len(frames[2]) == sum(map(len, files))  # the files are in the blob
    out = decode(frames).body
    assert [a.tobytes() for a in out["image_bytes"]] == files
    body["image_bytes"] = [np.zeros((2, 2), np.uint8), np.zeros(3, np.uint8)]  # not a 1-d byte array
    with pytest.raises(InvalidField):
        decode(encode(Kind.VAL_DATA, "r", 2, 0.0, body, incarnation="0123abcd"))


def test_header_round_trip_and_trailing_newline_in_run_id_refused() -> None:
    from protocol import decode_header, encode_header

    h = decode_header(encode_header(Kind.METRICS, "run-1", 5, 1.5, 2, "0123abcd"))
    assert (h.version, h.kind, h.run_id, h.seq, h.time, h.nbody, h.incarnation) == (2, Kind.METRICS, "run-1", 5, 1.5, 2,
                                                                                    "0123abcd")
    assert h.kind is Kind.METRICS
    with pytest.raises(InvalidField):
        decode_header(msgpack.packb([2, "metrics", "run\n", 1, 0.0, 1, "0123abcd"]))
    with pytest.raises(InvalidField):
        decode_header(msgpack.packb([2, "metrics", "run", 1, math.inf, 1, "0123abcd"]))


def test_invalid_utf8_in_a_string_is_a_malformed_frame() -> None:
    header = msgpack.packb([2, "metrics", "r", 1, 0.0, 1, "0123abcd"])
    with pytest.raises(MalformedFrame):
        decode([header.replace(b"\xa1r", b"\xa1\xff"), msgpack.packb({"data": {}})])
    with pytest.raises(MalformedFrame):
        decode([header, b"\x81\xa4data\x81\xa2\xc3\x28\x01"])  # a metric key that is not UTF-8


# ------------------------------------------------------------------------------- metric_rows (batched log calls)


def _rows_frames(rows: list[dict]) -> list[bytes]:
    return encode(Kind.METRIC_ROWS, "r", 2, 0.0, {"rows": rows}, incarnation="0123abcd")


def test_metric_rows_round_trip_and_count_without_decoding() -> None:
    from protocol import row_count

    rows = [{"data": {"loss": 1.0 / (i + 1), "lr": np.float32(0.01)}, "step": i} for i in range(300)]
    frames = _rows_frames(rows)
    assert row_count(frames[1]) == 300
    msg = decode(frames)
    assert msg.problems == ()
    assert [row.step for row in msg.body.rows] == list(range(300))
    assert msg.body.rows[7]["data"] == {"loss": 1.0 / 8, "lr": pytest.approx(0.01)}
    with pytest.raises(MalformedFrame):
        row_count(b"\x81\xa4data\x90")  # a metrics body, not metric_rows


def test_a_bad_row_costs_only_itself() -> None:
    rows = [{"data": {"x": float(i)}, "step": i} for i in range(10)]
    rows[3]["data"]["k" * 300] = 1.0  # key over MAX_KEY_LEN
    rows[6]["data"]["v"] = [1, 2]  # not a scalar
    msg = decode(_rows_frames(rows))
    assert [row.step for row in msg.body.rows] == [0, 1, 2, 4, 5, 7, 8, 9]
    assert [(type(p), "row 3" in p.detail or "row 6" in p.detail) for p in msg.problems] == [
        (LimitExceeded, True), (InvalidField, True)]


@pytest.mark.parametrize("rows, error", [
    ([], InvalidField),  # at least one row
    ([{"data": {"x": 1}}, {"data": {"x": 2}, "step": 3}], InvalidField),  # a row without a step that is not the last
    ([{"data": {"x": 1}, "step": 1, "commit": False}, {"data": {"x": 2}, "step": 1}], InvalidField),  # ditto commit=False
    ([{"data": {"x": [1]}, "step": 1}], InvalidField),  # every row bad: the message is refused
    ([{"data": {"x": 1}, "step": 1}] * 4097, LimitExceeded),  # over MAX_ROWS_PER_MESSAGE
])
def test_metric_rows_refused(rows: list[dict], error: type) -> None:
    with pytest.raises(error):
        decode(_rows_frames(rows))


def test_metric_rows_may_end_with_a_row_without_step() -> None:
    msg = decode(_rows_frames([{"data": {"x": 1}, "step": 1}, {"data": {"y": 2}, "step": None}]))
    assert [row.step for row in msg.body.rows] == [1, None]
    assert msg.body.to_dict() == {"rows": [{"data": {"x": 1}, "step": 1}, {"data": {"y": 2}, "step": None}]}


_row_values = st.dictionaries(st.sampled_from(["data", "step", "commit", "x"]),
                              _msgpack_values | st.dictionaries(st.text(max_size=8), _msgpack_values, max_size=3),
                              max_size=3)


@settings(max_examples=1000, deadline=None)
@given(st.lists(_row_values | _msgpack_values, max_size=6))
def test_metric_rows_garbage_keeps_the_valid_rows_or_raises_protocol_error(rows) -> None:  # type: ignore[no-untyped-def]
    frames = [msgpack.packb([2, "metric_rows", "r", 2, 0.0, 1, "0123abcd"]), msgpack.packb({"rows": rows})]
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    assert msg.kind is Kind.METRIC_ROWS and len(msg.body.rows) + len(msg.problems) == len(rows)
