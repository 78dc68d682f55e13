"""Detection data both MMDetection hooks send, framework-neutral (numpy only: no mmcv, mmengine or torch).

The 2.x hook (``mmdet.py``) and the 3.x hook (``mmdet3.py``) read their runners differently, but pick the
same evaluation images, flatten ground-truth polygons the same way and end a run the same way.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable

import numpy as np

from .client import SidecarClient

EVAL_IMAGES_SEED = 42  # upstream MMDetWandbHook's np.random.seed(42)


def eval_image_indices(dataset_len: int, num_eval_images: int) -> np.ndarray:
    """Upstream ``MMDetWandbHook``'s choice of validation images (shuffle with seed 42, take the first
    ``num_eval_images``), from a private ``RandomState``: numpy's global generator is left alone."""
    indices = np.arange(dataset_len)
    np.random.RandomState(EVAL_IMAGES_SEED).shuffle(indices)
    return indices[: max(0, min(num_eval_images, dataset_len))]


def instance_polygons(instance: Any) -> list[list[float]]:
    """One instance's COCO polygons as flat float lists; ``[]`` when it has none (missing, or RLE)."""
    if not isinstance(instance, (list, tuple)):
        return []
    return [np.asarray(poly, dtype=np.float64).ravel().tolist() for poly in instance]


def polygon_masks(instances: Iterable[Any] | None) -> list[list[list[float]]] | None:
    """Ground-truth masks of an image as the protocol carries them: per instance, its polygons."""
    if instances is None:
        return None
    return [instance_polygons(instance) for instance in instances]


def finish_run(client: SidecarClient, timeout: float, warn: Callable[..., Any] | None = None) -> bool:
    """Finish the client's run, waiting up to ``timeout`` s; on a timeout say what was left (``warn`` is a
    logger's ``warning``: the runner's, so it shows in the training log). Never raises."""
    if client.finish(exit_code=0, timeout=timeout):
        return True
    (warn or logging.getLogger("trainer_hook").warning)(
        "wandb sidecar did not acknowledge everything in %s s: %s", timeout, client.stats())
    return False


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]] | None:
    """Binary masks (n, H, W) → COCO RLEs (``size``, ``counts`` bytes), as the protocol carries them.

    None when pycocotools is missing or the masks cannot be encoded (the boxes still go out; logged)."""
    try:
        import pycocotools.mask as mask_util
    except ImportError:
        return None
    if len(masks) == 0:
        return []
    try:
        encoded = mask_util.encode(np.asfortranarray(np.asarray(masks).transpose(1, 2, 0).astype(np.uint8)))
    except Exception as exc:  # pycocotools raises bare Exception/TypeError on odd input
        logging.getLogger("trainer_hook").warning("predicted masks not encoded (%s: %s); boxes only",
                                                  type(exc).__name__, exc)
        return None
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in encoded]


class OrderedWorker:
    """One thread that runs jobs in the order they were submitted, off the training loop.

    At most ``max_queued`` jobs wait; ``submit`` beyond that waits for a slot (back-pressure on a trainer
    that outpaces it, never a lost job). A job that raises is logged and its future holds None.
    """

    def __init__(self, name: str, max_queued: int = 64) -> None:
        self._name = name
        self._slots = threading.BoundedSemaphore(max_queued)
        self._executor: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._executor is None:  # started on first use: after the dataloader workers' fork, usually
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._slots.acquire()
        try:
            future = self._executor.submit(self._run, fn, args)
        except BaseException:
            self._slots.release()
            raise
        self._last = future
        return future

    def _run(self, fn: Callable[..., Any], args: tuple) -> Any:
        try:
            return fn(*args)
        except Exception:
            logging.getLogger("trainer_hook").exception("%s: a job failed", self._name)
            return None
        finally:
            self._slots.release()

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every job submitted so far; True once all are done."""
        last = self._last
        if last is None:
            return True
        done, _ = wait([last], timeout=timeout)  # one thread, in order: the last done means all done
        return bool(done)

    def shutdown(self) -> None:
        """No new jobs; those queued still run (the thread is joined at interpreter exit)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
