"""Every message body, as a typed structure: the schema is the documentation and, decoded by msgspec (in C),
the validation at once.

Rules of the wire, all enforced on decode (see :mod:`protocol.codec`):

- a body is a MessagePack map of exactly its kind's fields: an unknown field is refused (a typo on one
  side is an error, not silently dropped data), a missing required field too;
- every string, list and map has its limit (:mod:`protocol.limits`); free-form trees (``config``,
  ``init_kwargs``, ``metadata`` …) are bounded in depth (``MAX_NESTING``), length and key type by
  :func:`check_tree`, since no static type can say "any JSON-like value";
- numpy arrays (``np.ndarray`` fields) travel as references into the message's one blob frame;
- what a type cannot say (one entry per image, an array's shape) is each body's :meth:`Body.check`.

A decoded body reads like the dict it was sent as (``body["path"]``, ``body.get("step")``, ``"x" in body``):
an optional field that was not sent is absent (``UNSET``), not a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Iterator

import msgspec
import numpy as np
from msgspec import UNSET, Meta, UnsetType

from .errors import InvalidField, LimitExceeded
from .kinds import Kind
from .limits import (
    MAX_CONTAINER_LEN,
    MAX_KEY_LEN,
    MAX_METRICS_PER_MESSAGE,
    MAX_NESTING,
    MAX_ROWS_PER_MESSAGE,
    MAX_STR_LEN,
)

Str = Annotated[str, Meta(max_length=MAX_STR_LEN)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_KEY_LEN)]  # metric keys, image names
Path = Annotated[str, Meta(min_length=1, max_length=MAX_STR_LEN)]
Count = Annotated[int, Meta(ge=0)]
Scalar = int | float | str | bool | None
StrList = Annotated[list[Str], Meta(max_length=MAX_CONTAINER_LEN)]
Arrays = Annotated[list[np.ndarray], Meta(max_length=MAX_CONTAINER_LEN)]
Tree = Annotated[dict[str, Any], Meta(max_length=MAX_CONTAINER_LEN)]  # free-form: see check_tree
Polygon = Annotated[list[float], Meta(max_length=MAX_CONTAINER_LEN)]
Instance = Annotated[list[Polygon], Meta(max_length=MAX_CONTAINER_LEN)] | None  # the polygons of one object
ImagePolygons = Annotated[list[Instance], Meta(max_length=MAX_CONTAINER_LEN)] | None
RLE = dict[Str, Any]  # COCO: {"size": [h, w], "counts": bytes | str}; bounded by check_tree
ImageRLEs = Annotated[list[RLE | None], Meta(max_length=MAX_CONTAINER_LEN)] | None


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """Base of every body: read access like the dict it was sent as; absent optional fields are UNSET.
    Not tracked by the garbage collector: a body holds values, never a reference back to itself."""

    def __getitem__(self, name: str) -> Any:
        value = getattr(self, name, UNSET) if name in self.__struct_fields__ else UNSET
        if value is UNSET:
            raise KeyError(name)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name, UNSET) if name in self.__struct_fields__ else UNSET
        return default if value is UNSET else value

    def __contains__(self, name: object) -> bool:
        return name in self.__struct_fields__ and getattr(self, name) is not UNSET  # type: ignore[arg-type]

    def keys(self) -> list[str]:
        return [f for f in self.__struct_fields__ if getattr(self, f) is not UNSET]

    def items(self) -> list[tuple[str, Any]]:
        return [(f, getattr(self, f)) for f in self.keys()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __eq__(self, other: object) -> bool:  # equal to the dict it was sent as, too
        if isinstance(other, Body):
            return type(other) is type(self) and self.items() == other.items()
        return isinstance(other, dict) and self.to_dict() == other

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The fields that were sent, nested bodies as dicts too."""
        return {k: _plain(v) for k, v in self.items()}

    def check(self) -> None:
        """Rules between fields, or on values, that the types cannot say. Raises ProtocolError."""


Mapping.register(Body)


def _plain(value: Any) -> Any:
    if isinstance(value, Body):
        return value.to_dict()
    if type(value) is list and value and isinstance(value[0], Body):
        return [v.to_dict() for v in value]
    return value


