"""Distributed MMDetection 2.x training on CPU (gloo), for tests: as shipped, mmdet 2.x is CUDA-only there.

``train_detector``, the runner and ``DistEvalHook`` stay unmodified; only what assumes CUDA is swapped:
the DDP wrapper (``build_ddp``: the inputs are moved to the CPU as mmcv's single-process wrapper does) and
mmdet's seed sync (a broadcast of a CUDA tensor). The process group is made here, from ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (as ``torchrun`` sets them).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch.distributed as dist
from mmcv.parallel import MMDistributedDataParallel
from mmcv.parallel.scatter_gather import scatter_kwargs
from mmcv.runner import HOOKS, Hook


class CpuDistributedDataParallel(MMDistributedDataParallel):
    """mmcv's DDP wrapper without devices: ``DataContainer`` inputs unwrapped on the CPU first."""

    def _on_cpu(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        inputs, kwargs = scatter_kwargs(inputs, kwargs, [-1], dim=self.dim)
        return inputs[0], kwargs[0]

    def _run_ddp_forward(self, *inputs: Any, **kwargs: Any) -> Any:  # mmcv's reads an attribute torch 2 dropped
        inputs, kwargs = self._on_cpu(inputs, kwargs)
        return self.module(*inputs, **kwargs)

    def train_step(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs, kwargs = self._on_cpu(inputs, kwargs)
        return super().train_step(*inputs, **kwargs)

    def val_step(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs, kwargs = self._on_cpu(inputs, kwargs)
        return super().val_step(*inputs, **kwargs)


def _build_cpu_ddp(model: Any, device: str = "cpu", *args: Any, **kwargs: Any) -> CpuDistributedDataParallel:
    kwargs.pop("device_ids", None)
    return CpuDistributedDataParallel(model, *args, device_ids=None, **kwargs)


def start() -> int:
    """Make the gloo process group and swap mmdet's CUDA-only pieces; returns this process's rank."""
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    importlib.import_module("mmdet.apis.train").build_ddp = _build_cpu_ddp
    from mmdet.core.utils import dist_utils

    sync = dist_utils.sync_random_seed

    def cpu_seed_sync(seed: int | None = None, device: str = "cpu") -> int:
        return sync(seed, device="cpu")

    for name in ("mmdet.datasets.samplers.distributed_sampler", "mmdet.datasets.samplers.infinite_sampler",
                 "mmdet.datasets.samplers.class_aware_sampler"):
        module = importlib.import_module(name)
        if hasattr(module, "sync_random_seed"):
            module.sync_random_seed = cpu_seed_sync
    return dist.get_rank()


def end() -> None:
    """Every rank meets, then leaves the group: without it a gloo rank can abort at exit."""
    dist.barrier()
    dist.destroy_process_group()


@HOOKS.register_module()
class LogBufferProbeHook(Hook):
    """After every training iteration (after the logger hooks), note whether the runner's log buffer still
    holds an output: a logger hook that skips a rank leaves it there (mmdet#8145)."""

    seen: list[tuple[bool, int]] = []

    def after_train_iter(self, runner: Any) -> None:
        LogBufferProbeHook.seen.append((bool(runner.log_buffer.ready), len(runner.log_buffer.output)))
