"""The wire protocol between the trainer-side hook and the sidecar. No wandb, mmcv or torch here."""

from .counters import Counters
from .codec import Header, Message, decode, decode_body, decode_header, encode, encode_body, encode_header, row_count, split
from .errors import (
    InvalidField,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    UnknownKind,
    UnsupportedVersion,
)
from .kinds import NEVER_DROPPED, SEQUENCED, Kind
from .limits import MAX_BATCH, MAX_FRAME_BYTES, PROTOCOL_VERSION
from .schema import Body

from .address import DEFAULT_ADDR, DEFAULT_SOCKET_DIR

__all__ = [
    "Body",
    "Counters",
    "DEFAULT_ADDR",
    "DEFAULT_SOCKET_DIR",
    "Header",
    "InvalidField",
    "Kind",
    "LimitExceeded",
    "MAX_BATCH",
    "MAX_FRAME_BYTES",
    "MalformedFrame",
    "Message",
    "NEVER_DROPPED",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "SEQUENCED",
    "UnknownKind",
    "UnsupportedVersion",
    "decode",
    "decode_body",
    "decode_header",
    "encode",
    "encode_body",
    "encode_header",
    "row_count",
    "split",
]
