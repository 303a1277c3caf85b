"""Checkpoints of a compress run: ``compress(..., checkpoint=DIR, resume=True)`` continues where a killed
run stopped and gives the result the uninterrupted run would have given, bit for bit.

A checkpoint directory holds, each file written atomically when its stage ends:

    run.json                  what the run is (its fingerprint: config, data, the model's weights hash,
                              versions); a resume with anything different is refused
    statistics.safetensors    after the statistics stage
    planning.json             after planning (params/macs targets): each layer's method, ranks and predicted
                              damage, the probes' measurements, the budget curve, the stage timings
    fits/<hash>.safetensors   after each fitted layer: the factorized module's tensors, and its report entry
                              in the metadata

Sensitivities are measured again on resume (seconds; deterministic). Latency targets plan and fit in
measured rounds that depend on timings, so their resume point is the statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import DatdError, reading
from .io import atomic_path, read_json, write_json
from .layers import Cost
from .plan import Option
from .stats import Statistics

FORMAT = "datd-checkpoint/1"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): which weights a run started from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _canonical(obj: object) -> object:
    """``obj`` as it reads back from JSON (tuples become lists, ...), for comparing fingerprints."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class Checkpoint:
    """A run's progress in ``directory``. ``resume``: continue from what is there (if it is the same run);
    otherwise whatever is there is discarded when the run starts (``start``)."""

    def __init__(self, directory: str | os.PathLike, *, resume: bool = False):
        self.directory = Path(directory)
        self.resume = resume
        self.resumed: dict[str, object] = {}

    def start(self, fingerprint: dict) -> None:
        """Begin (or, with ``resume``, continue) the run described by ``fingerprint``."""
        run = self.directory / "run.json"
        fingerprint = {"format": FORMAT, **_canonical(fingerprint)}  # type: ignore[dict-item]
        if self.resume and run.is_file():
            saved = read_json(run)
            if saved != fingerprint:
                keys = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)) \
                    if isinstance(saved, dict) else ["format"]
                raise DatdError(f"the checkpoint in {self.directory} is of another run (it differs in: "
                                f"{', '.join(keys)}); run without --resume to start over")
            return
        if self.directory.exists():
            if not (self.directory / "run.json").is_file() and any(self.directory.iterdir()):
                raise DatdError(f"{self.directory} holds files that are not a datd checkpoint; choose another place")
            shutil.rmtree(self.directory)
        (self.directory / "fits").mkdir(parents=True)
        write_json(run, fingerprint)

    def remove(self) -> None:
        """The run is complete: its checkpoint is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- statistics ------------------------------------------------------------------------------------------

    def statistics(self) -> Statistics | None:
        path = self.directory / "statistics.safetensors"
        if not self.resume or not path.is_file():
            return None
        self.resumed["statistics"] = True
        return Statistics.load(path)

    def save_statistics(self, stats: Statistics) -> None:
        stats.save(self.directory / "statistics.safetensors")

    # -- planning --------------------------------------------------------------------------------------------

    def planning(self) -> dict | None:
        """{"choice": {layer: Option}, "probed": {layer: {(method, ranks): KL}}, "curve", "timings", "pruning"}
        or None."""
        path = self.directory / "planning.json"
        if not self.resume or not path.is_file():
            return None
        data = read_json(path)
        with reading(path):
            planning = {
                "choice": {n: Option(o["method"], tuple(o["ranks"]), Cost(**o["cost"]), o["damage"])
                           for n, o in data["choice"].items()},
                "probed": {n: {(m["method"], tuple(m["ranks"])): m["kl"] for m in ms} for n, ms in data["probed"].items()},
                "curve": data["curve"], "timings": data["timings"], "pruning": data.get("pruning"),
            }
        self.resumed["planning"] = True
        return planning

    def save_planning(self, choice: dict[str, Option], probed: dict[str, dict], curve: object,
                      timings: dict[str, float], pruning: dict | None = None) -> None:
        write_json(self.directory / "planning.json", {
            "choice": {n: {"method": o.method, "ranks": list(o.ranks), "cost": dataclasses.asdict(o.cost),
                           "damage": o.damage} for n, o in choice.items()},
            "probed": {n: [{"method": m, "ranks": list(r), "kl": kl} for (m, r), kl in ms.items()]
                       for n, ms in probed.items()},
            "curve": curve, "timings": timings, "pruning": pruning,
        })

    # -- fitted layers ---------------------------------------------------------------------------------------

    def _fit_path(self, name: str) -> Path:
        return self.directory / "fits" / f"{hashlib.sha1(name.encode()).hexdigest()[:20]}.safetensors"

    def fit(self, name: str) -> tuple[dict, dict[str, Tensor], dict] | None:
        """Layer ``name``'s result as ``save_fit`` kept it (its structure, its tensors, its report entry), or None."""
        path = self._fit_path(name)
        if not self.resume or not path.is_file():
            return None
        with reading(path), safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["datd"])
            if meta["name"] != name:
                raise DatdError(f"{path} holds layer '{meta['name']}', not '{name}'")
            state = {k: f.get_tensor(k) for k in f.keys()}
            entry = dict(meta["entry"], cost=Cost(**meta["entry"]["cost"]))
        self.resumed["fits"] = int(self.resumed.get("fits", 0)) + 1  # type: ignore[call-overload]
        return meta["structure"], state, entry

    def save_fit(self, name: str, structure: dict, state: dict[str, Tensor], entry: dict) -> None:
        """Keep layer ``name``'s result: its ``structure`` (JSON: how to rebuild its modules), their tensors and its
        report entry."""
        meta = {"name": name, "structure": structure, "entry": dict(entry, cost=dataclasses.asdict(entry["cost"]))}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(self._fit_path(name)) as tmp:
            save_file(state, str(tmp), metadata={"datd": json.dumps(meta)})
