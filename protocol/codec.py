"""The envelope and its encoding: ``[header, body, blob?]`` ZeroMQ frames.

- ``header``: msgpack ``[version, kind, run_id, seq, time, nbody, incarnation]``. Tiny, decoded first, so
  the sidecar can acknowledge or reject a message by its sequence number even when the body is bad.
  ``nbody`` (1 or 2) says how many frames follow it, so one ZeroMQ multipart can carry up to
  ``MAX_BATCH`` messages back to back (:func:`split`): per-message socket overhead is what limits
  throughput in Python. ``incarnation`` is the sending client's random token: sequence numbers count per
  (run id, incarnation), so a resumed training (a new process, the same wandb run id) starts a new
  sequence instead of being taken for duplicates of the old one.
- ``body``: msgpack map of the kind's fields (:mod:`protocol.schema`, decoded and validated by msgspec in
  C). numpy arrays inside it are ExtType references ``[dtype, shape, offset, nbytes]`` into ``blob``.
- ``blob``: every array's bytes, concatenated: one large frame per message, not one per array
  (pyzmq copies frames under 64 KiB anyway, and per-frame overhead dominates for many small arrays).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Iterator, Literal, Sequence

import msgspec
import numpy as np
from msgspec import Meta

from .errors import InvalidField, LimitExceeded, MalformedFrame, ProtocolError, UnknownKind, UnsupportedVersion
from .kinds import SEQUENCED, Kind
from .limits import (
    ALLOWED_DTYPES,
    INCARNATION_PATTERN,
    MAX_ARRAY_ELEMENTS,
    MAX_ARRAY_NDIM,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_ROWS_PER_MESSAGE,
    PROTOCOL_VERSION,
    RUN_ID_PATTERN,
)
from .schema import BODIES, Body, MetricRows

_ARRAY_EXT = 1
_KINDS = {k.value: k for k in Kind}
_FLOAT_MAX = 1.7976931348623157e308


class Header(msgspec.Struct, array_like=True, frozen=True, gc=False, forbid_unknown_fields=True):
    """``[version, kind, run_id, seq, time, nbody, incarnation(, origin_incarnation, origin_seq)]``: decoded
    (and validated, in C) alone first.

    ``origin_*``: a message an earlier incarnation of the run sent and never saw acknowledged (its trainer
    exited; a later client delivers what it left on disk) names where it was sent first, so a sidecar that
    journaled it then takes it as a duplicate instead of logging it twice.

    ``run_id`` and ``incarnation`` must also match their patterns (``RUN_ID_PATTERN``,
    ``INCARNATION_PATTERN``) or be empty: checked by :func:`decode_header` (a regex per message is most of
    a header's decoding time, so strings already seen are remembered)."""

    version: Literal[PROTOCOL_VERSION]  # type: ignore[valid-type]
    kind: Kind
    run_id: Annotated[str, Meta(max_length=64)]
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    time: Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]  # finite
    nbody: Annotated[int, Meta(ge=1, le=MAX_FRAMES - 1)]
    incarnation: Annotated[str, Meta(max_length=32)]
    origin_incarnation: Annotated[str, Meta(max_length=32)] = ""
    origin_seq: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0


class Message(msgspec.Struct, gc=False):
    """A decoded message. Not tracked by the garbage collector (nor are its header and body): a run's
    queue may hold 200,000 of them, and a full collection would walk them all."""

    header: Header
    body: Body | dict[str, Any]  # decoded: the kind's Body (reads like a dict); built by hand: a dict
    #: Not on the wire: the receiver's position of this message in its run's journal (one counter per run
    #: across incarnations), which orders delivery and compaction.
    index: int = 0
    #: Not on the wire: the rows of a ``metric_rows`` message refused on decoding (the others are kept).
    problems: tuple[ProtocolError, ...] = ()

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


class _HasArrays(Exception):
    """Raised by the plain encoder at the first array: the body needs a blob frame (the slower path)."""


def _scalar(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        raise _HasArrays
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0):
        return obj.item()  # numpy scalar, 0-d tensor
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


_plain_encoder = msgspec.msgpack.Encoder(enc_hook=_scalar)


def encode_header(kind: Kind, run_id: str, seq: int, time: float, nbody: int = 1, incarnation: str = "",
                  origin: tuple[str, int] | None = None) -> bytes:
    if origin is None:
        return _plain_encoder.encode((PROTOCOL_VERSION, kind, run_id, seq, time, nbody, incarnation))
    return _plain_encoder.encode((PROTOCOL_VERSION, kind, run_id, seq, time, nbody, incarnation, *origin))


