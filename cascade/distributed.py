"""Data-parallel runs: the processes ``torchrun`` starts, seen from the rest of the package.

    torchrun --nproc-per-node 2 -m cascade.cli train CONFIG --experiment NAME

Every process runs the same command on the same data. ``cascade.cli`` joins the process group
(gloo on CPU, nccl where CUDA exists); the Trainer then wraps each step in PyTorch's
DistributedDataParallel and gives each rank its share of every global batch (``train.batch_size``
rows in all, as one process would take), so the weights follow the single-process run on the
same global batch. The rules that keep the ranks out of each other's way:

* rank 0 alone writes files (``store.write_atomic`` and the Trainer's logs are no-ops elsewhere);
* work that fills a cache others read (a data set, a frozen stage trained on the way) runs under
  ``rank_zero_first``: rank 0 does it alone, single-process, while the others wait, then they run
  the same code and find the cache;
* validation runs on rank 0 and its metrics are broadcast, so every rank stops at the same epoch.

This module imports torch only where a process group exists (``torch.distributed`` already
loaded), so the data commands stay light.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

_SOLO = False  # inside rank_zero_first: this process trains alone


def _dist():
    """``torch.distributed`` when a process group is up, else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_writer() -> bool:
    """Whether this process writes files: always, except ranks other than 0 of a group."""
    return rank() == 0


def data_parallel() -> bool:
    """Whether training here is split across the group (not inside ``rank_zero_first``)."""
    return world_size() > 1 and not _SOLO


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (once)."""
    if not launched() or _dist() is not None:
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    dist = _dist()
    if dist is not None and not _SOLO:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    dist = _dist()
    if dist is None or _SOLO:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list:
    """Every rank's ``value``, in rank order (``[value]`` alone)."""
    dist = _dist()
    if dist is None or _SOLO:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the body on rank 0 alone (training in it single-process), then on the other ranks,
    which find what rank 0 wrote. A no-op outside a group or when already inside one."""
    global _SOLO
    if _dist() is None or _SOLO:
        yield
        return
    if rank() == 0:
        _SOLO = True
        try:
            yield
        finally:
            _SOLO = False
        barrier()
    else:
        barrier()
        _SOLO = True  # nothing it runs may wait on rank 0, which has moved on
        try:
            yield
        finally:
            _SOLO = False
