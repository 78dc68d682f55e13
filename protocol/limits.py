"""Hard limits of the wire format. Both sides enforce them; the sidecar also sets ZeroMQ's MAXMSGSIZE."""

from __future__ import annotations

import re

PROTOCOL_VERSION = 2  # 2: the header carries the client's incarnation

#: Largest single ZeroMQ frame (validation images travel as one blob frame).
MAX_FRAME_BYTES = 256 * 1024 * 1024
#: The envelope frame is tiny; anything bigger is garbage.
MAX_HEADER_BYTES = 1024
#: The msgpack body frame (arrays travel in the blob frame, not here).
MAX_BODY_BYTES = 16 * 1024 * 1024
#: A message is header, body and at most one array blob.
MAX_FRAMES = 3
#: Messages one ZeroMQ multipart may carry back to back (the client batches what is ready to send).
MAX_BATCH = 1024

#: Run ids become file names and wandb ids: keep them boring.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
#: A client's incarnation token (random hex, one per SidecarClient): also part of journal records.
INCARNATION_PATTERN = re.compile(r"^[0-9a-f]{8,32}\Z")
MAX_KEY_LEN = 256
MAX_STR_LEN = 64 * 1024
MAX_CONTAINER_LEN = 1_000_000
MAX_METRICS_PER_MESSAGE = 10_000
#: ``log()`` calls one ``metric_rows`` message may carry (the client packs at most 1,024 per message).
MAX_ROWS_PER_MESSAGE = 4096
#: Depth of free-form values (config, init_kwargs, metadata), counted from the body.
MAX_NESTING = 32

#: numpy dtypes allowed on the wire, by their ``dtype.str``-independent name.
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"}
)
MAX_ARRAY_NDIM = 4
MAX_ARRAY_ELEMENTS = 64 * 1024 * 1024

#: Directory (beside the checkpoint) where the client hardlinks checkpoints it announces. The sidecar
#: deletes a spooled file once uploaded, and only files inside a directory of exactly this name.
SPOOL_DIR_NAME = ".wandb_sidecar_spool"
