"""Follow an open run's ``.wandb`` transaction log incrementally: the highest history step on disk.

Reading the whole file with ``wandb leet inspect`` costs seconds per 10 MB and grows with the run; this
reads only what was appended since the last look. The file is wandb's LevelDB-style log: a 7-byte file
header, then 32 KiB blocks of records ``<u32 crc><u16 length><u8 type>`` + data, a record split into
FIRST/MIDDLE/LAST pieces where it crosses a block, each data a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = 7
_BLOCK = 32 * 1024
_RECORD_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbLogTail:
    """``max_step()`` reads the records appended since the previous call (complete blocks only... and the
    complete records of the last, partial one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = _FILE_HEADER  # where the next unread record starts
        self.step = -1
        self.exited = False  # the run's exit record is on disk: wandb wrote it last, after every row
        self._pieces: list[bytes] = []

    def max_step(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.step
        pos = 0
        while True:
            block_left = _BLOCK - (self.offset + pos) % _BLOCK
            if block_left < _RECORD_HEADER.size:  # the block's tail is padding
                if len(data) - pos < block_left:
                    break
                pos += block_left
                continue
            if len(data) - pos < _RECORD_HEADER.size:
                break
            _crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
            end = pos + _RECORD_HEADER.size + length
            if end > len(data) or kind == 0:  # not written completely yet
                break
            piece = data[pos + _RECORD_HEADER.size:end]
            pos = end
            if kind == _FULL:
                self._record(piece)
            elif kind == _FIRST:
                self._pieces = [piece]
            elif kind == _MIDDLE:
                self._pieces.append(piece)
            elif kind == _LAST:
                self._pieces.append(piece)
                self._record(b"".join(self._pieces))
                self._pieces = []
        self.offset += pos
        return self.step

    def _record(self, data: bytes) -> None:
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(data)
        except Exception:  # a record this reader does not know how to parse says nothing about steps
            return
        kind = record.WhichOneof("record_type")
        if kind == "history":
            self.step = max(self.step, record.history.step.num)
        elif kind == "exit":
            self.exited = True