class _ArrayCollector:
    """Encoder hook: arrays become references into one blob; numpy/torch scalars plain values."""

    __slots__ = ("parts", "offset")

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.offset = 0

    def __call__(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return _scalar(obj)
        arr = np.ascontiguousarray(obj)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise TypeError(f"array dtype {arr.dtype} is not allowed on the wire")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        ref = _plain_encoder.encode((arr.dtype.name, arr.shape, self.offset, arr.nbytes))
        self.parts.append(arr.data.cast("B") if arr.nbytes else b"")
        self.offset += arr.nbytes
        return msgspec.msgpack.Ext(_ARRAY_EXT, ref)


def encode_body(body: dict[str, Any] | Body) -> list[bytes]:
    """Pack a body into ``[body]`` or ``[body, blob]``. Raises TypeError/ValueError for what cannot go."""
    collector = None
    try:
        try:
            packed = _plain_encoder.encode(body)
        except _HasArrays:
            collector = _ArrayCollector()
            packed = msgspec.msgpack.Encoder(enc_hook=collector).encode(body)
    except RecursionError:
        raise ValueError("body nested too deeply to encode") from None
    if len(packed) > MAX_BODY_BYTES:
        raise ValueError(f"body of {len(packed)} bytes exceeds {MAX_BODY_BYTES}")
    if collector is None or not collector.parts:
        return [packed]
    blob = b"".join(collector.parts)
    if len(blob) > MAX_FRAME_BYTES:
        raise ValueError(f"array blob of {len(blob)} bytes exceeds {MAX_FRAME_BYTES}")
    return [packed, blob]


def encode(kind: Kind, run_id: str, seq: int, time: float, body: dict[str, Any] | Body,
           incarnation: str = "") -> list[bytes]:
    """Encode a whole message to its frames."""
    frames = encode_body(body)
    return [encode_header(kind, run_id, seq, time, len(frames), incarnation), *frames]


# ----------------------------------------------------------------------------------------- decode


_header_decoder = msgspec.msgpack.Decoder(Header)
_any_decoder = msgspec.msgpack.Decoder()


def decode_header(frame: bytes) -> Header:
    """Decode the envelope frame. Cheap, and enough to acknowledge or reject by sequence number."""
    if len(frame) > MAX_HEADER_BYTES:
        raise LimitExceeded(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = _header_decoder.decode(frame)
    except msgspec.MsgspecError as exc:
        raise _header_error(frame, exc) from None
    except (UnicodeDecodeError, RecursionError) as exc:  # msgspec raises these as they are
        raise MalformedFrame(f"header is not valid msgpack ({type(exc).__name__})") from None
    if header.run_id not in _valid_run_ids:
        _remember(_valid_run_ids, header.run_id, RUN_ID_PATTERN, "run_id")
    if header.incarnation not in _valid_incarnations:
        _remember(_valid_incarnations, header.incarnation, INCARNATION_PATTERN, "incarnation")
    if header.origin_incarnation not in _valid_incarnations:
        _remember(_valid_incarnations, header.origin_incarnation, INCARNATION_PATTERN, "origin_incarnation")
    if header.kind in SEQUENCED and (header.seq == 0 or not header.run_id or not header.incarnation):
        raise InvalidField(f"{header.kind} needs a run_id, an incarnation and a sequence number >= 1")
    return header


_valid_run_ids: set[str] = {""}
_valid_incarnations: set[str] = {""}
_REMEMBERED = 4096


def _remember(seen: set[str], value: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.match(value):
        raise InvalidField(f"{what} {value[:80]!r} must match {pattern.pattern}")
    if len(seen) >= _REMEMBERED:  # bounded: a peer inventing ids costs a regex each, not memory
        seen.clear()
        seen.add("")
    seen.add(value)


def _header_error(frame: bytes, exc: Exception) -> ProtocolError:
    """The typed error for a header the schema refused (the slow path: only for bad input)."""
    try:
        raw = _any_decoder.decode(frame)
    except Exception as e:  # msgspec.DecodeError, RecursionError
        return MalformedFrame(f"header is not valid msgpack ({type(e).__name__}: {e})")
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        return MalformedFrame("header must be an array starting with the protocol version")
    if raw[0] != PROTOCOL_VERSION:
        return UnsupportedVersion(f"protocol version {raw[0]}, this side speaks {PROTOCOL_VERSION}")
    if len(raw) != 7:
        return MalformedFrame("header must be a 7-element array [version, kind, run_id, seq, time, nbody, "
                              "incarnation]")
    if not isinstance(raw[1], str) or raw[1] not in _KINDS:
        return UnknownKind(f"unknown message kind {str(raw[1])[:64]!r}")
    if type(raw[5]) is not int or not 1 <= raw[5] <= MAX_FRAMES - 1:
        return MalformedFrame(f"nbody must be 1 or 2, not {str(raw[5])[:20]}")
    return InvalidField(f"header: {exc}")


def _no_blob_hook(code: int, data: memoryview) -> Any:
    raise MalformedFrame("array reference without a blob frame" if code == _ARRAY_EXT
                         else f"unknown msgpack extension type {code}")


def _array_hook(blob: memoryview):  # type: ignore[no-untyped-def]
    def hook(code: int, data: memoryview) -> Any:
        if code != _ARRAY_EXT:
            raise MalformedFrame(f"unknown msgpack extension type {code}")
        try:
            ref = _any_decoder.decode(data)
        except Exception:  # msgspec.DecodeError, UnicodeDecodeError, RecursionError
            raise MalformedFrame("bad array reference") from None
        if not (isinstance(ref, list) and len(ref) == 4):
            raise MalformedFrame("bad array reference")
        dtype, shape, offset, nbytes = ref
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise LimitExceeded(f"array dtype {str(dtype)[:32]!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_ARRAY_NDIM
            or not all(type(d) is int and 0 <= d <= MAX_ARRAY_ELEMENTS for d in shape)
        ):
            raise LimitExceeded(f"array shape {str(shape)[:64]} is not allowed")
        count = 1
        for d in shape:
            count *= d
        dt = np.dtype(dtype).newbyteorder("<")
        if count > MAX_ARRAY_ELEMENTS or type(offset) is not int or type(nbytes) is not int:
            raise LimitExceeded("array too large or malformed reference")
        if nbytes != count * dt.itemsize or offset < 0 or offset + nbytes > len(blob):
            raise MalformedFrame("array reference points outside the blob")
        return np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(shape)

    return hook


def _arrays_only(kind: type, obj: Any) -> Any:
    """msgspec's hook for ``np.ndarray`` fields: only an array reference (decoded by the ext hook) fits."""
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise TypeError(f"expected an array, got {type(obj).__name__}")


_body_decoders = {kind: msgspec.msgpack.Decoder(cls, ext_hook=_no_blob_hook, dec_hook=_arrays_only)
                  for kind, cls in BODIES.items()}
_LENGTH_LIMIT = re.compile(r"of length <= |length <= ")


def decode_body(header: Header, frames: Sequence[bytes]) -> Message:
    """Decode and validate the body frames (everything after the header) of a message."""
    if len(frames) != header.nbody:
        raise MalformedFrame(f"header announces {header.nbody} body frame(s), got {len(frames)}")
    data = frames[0]
    if len(data) > MAX_BODY_BYTES:
        raise LimitExceeded(f"body frame of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
    if len(frames) == 2:
        if len(frames[1]) > MAX_FRAME_BYTES:
            raise LimitExceeded(f"blob frame of {len(frames[1])} bytes exceeds {MAX_FRAME_BYTES}")
        decoder = msgspec.msgpack.Decoder(BODIES[header.kind], ext_hook=_array_hook(memoryview(frames[1])),
                                          dec_hook=_arrays_only)
    else:
        decoder = _body_decoders[header.kind]
    problems: tuple[ProtocolError, ...] = ()
    try:
        body = decoder.decode(data)
    except msgspec.ValidationError as exc:
        if header.kind is not Kind.METRIC_ROWS:
            raise _validation_error(header.kind, exc) from None
        body, problems = _valid_rows(data, exc)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedFrame(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from None
    except RecursionError:
        raise LimitExceeded("body nested too deeply") from None
    body.check()
    return Message(header, body, problems=problems)


def _validation_error(kind: Kind, exc: msgspec.ValidationError) -> ProtocolError:
    text = str(exc)
    return (LimitExceeded if _LENGTH_LIMIT.search(text) else InvalidField)(f"{kind}: {text}")


class _RawRows(msgspec.Struct, forbid_unknown_fields=True):
    rows: Annotated[list[msgspec.Raw], Meta(min_length=1, max_length=MAX_ROWS_PER_MESSAGE)]


_raw_rows_decoder = msgspec.msgpack.Decoder(_RawRows)


def row_count(body: bytes) -> int:
    """The rows of an encoded ``metric_rows`` body, without decoding them."""
    try:
        return len(_raw_rows_decoder.decode(body).rows)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFrame(f"not a metric_rows body ({type(exc).__name__})") from None


def _valid_rows(data: bytes, exc: msgspec.ValidationError) -> tuple[MetricRows, tuple[ProtocolError, ...]]:
    """A ``metric_rows`` body that failed validation: each row judged alone, as its own ``metrics`` message
    would have been, so one bad value costs its row, not the up to 1,024 calls packed beside it. Raises
    when the message itself is bad, or no row is valid."""
    try:
        raw = _raw_rows_decoder.decode(data)
    except msgspec.ValidationError:
        raise _validation_error(Kind.METRIC_ROWS, exc) from None
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as raw_exc:
        raise MalformedFrame(f"body is not valid msgpack ({type(raw_exc).__name__}: {raw_exc})") from None
    rows, problems = [], []
    decoder = _body_decoders[Kind.METRICS]
    for i, row in enumerate(raw.rows):
        try:
            rows.append(decoder.decode(row))
        except msgspec.ValidationError as row_exc:
            problems.append(_validation_error(Kind.METRIC_ROWS, msgspec.ValidationError(f"row {i}: {row_exc}")))
        except ProtocolError as row_exc:  # from the ext hook: an array where a scalar belongs
            problems.append(type(row_exc)(f"{Kind.METRIC_ROWS}: row {i}: {row_exc.detail}"))
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as row_exc:
            problems.append(MalformedFrame(f"{Kind.METRIC_ROWS}: row {i}: {type(row_exc).__name__}: {row_exc}"))
    if not rows:
        raise problems[0]
    return MetricRows(rows=rows), tuple(problems)


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