def check_tree(value: Any, what: str, depth: int = 1) -> None:
    """A free-form value (config, init_kwargs, metadata): at most ``MAX_NESTING`` deep, string keys,
    every string and container within its limit."""
    if depth > MAX_NESTING:
        raise LimitExceeded(f"{what}: nested deeper than {MAX_NESTING}")
    t = type(value)
    if t is dict:
        if len(value) > MAX_CONTAINER_LEN:
            raise LimitExceeded(f"{what}: map of {len(value)} entries, at most {MAX_CONTAINER_LEN}")
        for key, item in value.items():
            if type(key) is not str and type(key) is not bytes:
                raise InvalidField(f"{what}: map keys must be strings")
            if len(key) > MAX_STR_LEN:
                raise LimitExceeded(f"{what}: key of {len(key)} characters")
            check_tree(item, what, depth + 1)
    elif t is list:
        if len(value) > MAX_CONTAINER_LEN:
            raise LimitExceeded(f"{what}: list of {len(value)} entries, at most {MAX_CONTAINER_LEN}")
        for item in value:
            check_tree(item, what, depth + 1)
    elif t is str or t is bytes:
        if len(value) > MAX_STR_LEN:
            raise LimitExceeded(f"{what}: string of {len(value)} characters, at most {MAX_STR_LEN}")


def _check_trees(body: Body, *names: str) -> None:
    for name in names:
        value = getattr(body, name)
        if value is not UNSET and value is not None:
            check_tree(value, name, 1)


def _check_arrays(name: str, arrays: list[np.ndarray], n: int, ndim: int, width: int | None = None) -> None:
    if len(arrays) != n:
        raise InvalidField(f"{name} has {len(arrays)} entries, expected {n}")
    for a in arrays:
        if a.ndim != ndim or (width is not None and a.shape[-1] != width):
            raise InvalidField(f"{name}: each entry must be a {ndim}-d array" + (f" of width {width}" if width else ""))


def _check_per_image(name: str, value: Any, n: int) -> None:
    if value is not UNSET and value is not None and len(value) != n:
        raise InvalidField(f"{name} must have one entry per image ({len(value)} for {n})")


# ---------------------------------------------------------------------------- trainer -> sidecar


class Code(Body):
    """What ``run.log_code`` needs: the source tree, the artifact name (None: wandb's default), the script."""

    root: Path
    name: Str | None | UnsetType = UNSET
    program: Str | None | UnsetType = UNSET


class RunStart(Body):
    init_kwargs: Tree  # wandb.init's arguments
    config: Tree | UnsetType = UNSET
    define_metrics: Annotated[list[Tree], Meta(max_length=MAX_CONTAINER_LEN)] | UnsetType = UNSET
    files: Annotated[list[dict[Str, Str | None]], Meta(max_length=MAX_CONTAINER_LEN)] | UnsetType = UNSET  # wandb.save
    code: Code | UnsetType = UNSET
    client: Tree | UnsetType = UNSET  # who sent it (host, pid), for status

    def check(self) -> None:
        _check_trees(self, "init_kwargs", "config", "client")
        if self.define_metrics is not UNSET:
            check_tree(self.define_metrics, "define_metrics", 1)


class Metrics(Body):
    """``run.log(data, step=step, commit=commit)``."""

    data: Annotated[dict[Name, Scalar], Meta(max_length=MAX_METRICS_PER_MESSAGE)]
    step: Count | None | UnsetType = UNSET
    commit: bool | UnsetType = UNSET


class MetricRows(Body):
    """Consecutive ``log()`` calls of one trainer, in order, as one message: one sequence number, one
    journal record, one admission for all of them (per-message work is what limits a Python receiver).

    Only the last row may be without a step or with ``commit=False``: a row held open for its step is then
    always the message's last, so "everything before this message's journal index reached wandb" stays
    exact (see ``sidecar.run_worker``)."""

    rows: Annotated[list[Metrics], Meta(min_length=1, max_length=MAX_ROWS_PER_MESSAGE)]

    def check(self) -> None:
        for i, row in enumerate(self.rows[:-1]):
            if row.step is UNSET or row.step is None or row.commit is False:
                raise InvalidField(f"metric_rows: row {i} has no step or commit=False, but is not the last row")


class Checkpoint(Body):
    """A checkpoint file for a ``model`` artifact (``path`` may be the client's spooled hardlink)."""

    path: Path
    source_path: Str | UnsetType = UNSET  # the file the trainer saved, when ``path`` is its spooled link
    spooled: bool | UnsetType = UNSET
    aliases: StrList | UnsetType = UNSET
    metadata: Tree | None | UnsetType = UNSET
    artifact_name: Str | None | UnsetType = UNSET

    def check(self) -> None:
        _check_trees(self, "metadata")


