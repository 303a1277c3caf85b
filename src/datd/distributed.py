"""Several processes or machines: ``torchrun … -m datd stats|compress …``.

Each rank reads every N-th batch of the calibration images (batch b goes to rank b mod N, N ranks), runs the
statistics pass on its share, and ``collect_stats`` all-reduces the float64 sums (gloo on CPU, NCCL on GPU), so
every rank ends with the statistics of all the images. Batches stay whole and of even size, so each image
keeps the fold (even/odd position) it has in a single process, and the result equals the single-process
statistics up to the order of the float64 sums. After the statistics a compress run continues on every rank
on the whole calibration set (sensitivities, planning, probes and fits are deterministic, so every rank
reaches the same model); rank 0 alone evaluates and writes the outputs.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .errors import DatdError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str | None) -> str | None:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, …),
    if any; return the device this rank uses (``cuda:LOCAL_RANK`` for a CUDA device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return device
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def finish() -> None:
    """Leave the process group (no collective follows the statistics, so no rank waits for another)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Shard(Iterable):
    """This rank's batches of ``loader``: batch b for b ≡ rank (mod world size). ``len()`` is their number."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.rank, self.world = rank(), world_size()
        if self.world > 1 and (loader.batch_size or 0) % 2:
            raise DatdError(f"under torchrun the batch size must be even (each image keeps its fold), got "
                            f"{loader.batch_size}")

    def __len__(self) -> int:
        return len(range(self.rank, len(self.loader), self.world))

    def __iter__(self) -> Iterator:
        if self.world == 1:
            yield from self.loader
            return
        sampler = list(self.loader.batch_sampler)  # type: ignore[arg-type]  (indices only: nothing decoded)
        mine = DataLoader(self.loader.dataset, batch_sampler=sampler[self.rank::self.world],
                          num_workers=self.loader.num_workers)
        yield from mine
