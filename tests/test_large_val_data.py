"""Validation data above the 16 MiB body limit travels intact (image bytes in the blob frame, a large set in
parts), never dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protocol import Kind
from sidecar.readback import read_runs
from tests.sidecar_process import SidecarProcess
from trainer_hook import SidecarClient
from trainer_hook.val_data import VAL_PART_BYTES, val_data_body, val_data_parts


@pytest.mark.slow
def test_50_mib_of_validation_images_reach_the_val_table_intact(tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    data.mkdir()
    rng = np.random.default_rng(0)
    paths, pixels = [], []
    while sum(p.stat().st_size for p in paths) < 50 * 2**20:  # noise does not compress: ~4 MB a PNG
        image = rng.integers(0, 256, (1000, 1400, 3), dtype=np.uint8)
        path = data / f"{len(paths):03d}.png"
        Image.fromarray(image).save(path, compress_level=1)
        paths.append(path)
        pixels.append(image)
    n = len(paths)
    body = val_data_body(["thing"], [p.name for p in paths], [str(p) for p in paths],
                         [np.array([[1, 2, 30, 40]], np.float32)] * n, [np.zeros(1, np.int64)] * n,
                         [None] * n, send_image_bytes=True)
    with SidecarProcess(tmp_path / "sc", allow_roots=[tmp_path / "nothing-on-disk"]) as sidecar:
        client = SidecarClient(sidecar.addr, run_id="bigval", spill_dir=None)
        parts = val_data_parts(body)
        assert len(parts) >= 2 and sum(p.stat().st_size for p in paths) > VAL_PART_BYTES  # 50 MiB: in parts
        for part in parts:
            assert client.send(Kind.VAL_DATA, part)
        assert client.finish(timeout=300), client.stats()
        stats = client.stats()
        assert stats.get("dropped_unencodable", 0) == 0 and not any(k.startswith("rejected") for k in stats)
        sidecar.wait_for(lambda s: s["runs"]["bigval"]["state"] == "finished", timeout=300)
        assert sidecar.stop() == 0
    [val] = read_runs(sidecar.wandb_dir)["bigval"].artifacts
    table = json.loads(Path(val.files["val_data.table.json"]["local_path"]).read_text())
    assert [row[0] for row in table["data"]] == [p.name for p in paths]
    for (_, cell), expected in zip(table["data"], pixels):  # every image, every pixel (PNG is lossless)
        logged = Path(val.files[cell["path"]]["local_path"])
        assert np.array_equal(np.asarray(Image.open(logged)), expected)


def test_validation_parts_keep_every_image_in_order_within_the_part_size() -> None:
    sizes = [5, 1, 7, 3, 3, 9, 2]
    body = val_data_body(["a"], [f"im{i}" for i in range(len(sizes))], [], [np.zeros((1, 4), np.float32)] * 7,
                         [np.zeros(1, np.int64)] * 7, [[[[0.0, 0, 1, 0, 1, 1]]]] * 7, send_image_bytes=False)
    del body["image_paths"]
    body["image_bytes"] = [np.full(n, i, np.uint8) for i, n in enumerate(sizes)]
    parts = val_data_parts(body, part_bytes=8)
    assert [p["part"] for p in parts] == list(range(len(parts))) and {p["parts"] for p in parts} == {len(parts)}
    assert all(sum(map(len, p["image_bytes"])) <= 8 or len(p["image_bytes"]) == 1 for p in parts)  # 9 > 8: alone
    for key in ("image_names", "image_bytes", "gt_boxes", "gt_labels", "gt_masks"):
        assert [x for p in parts for x in p[key]] == body[key]  # every image once, in order
    assert all(p["class_names"] == ["a"] for p in parts)
    assert val_data_parts(body, part_bytes=100) == [body]
