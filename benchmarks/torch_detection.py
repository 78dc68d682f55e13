"""Figure 4 without mmcv: a torchvision Mask R-CNN training loop with evaluation, checkpoints and the
logging ``MMDetWandbHook`` does, in three modes, the same model weights in each:

- ``none``: no wandb (checkpoints are saved all the same);
- ``inprocess``: wandb in the training process, as ``MMDetWandbHook`` does it: metrics every ``interval``
  iterations, the validation table once, a prediction table (boxes + masks) per evaluation, a checkpoint
  artifact per checkpoint (``sidecar.media`` builds the very tables upstream builds);
- ``sidecar``: this project: ``SidecarClient`` sends the same data to a sidecar process.

Each evaluation runs the model in eval mode on the validation images with the reference weights (the
initial ones, seeded: identical detections in every mode, so every mode logs the same tables); training
updates a copy. Reported per mode: wall time, time inside logging calls (the trainer's stall), checkpoint
save time. ``--size full`` is the GPU size (R50-FPN, 800 px, 300 iterations, 100 evaluation images every 100
iterations); ``--size tiny`` runs on a CPU in seconds (the test suite's smoke test).

    python -m benchmarks.torch_detection [--size tiny|full] [--modes none,inprocess,sidecar] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

CLASSES = ["circle", "square", "stripe", "blob", "dot"]


@dataclass
class Size:
    backbone: str
    image_px: int
    iterations: int
    batch: int
    eval_every: int
    eval_images: int
    interval: int  # metrics every this many iterations (MMDetWandbHook's default is 50)
    detections: int  # boxes kept per image
    box_head: int = 1024  # torchvision's default representation size (the tiny size shrinks it)


SIZES = {
    "full": Size("resnet50", 800, 300, 2, 100, 100, 10, 60),
    "tiny": Size("resnet18", 64, 2, 1, 2, 2, 1, 10, box_head=64),
}


def _synthetic(n: int, px: int, seed: int) -> list[dict[str, Any]]:
    """Images with 1-4 filled rectangles each, their boxes, labels and masks (numpy, deterministic)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 60, (px, px, 3), dtype=np.uint8)
        k = int(rng.integers(1, 5))
        boxes, masks = [], []
        for _ in range(k):
            x0, y0 = rng.integers(0, px * 3 // 4, 2)
            x1, y1 = x0 + rng.integers(px // 8, px // 4 + 1), y0 + rng.integers(px // 8, px // 4 + 1)
            image[y0:y1, x0:x1] = rng.integers(100, 256, 3, dtype=np.uint8)
            m = np.zeros((px, px), np.uint8)
            m[y0:y1, x0:x1] = 1
            boxes.append([x0, y0, x1, y1])
            masks.append(m)
        out.append({"image": image, "boxes": np.asarray(boxes, np.float32),
                    "labels": rng.integers(0, len(CLASSES), k).astype(np.int64), "masks": np.stack(masks)})
    return out


def _model(size: Size, device: str):  # type: ignore[no-untyped-def]
    import torch
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name=size.backbone, weights=None, trainable_layers=5)
    model = MaskRCNN(backbone, num_classes=len(CLASSES) + 1, min_size=size.image_px, max_size=size.image_px,
                     box_score_thresh=0.0, box_detections_per_img=size.detections)
    if size.box_head != 1024:
        model.roi_heads.box_head = TwoMLPHead(backbone.out_channels * 7 * 7, size.box_head)
        model.roi_heads.box_predictor = FastRCNNPredictor(size.box_head, len(CLASSES) + 1)
    return model.to(device)


class Stall:
    """Time spent inside logging calls: what the trainer waits for."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def _rles(masks: np.ndarray) -> list[dict[str, Any]]:
    import pycocotools.mask as mask_util

    if len(masks) == 0:
        return []
    encoded = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in encoded]


def run(mode: str, size: Size, work: Path, image_paths: list[str], val: list[dict[str, Any]],
        train: list[dict[str, Any]], reference: dict[str, Any], device: str, addr: str = "") -> dict[str, Any]:
    import torch

    model = _model(size, device)
    model.load_state_dict(reference)
    evaluator = copy.deepcopy(model).eval()  # the reference weights: the same detections in every mode
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    stall, ckpt_s = Stall(), 0.0
    val_body = {"class_names": CLASSES, "image_names": [Path(p).name for p in image_paths], "image_paths": image_paths,
                "gt_boxes": [v["boxes"] for v in val], "gt_labels": [v["labels"] for v in val],
                "gt_masks": [[[[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
                              for x0, y0, x1, y1 in v["boxes"]] for v in val]}
    run_ = client = media = None
    t_start = time.perf_counter()
    with stall():
        if mode == "inprocess":
            import wandb

            from sidecar.media import MediaBuilder
            from sidecar.wandb_sink import FileGuard

            run_ = wandb.init(project="torch-detection", mode="offline", dir=str(work), reinit="create_new",
                              settings=wandb.Settings(console="off"))
            media = MediaBuilder(run_, FileGuard([work]))
            media.val_table(val_body)  # upstream logs the validation table before training starts
        elif mode == "sidecar":
            from protocol import Kind
            from trainer_hook import SidecarClient

            client = SidecarClient(addr, init_kwargs={"project": "torch-detection"}, spill_dir=None)
            client.send(Kind.VAL_DATA, val_body)
    model.train()
    detections = []
    for it in range(1, size.iterations + 1):
        batch = [train[(it * size.batch + j) % len(train)] for j in range(size.batch)]
        images = [torch.from_numpy(b["image"]).permute(2, 0, 1).float().div(255).to(device) for b in batch]
        targets = [{"boxes": torch.from_numpy(b["boxes"]).to(device), "labels": torch.from_numpy(b["labels"] + 1).to(device),
                    "masks": torch.from_numpy(b["masks"]).to(device)} for b in batch]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if it % size.interval == 0:
            row = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
            row["train/loss"] = float(loss.detach())
            with stall():
                if run_ is not None:
                    run_.log(row, step=it)
                elif client is not None:
                    client.log(row, step=it)
        if it % size.eval_every == 0:
            preds = _evaluate(evaluator, val, device)  # evaluation: not logging (RLE encoding included)
            detections.append(sum(len(p["boxes"]) for p in preds))
            path = work / f"iter_{it}.pth"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
            ckpt_s += time.perf_counter() - t0
            body = {"tag": f"iter_{it}", "indices": list(range(len(preds))), "boxes": [p["boxes"] for p in preds],
                    "scores": [p["scores"] for p in preds], "labels": [p["labels"] for p in preds],
                    "masks": [p["masks"] for p in preds], "score_thr": 0.3, "aliases": ["latest", f"iter_{it}"]}
            with stall():
                if run_ is not None and media is not None:
                    import wandb

                    run_.log({"val/detections": detections[-1]}, step=it)
                    media.pred_table(body)
                    art = wandb.Artifact(f"run_{run_.id}_model", type="model", metadata={"iter": it})
                    art.add_file(str(path))
                    run_.log_artifact(art, aliases=[f"iter_{it}", "latest"])
                elif client is not None:
                    from protocol import Kind

                    client.log({"val/detections": detections[-1]}, step=it)
                    client.send(Kind.PRED_BATCH, body)
                    client.log_checkpoint(path, aliases=[f"iter_{it}", "latest"], metadata={"iter": it})
    with stall():
        if run_ is not None:
            run_.finish()
        elif client is not None:
            client.finish(timeout=600)
    wall = time.perf_counter() - t_start
    return {"mode": mode, "wall_s": wall, "logging_stall_s": stall.seconds, "checkpoint_save_s": ckpt_s,
            "detections_per_eval": detections, "client_stats": client.stats() if client is not None else None}


def _evaluate(model, val: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    import torch

    out = []
    with torch.no_grad():
        for v in val:
            image = torch.from_numpy(v["image"]).permute(2, 0, 1).float().div(255).to(device)
            pred = model([image])[0]
            masks = (pred["masks"][:, 0] > 0.5).to(torch.uint8).cpu().numpy()
            out.append({"boxes": pred["boxes"].cpu().numpy().astype(np.float32),
                        "scores": pred["scores"].cpu().numpy().astype(np.float32),
                        "labels": (pred["labels"].cpu().numpy() - 1).astype(np.int64), "masks": _rles(masks)})
    return out


def benchmark(size_name: str, modes: list[str], root: Path) -> dict[str, Any]:
    import torch
    from PIL import Image

    from tests.sidecar_process import SidecarProcess

    size = SIZES[size_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    val = _synthetic(size.eval_images, size.image_px, seed=1)
    train = _synthetic(max(8, size.batch * 4), size.image_px, seed=2)
    paths = []
    for i, v in enumerate(val):
        p = data / f"val_{i:04d}.jpg"
        Image.fromarray(v["image"]).save(p, quality=90)
        paths.append(str(p))
    reference = {k: v.clone() for k, v in _model(size, device).state_dict().items()}
    results = []
    os.environ.setdefault("WANDB_SILENT", "true")
    with SidecarProcess(root / "sidecar", allow_roots=[root]) as sidecar:
        for mode in modes:
            work = root / f"work-{mode}"
            work.mkdir()
            results.append(run(mode, size, work, paths, val, train, reference, device, sidecar.addr))
        assert sidecar.stop(1800) == 0
    return {"size": size_name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "config": size.__dict__, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--modes", default="none,inprocess,sidecar")
    p.add_argument("--out", default="")
    p.add_argument("--root", default="", help="keep every file (data, wandb runs) here; default: a temp dir")
    a = p.parse_args()
    if a.root:
        out = benchmark(a.size, a.modes.split(","), Path(a.root))
    else:
        with tempfile.TemporaryDirectory(prefix="torch-detection-") as tmp:
            out = benchmark(a.size, a.modes.split(","), Path(tmp))
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
