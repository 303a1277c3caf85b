"""Many layers' fits at once: forked worker processes, one torch thread each.

The iterative fits (Tucker-2, CP) of CIFAR-size and ImageNet-size layers are chains of small float64 products
and solves: a second torch thread speeds one fit up far less than a second fit beside it does (CIFAR ResNet-56,
2 cores: its 55 final fits took 26 s at one thread and 30 s at two), and threads in one process share the GIL.
So ``fit_many`` runs independent fits in ``workers`` processes forked from this one: they inherit the problems
(the weights and the D×D statistics) without a copy, and send back only the factors.

Every fit in a worker runs at one torch thread, whatever the number of workers, so the factors do not depend
on it (a fit in this process at this process's threads differs from them at round-off: ``workers=1`` keeps
that). Where forking is unsafe or useless the fits run here, one after another: not Linux (Windows has no
``fork``; macOS's system libraries are not fork-safe, which is why Python no longer forks there by default),
problems on a GPU, one worker, one fit.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .decompose import Decomposition, Grouped

# what the forked workers read: set just before the pool forks, cleared after it
_JOBS: Sequence[Callable[[], Decomposition]] = ()


def resolve_workers(requested: int) -> int:
    """The worker processes of ``requested`` (0: as many as this process's torch threads, which is what the
    user grants the run; under torchrun that is one per rank)."""
    if requested < 0:
        raise ValueError(f"workers must be >= 0, got {requested}")
    return requested or torch.get_num_threads()


def can_fork() -> bool:
    """Whether fits may run in forked workers here (Linux)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def fit_many(jobs: dict[Hashable, Callable[[], Decomposition]], workers: int, *,
             cost: Callable[[Hashable], float] | None = None, on_cpu: bool = True,
             progress: str | None = None) -> dict[Hashable, Decomposition]:
    """Run every job (a call that returns a ``Decomposition``) and return the results by key. With ``workers``
    ≥ 2, a CPU run and a ``fork`` start method, in that many forked processes at one torch thread each, the
    costliest (``cost``) first so that none is left alone at the end; else here, in order. ``progress``: the
    label of a progress bar over the jobs (None: none)."""
    keys = list(jobs)
    bar = tqdm(total=len(keys), desc=progress, unit="fit", disable=progress is None or not keys, leave=False)
    try:
        if workers < 2 or len(keys) < 2 or not on_cpu or not can_fork():
            return {k: _counted(jobs[k](), bar) for k in keys}
        if cost is not None:
            keys.sort(key=cost, reverse=True)
        global _JOBS
        _JOBS = [jobs[k] for k in keys]
        try:
            context = multiprocessing.get_context("fork")
            with context.Pool(min(workers, len(keys)), initializer=_one_thread) as pool:
                packed = [_counted(p, bar) for p in pool.imap(_run, range(len(keys)), chunksize=1)]
        finally:
            _JOBS = ()
        return {k: _unpack(p) for k, p in zip(keys, packed)}
    finally:
        bar.close()


def _counted(result, bar):
    bar.update()
    return result


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run(index: int) -> tuple:
    return _pack(_JOBS[index]())


def _pack(d: Decomposition) -> tuple:
    """A decomposition as plain data: (class, fields) with numpy arrays for tensors (so that no tensor goes
    through torch's shared-memory file descriptors), or ('grouped', parts)."""
    if isinstance(d, Grouped):
        return ("grouped", [_pack(p) for p in d.parts])
    values = {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}
    return (type(d), {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in values.items()})


def _unpack(packed: tuple) -> Decomposition:
    kind, values = packed
    if kind == "grouped":
        return Grouped([_unpack(p) for p in values])
    return kind(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()})
