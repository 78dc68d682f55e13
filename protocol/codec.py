"""The envelope and its encoding: ``[header, body, blob?]`` ZeroMQ frames.

- ``header``: msgpack ``[version, kind, run_id, seq, time, nbody, incarnation]``. Tiny, decoded first, so
  the sidecar can acknowledge or reject a message by its sequence number even when the body is bad.
  ``nbody`` (1 or 2) says how many frames follow it, so one ZeroMQ multipart can carry up to
  ``MAX_BATCH`` messages back to back (:func:`split`): per-message socket overhead is what limits
  throughput in Python. ``incarnation`` is the sending client's random token: sequence numbers count per
  (run id, incarnation), so a resumed training (a new process, the same wandb run id) starts a new
  sequence instead of being taken for duplicates of the old one.
- ``body``: msgpack map of the kind's fields. numpy arrays inside it are ExtType references
  ``[dtype, shape, offset, nbytes]`` into ``blob``.
- ``blob``: every array's bytes, concatenated: one large frame per message, not one per array
  (pyzmq copies frames under 64 KiB anyway, and per-frame overhead dominates for many small arrays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import msgpack
import numpy as np

from .errors import InvalidField, LimitExceeded, MalformedFrame, UnknownKind, UnsupportedVersion
from .kinds import SCHEMAS, SEQUENCED, Kind
from .limits import (
    ALLOWED_DTYPES,
    MAX_ARRAY_ELEMENTS,
    MAX_ARRAY_NDIM,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_CONTAINER_LEN,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_KEY_LEN,
    MAX_METRICS_PER_MESSAGE,
    MAX_STR_LEN,
    PROTOCOL_VERSION,
    INCARNATION_PATTERN,
    RUN_ID_PATTERN,
)

_ARRAY_EXT = 1
_KINDS = {k.value: k for k in Kind}


class Header(NamedTuple):  # a NamedTuple: built once per message, ~4x cheaper than a frozen dataclass
    version: int
    kind: Kind
    run_id: str
    seq: int
    time: float
    nbody: int = 1
    incarnation: str = ""


@dataclass(slots=True)
class Message:
    header: Header
    body: dict[str, Any] = field(default_factory=dict)
    #: Not on the wire: the receiver's position of this message in its run's journal (one counter per run
    #: across incarnations), which orders delivery and compaction.
    index: int = 0

    @property
    def kind(self) -> Kind:
        return self.header.kind

    @property
    def run_id(self) -> str:
        return self.header.run_id

    @property
    def seq(self) -> int:
        return self.header.seq


# ----------------------------------------------------------------------------------------- encode


def encode_header(kind: Kind, run_id: str, seq: int, time: float, nbody: int = 1, incarnation: str = "") -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind.value, run_id, seq, time, nbody, incarnation])


class _ArrayCollector:
    """msgpack ``default`` hook: arrays become references into one blob; numpy/torch scalars plain values."""

    __slots__ = ("parts", "offset")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.offset = 0

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            if arr.dtype.name not in ALLOWED_DTYPES:
                raise TypeError(f"array dtype {arr.dtype} is not allowed on the wire")
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            ref = msgpack.packb([arr.dtype.name, list(arr.shape), self.offset, arr.nbytes])
            self.parts.append(arr.data.cast("B") if arr.nbytes else b"")
            self.offset += arr.nbytes
            return msgpack.ExtType(_ARRAY_EXT, ref)
        if isinstance(obj, np.generic) or (hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0):
            return obj.item()  # numpy scalar, 0-d tensor
        if isinstance(obj, tuple):
            return list(obj)
        raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


def encode_body(body: dict[str, Any]) -> list[bytes]:
    """Pack a body into ``[body]`` or ``[body, blob]``. Raises TypeError/ValueError for what cannot go."""
    collector = _ArrayCollector()
    packed = msgpack.packb(body, default=collector, use_bin_type=True)
    if len(packed) > MAX_BODY_BYTES:
        raise ValueError(f"body of {len(packed)} bytes exceeds {MAX_BODY_BYTES}")
    if not collector.parts:
        return [packed]
    blob = b"".join(collector.parts)
    if len(blob) > MAX_FRAME_BYTES:
        raise ValueError(f"array blob of {len(blob)} bytes exceeds {MAX_FRAME_BYTES}")
    return [packed, blob]


def encode(kind: Kind, run_id: str, seq: int, time: float, body: dict[str, Any], incarnation: str = "") -> list[bytes]:
    """Encode a whole message to its frames."""
    frames = encode_body(body)
    return [encode_header(kind, run_id, seq, time, len(frames), incarnation), *frames]


# ----------------------------------------------------------------------------------------- decode


_BODY_LIMITS: dict[str, Any] = dict(
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_STR_LEN,
    max_bin_len=MAX_BODY_BYTES,
    max_array_len=MAX_CONTAINER_LEN,
    max_map_len=MAX_CONTAINER_LEN,
    max_ext_len=1024,
)


def _no_blob_hook(code: int, data: bytes) -> Any:
    raise MalformedFrame("array reference without a blob frame" if code == _ARRAY_EXT
                         else f"unknown msgpack extension type {code}")


def _unpack(data: bytes, what: str, max_bytes: int, ext_hook: Any) -> Any:
    if len(data) > max_bytes:
        raise LimitExceeded(f"{what} frame of {len(data)} bytes exceeds {max_bytes}")
    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, **_BODY_LIMITS)
    except (LimitExceeded, InvalidField):
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage; all mean "malformed"
        raise MalformedFrame(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})") from None


def decode_header(frame: bytes) -> Header:
    """Decode the envelope frame. Cheap, and enough to acknowledge or reject by sequence number."""
    if len(frame) > MAX_HEADER_BYTES:
        raise LimitExceeded(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = msgpack.unpackb(frame, raw=False)  # 1 KiB at most: no length limits needed
    except Exception as exc:  # msgpack raises a zoo of types for garbage; all mean "malformed"
        raise MalformedFrame(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise MalformedFrame("header must be an array starting with the protocol version")
    if raw[0] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {raw[0]}, this side speaks {PROTOCOL_VERSION}")
    if len(raw) != 7:
        raise MalformedFrame("header must be a 7-element array [version, kind, run_id, seq, time, nbody, "
                             "incarnation]")
    version, kind, run_id, seq, time, nbody, incarnation = raw
    if not isinstance(kind, str) or kind not in _KINDS:
        raise UnknownKind(f"unknown message kind {str(kind)[:64]!r}")
    if not isinstance(run_id, str) or not (run_id == "" or RUN_ID_PATTERN.match(run_id)):
        raise InvalidField(f"run_id {str(run_id)[:80]!r} must match {RUN_ID_PATTERN.pattern}")
    if type(seq) is not int or seq < 0 or seq >= 2**63:
        raise InvalidField("seq must be a non-negative integer")
    if not isinstance(time, (int, float)) or isinstance(time, bool) or not math.isfinite(time):
        raise InvalidField("time must be a finite number")
    if type(nbody) is not int or not 1 <= nbody <= MAX_FRAMES - 1:
        raise MalformedFrame(f"nbody must be 1 or 2, not {str(nbody)[:20]}")
    if not isinstance(incarnation, str) or not (incarnation == "" or INCARNATION_PATTERN.match(incarnation)):
        raise InvalidField(f"incarnation {str(incarnation)[:80]!r} must match {INCARNATION_PATTERN.pattern}")
    k = _KINDS[kind]
    if k in SEQUENCED and (seq == 0 or run_id == "" or incarnation == ""):
        raise InvalidField(f"{k} needs a run_id, an incarnation and a sequence number >= 1")
    return Header(version, k, run_id, seq, float(time), nbody, incarnation)


def _array_hook(blob: memoryview | None):
    def hook(code: int, data: bytes) -> Any:
        if code != _ARRAY_EXT:
            raise MalformedFrame(f"unknown msgpack extension type {code}")
        if blob is None:
            raise MalformedFrame("array reference without a blob frame")
        ref = msgpack.unpackb(data, raw=False)
        if not (isinstance(ref, list) and len(ref) == 4):
            raise MalformedFrame("bad array reference")
        dtype, shape, offset, nbytes = ref
        if dtype not in ALLOWED_DTYPES:
            raise LimitExceeded(f"array dtype {str(dtype)[:32]!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_ARRAY_NDIM
            or not all(type(d) is int and 0 <= d <= MAX_ARRAY_ELEMENTS for d in shape)
        ):
            raise LimitExceeded(f"array shape {str(shape)[:64]} is not allowed")
        count = math.prod(shape)
        dt = np.dtype(dtype).newbyteorder("<")
        if count > MAX_ARRAY_ELEMENTS or type(offset) is not int or type(nbytes) is not int:
            raise LimitExceeded("array too large or malformed reference")
        if nbytes != count * dt.itemsize or offset < 0 or offset + nbytes > len(blob):
            raise MalformedFrame("array reference points outside the blob")
        return np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(shape)

    return hook


def decode_body(header: Header, frames: Sequence[bytes]) -> Message:
    """Decode and validate the body frames (everything after the header) of a message."""
    if len(frames) != header.nbody:
        raise MalformedFrame(f"header announces {header.nbody} body frame(s), got {len(frames)}")
    blob = None
    if len(frames) == 2:
        if len(frames[1]) > MAX_FRAME_BYTES:
            raise LimitExceeded(f"blob frame of {len(frames[1])} bytes exceeds {MAX_FRAME_BYTES}")
        blob = memoryview(frames[1])
    body = _unpack(frames[0], "body", MAX_BODY_BYTES, _array_hook(blob) if blob is not None else _no_blob_hook)
    if not isinstance(body, dict):
        raise MalformedFrame("body must be a map")
    _check_schema(header.kind, body)
    _VALIDATORS.get(header.kind, _no_check)(body)
    return Message(header, body)


def decode(frames: Sequence[bytes]) -> Message:
    """Decode a whole single message. Raises only :class:`protocol.ProtocolError` subclasses."""
    if not frames:
        raise MalformedFrame("empty message")
    if len(frames) > MAX_FRAMES:
        raise LimitExceeded(f"{len(frames)} frames, at most {MAX_FRAMES}")
    return decode_body(decode_header(frames[0]), frames[1:])


def split(frames: Sequence[bytes]) -> Iterator[tuple[Header, Sequence[bytes]]]:
    """The messages of one ZeroMQ multipart: ``(header, its frames)`` each (header frame first), bodies
    not decoded yet.

    Raises a :class:`protocol.ProtocolError` where the framing breaks; what came before was yielded
    (a broken header leaves no way to find the next message)."""
    if not frames:
        raise MalformedFrame("empty message")
    if len(frames) > MAX_BATCH * MAX_FRAMES:
        raise LimitExceeded(f"{len(frames)} frames in one multipart, at most {MAX_BATCH * MAX_FRAMES}")
    i = 0
    while i < len(frames):
        header = decode_header(frames[i])
        end = i + 1 + header.nbody
        if end > len(frames):
            raise MalformedFrame(f"header announces {header.nbody} body frame(s), {len(frames) - i - 1} left")
        yield header, frames[i:end]
        i = end


# ------------------------------------------------------------------------------------- validation


def _check_schema(kind: Kind, body: dict[str, Any]) -> None:
    schema = SCHEMAS[kind]
    for name, value in body.items():
        if name not in schema:
            raise InvalidField(f"{kind}: unexpected field {str(name)[:64]!r}")
        types, _ = schema[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InvalidField(f"{kind}.{name}: expected {'/'.join(t.__name__ for t in types)}")
    for name, (_, required) in schema.items():
        if required and name not in body:
            raise InvalidField(f"{kind}: missing field {name!r}")


def _no_check(body: dict[str, Any]) -> None:
    return None


_SCALARS = (int, float, str, bool, type(None))


def _check_metrics(body: dict[str, Any]) -> None:
    data = body["data"]
    if len(data) > MAX_METRICS_PER_MESSAGE:
        raise LimitExceeded(f"{len(data)} metrics in one message, at most {MAX_METRICS_PER_MESSAGE}")
    for key, value in data.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
            raise InvalidField(f"metric key {str(key)[:64]!r} must be a string of 1..{MAX_KEY_LEN}")
        if not isinstance(value, _SCALARS):
            raise InvalidField(f"metric {key!r}: {type(value).__name__} is not a scalar")
    step = body.get("step")
    if step is not None and step < 0:
        raise InvalidField("step must be >= 0")


def _check_str_list(body: dict[str, Any], name: str) -> None:
    value = body.get(name, [])
    if not all(isinstance(v, str) for v in value):
        raise InvalidField(f"{name} must be a list of strings")


def _check_arrays(body: dict[str, Any], name: str, n: int, ndim: int, width: int | None) -> None:
    arrays = body[name]
    if len(arrays) != n:
        raise InvalidField(f"{name} has {len(arrays)} entries, expected {n}")
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.ndim != ndim or (width is not None and a.shape[-1] != width):
            raise InvalidField(f"{name}: each entry must be a {ndim}-d array" + (f" of width {width}" if width else ""))


def _check_checkpoint(body: dict[str, Any]) -> None:
    _check_str_list(body, "aliases")
    if not body["path"]:
        raise InvalidField("checkpoint path is empty")


def _check_val_data(body: dict[str, Any]) -> None:
    names = body["image_names"]
    n = len(names)
    _check_str_list(body, "image_names")
    _check_str_list(body, "class_names")
    _check_str_list(body, "image_paths")
    if ("image_paths" in body) == ("image_bytes" in body):
        raise InvalidField("val_data needs exactly one of image_paths or image_bytes")
    images = body.get("image_paths", body.get("image_bytes"))
    if len(images) != n:
        raise InvalidField(f"{len(images)} images for {n} image names")
    if "image_bytes" in body and not all(isinstance(b, bytes) for b in body["image_bytes"]):
        raise InvalidField("image_bytes must be a list of bytes")
    _check_arrays(body, "gt_boxes", n, 2, 4)
    _check_arrays(body, "gt_labels", n, 1, None)
    if "gt_masks" in body and len(body["gt_masks"]) != n:
        raise InvalidField("gt_masks must have one entry per image")


def _check_pred_batch(body: dict[str, Any]) -> None:
    n = len(body["indices"])
    if not all(type(i) is int and i >= 0 for i in body["indices"]):
        raise InvalidField("indices must be non-negative integers")
    _check_str_list(body, "aliases")
    _check_arrays(body, "boxes", n, 2, 4)
    _check_arrays(body, "scores", n, 1, None)
    _check_arrays(body, "labels", n, 1, None)
    if "masks" in body and len(body["masks"]) != n:
        raise InvalidField("masks must have one entry per image")


def _check_image(body: dict[str, Any]) -> None:
    name, image = body["name"], body["image"]
    if not 0 < len(name) <= MAX_KEY_LEN:
        raise InvalidField(f"image name must be a string of 1..{MAX_KEY_LEN}")
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
    ) or 0 in image.shape:
        raise InvalidField("image must be a non-empty uint8 array of shape (H, W) or (H, W, 1|3|4)")
    step = body.get("step")
    if step is not None and step < 0:
        raise InvalidField("step must be >= 0")


def _check_run_start(body: dict[str, Any]) -> None:
    code = body.get("code")
    if code is None:
        return
    if not isinstance(code.get("root"), str) or not code["root"]:
        raise InvalidField("code.root must be a non-empty path")
    for key in code:
        if key not in ("root", "name", "program") or not isinstance(code[key], (str, type(None))):
            raise InvalidField(f"code.{str(key)[:64]}: unexpected field or not a string")


_VALIDATORS = {
    Kind.RUN_START: _check_run_start,
    Kind.METRICS: _check_metrics,
    Kind.CHECKPOINT: _check_checkpoint,
    Kind.VAL_DATA: _check_val_data,
    Kind.PRED_BATCH: _check_pred_batch,
    Kind.IMAGE: _check_image,
}
