"""What the receiver checks in a message body before it accepts it, beyond the protocol's own decoding:
files under the allowed roots, and a run start's ``wandb.init`` arguments. The same checks run again when
the journal is replayed, so a message refused on arrival stays refused."""

from __future__ import annotations

from typing import Sequence

from protocol import Header, Kind, Message, ProtocolError, decode_body, decode_header

from .init_policy import check_init_kwargs
from .paths import FileGuard


class PathRefused(ProtocolError):
    """A message names a file outside the sidecar's allowed roots."""

    reason = "path_refused"


def check_body(msg: Message, guard: FileGuard) -> None:
    """Raise a :class:`ProtocolError` for a path outside the roots or a refused ``wandb.init`` argument."""
    body = msg.body
    if msg.kind is Kind.RUN_START:
        check_init_kwargs(body["init_kwargs"])
        return  # its saved files and code root are checked by the sink: a refused one must not stop the run
    if msg.kind is Kind.CHECKPOINT:
        paths = [body["path"]]
    elif msg.kind is Kind.VAL_DATA:
        paths = body.get("image_paths", [])
    else:
        return
    for path in paths:
        refusal = guard.refusal(path)
        if refusal:
            raise PathRefused(refusal)


def admit_body(header: Header, frames: Sequence[bytes], guard: FileGuard) -> Message:
    """Decode and check a message's body (``frames`` after the header)."""
    msg = decode_body(header, frames)
    check_body(msg, guard)
    return msg


def admit_journaled(frames: Sequence[bytes], guard: FileGuard, index: int) -> Message | None:
    """A journaled message as the worker should see it, or None when it was refused on arrival."""
    try:
        msg = admit_body(decode_header(frames[0]), frames[1:], guard)
    except ProtocolError:
        return None
    msg.index = index
    return msg