class ValData(Body):
    """The validation table, once per run: images by path (the sidecar reads them) or their encoded
    files (``image_bytes``: bytes, or 1-d uint8 arrays that travel in the blob frame; any size, in parts)."""

    class_names: StrList
    image_names: StrList
    gt_boxes: Arrays  # per image: float32 (n, 4) xyxy
    gt_labels: Arrays  # per image: int64 (n,) 0-based
    image_paths: StrList | UnsetType = UNSET
    image_bytes: Annotated[list[Any], Meta(max_length=MAX_CONTAINER_LEN)] | UnsetType = UNSET
    gt_masks: Annotated[list[ImagePolygons], Meta(max_length=MAX_CONTAINER_LEN)] | UnsetType = UNSET
    artifact_name: Str | None | UnsetType = UNSET
    table_name: Str | None | UnsetType = UNSET
    #: A validation set larger than one message travels as ``parts`` messages of consecutive images, in
    #: order; the table is logged once, with the last.
    part: Count = 0
    parts: Annotated[int, Meta(ge=1, le=MAX_CONTAINER_LEN)] = 1

    def check(self) -> None:
        n = len(self.image_names)
        if self.part >= self.parts:
            raise InvalidField(f"val_data part {self.part} of {self.parts}")
        if (self.image_paths is UNSET) == (self.image_bytes is UNSET):
            raise InvalidField("val_data needs exactly one of image_paths or image_bytes")
        images = self.image_paths if self.image_bytes is UNSET else self.image_bytes
        if len(images) != n:
            raise InvalidField(f"{len(images)} images for {n} image names")
        if self.image_bytes is not UNSET:
            for b in self.image_bytes:
                if not (type(b) is bytes or (isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1)):
                    raise InvalidField("image_bytes must be a list of bytes or 1-d uint8 arrays")
        _check_arrays("gt_boxes", self.gt_boxes, n, 2, 4)
        _check_arrays("gt_labels", self.gt_labels, n, 1)
        _check_per_image("gt_masks", self.gt_masks, n)


class PredBatch(Body):
    """One evaluation's predictions for the validation table's rows (``indices``)."""

    tag: Str  # "epoch_3" / "iter_400"
    indices: Annotated[list[Count], Meta(max_length=MAX_CONTAINER_LEN)]
    boxes: Arrays  # per image: float32 (n, 4) xyxy
    scores: Arrays  # per image: float32 (n,)
    labels: Arrays  # per image: int64 (n,) 0-based
    masks: Annotated[list[ImageRLEs], Meta(max_length=MAX_CONTAINER_LEN)] | UnsetType = UNSET  # RLE per box
    score_thr: float | UnsetType = UNSET
    aliases: StrList | UnsetType = UNSET

    def check(self) -> None:
        n = len(self.indices)
        _check_arrays("boxes", self.boxes, n, 2, 4)
        _check_arrays("scores", self.scores, n, 1)
        _check_arrays("labels", self.labels, n, 1)
        _check_per_image("masks", self.masks, n)
        _check_trees(self, "masks")


class Image(Body):
    """An image for the history row of ``step`` under ``name`` (``wandb.Image``)."""

    name: Name
    image: np.ndarray  # uint8 (H, W) or (H, W, 1|3|4), RGB(A)
    step: Count | None | UnsetType = UNSET
    commit: bool | UnsetType = UNSET

    def check(self) -> None:
        image = self.image
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        ) or 0 in image.shape:
            raise InvalidField("image must be a non-empty uint8 array of shape (H, W) or (H, W, 1|3|4)")


class Config(Body):
    """A config update after the run start (``run.config.update``)."""

    config: Tree

    def check(self) -> None:
        _check_trees(self, "config")


class RunFinish(Body):
    exit_code: int


class Empty(Body):
    """Heartbeat, status request: the envelope says it all."""


# ---------------------------------------------------------------------------- sidecar -> trainer


class Ack(Body):
    """Everything up to the envelope's ``seq`` is journaled; ``delivered``: the highest in wandb."""

    delivered: int | None | UnsetType = UNSET


class Reject(Body):
    reason: Str
    detail: Str
    rejected_seq: int


class StatusReply(Body):
    status: Tree

    def check(self) -> None:
        _check_trees(self, "status")


BODIES: dict[Kind, type[Body]] = {
    Kind.RUN_START: RunStart,
    Kind.METRICS: Metrics,
    Kind.METRIC_ROWS: MetricRows,
    Kind.CHECKPOINT: Checkpoint,
    Kind.VAL_DATA: ValData,
    Kind.PRED_BATCH: PredBatch,
    Kind.IMAGE: Image,
    Kind.CONFIG: Config,
    Kind.RUN_FINISH: RunFinish,
    Kind.HEARTBEAT: Empty,
    Kind.STATUS: Empty,
    Kind.ACK: Ack,
    Kind.REJECT: Reject,
    Kind.STATUS_REPLY: StatusReply,
}
