"""``beamlora train`` on several processes: ``torchrun`` / ``accelerate launch``, DDP or FSDP2 (``--fsdp``).

A launch is recognised by the environment the launchers set (``WORLD_SIZE`` above 1, ``RANK``). Every
process trains; only rank 0 owns the run folder (its lock, config.json, metrics, snapshots, the final adapter)
and tells the others where to write. ``--batch-size`` is the global batch: each of N processes takes batch/N.

Under ``--fsdp`` the model is sharded here with PyTorch's ``fully_shard`` (FSDP2): every transformer block (the
classes the model names in ``_no_split_modules``), then the whole model, so the base weights, the LoRA
parameters and BeamLoRA's scores are all DTensors split along dim 0. transformers' Trainer is told the model
manages its own placement and gradient reduction (it skips the DDP wrap), and the checkpoints that ``--resume``
reads are written by :class:`FsdpCheckpoints`: each process saves its own shards, optimizer moments and random
state, so a resumed run continues bit for bit with the same number of processes. (accelerate's FSDP plugin
does not run on CPU processes, which is why beamlora wraps the model itself.)
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any, Iterator

from beamlora.errors import BeamLoraError

SHARDS = "fsdp-rank{rank}-of-{world}.pt"  # one file per process in each checkpoint folder


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched() -> bool:
    """True inside ``torchrun`` / ``accelerate launch`` with more than one process."""
    return world_size() > 1 and "RANK" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def check_launch(fsdp: bool, batch_size: int) -> None:
    """Options that need (or contradict) the launch, refused before anything loads."""
    if fsdp and not launched():
        raise BeamLoraError("--fsdp without a distributed launch (WORLD_SIZE is "
                            f"{os.environ.get('WORLD_SIZE', 'unset')}): expected torchrun --nproc-per-node N -m beamlora "
                            "train ... or accelerate launch -m beamlora train ... with N ≥ 2")
    if launched() and batch_size % world_size():
        raise BeamLoraError(f"--batch-size {batch_size} over {world_size()} processes: expected a multiple of "
                            f"{world_size()} (--batch-size is the global batch; each process takes batch / N)")


def init() -> None:
    """Join the launcher's process group (gloo on CPU, NCCL for CUDA tensors) before the run folder is opened."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def close() -> None:
    """Leave the process group this module joined (a process that exits inside one aborts under gloo)."""
    import torch.distributed as dist

    if launched() and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a picklable object)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Follower:
    """The run folder as a process other than rank 0 sees it: where to write, where to resume from; rank 0
    alone locks, checks, finishes or abandons it."""

    def __init__(self, work: Path, resume_from: Path | None):
        self.path = self.work = work
        self.resume_from = resume_from
        self.notes: list[str] = []

    def check_same_run(self, record: dict[str, Any], fields: list[str]) -> None:
        pass

    def finish(self) -> None:
        pass

    def abandon(self, write_failed: bool = False) -> str | None:
        return None

    def close(self) -> None:
        pass


def open_folder(opener: Any) -> Any:
    """Rank 0 opens the run folder (``opener()``); the others learn its work folder and checkpoint, or its
    error (then they stop quietly: rank 0 reports it)."""
    if not launched():
        return opener()
    if is_main():
        try:
            folder = opener()
        except BaseException:
            share({"error": True})
            raise
        share({"work": str(folder.work), "resume_from": None if folder.resume_from is None else str(folder.resume_from)})
        return folder
    shared = share(None)
    if shared.get("error"):
        raise SystemExit(2)
    return Follower(Path(shared["work"]), None if shared["resume_from"] is None else Path(shared["resume_from"]))


def blocks(model: Any) -> list[Any]:
    """The model's transformer blocks: modules of the classes it lists in ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    found = [m for m in base.modules() if type(m).__name__ in names]
    if not found:
        raise BeamLoraError(f"--fsdp: {type(base).__name__} names no transformer block class (_no_split_modules "
                            f"{sorted(names)}); expected a transformers model with repeated blocks to shard")
    return found


def shard(model: Any) -> Any:
    """FSDP2: ``fully_shard`` on every block, then on the whole model (LoRA parameters and BeamLoRA's scores
    included); marks the model so that transformers' Trainer leaves placement and gradient reduction to it."""
    import torch
    from torch.distributed.fsdp import fully_shard

    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    for block in blocks(model):
        fully_shard(block)
    # reshard_after_forward on the root too: an evaluation's forward pass (no backward) would otherwise leave the
    # root's parameters (the scores among them) gathered, and BeamLoRA's operations and checkpoints read them sharded.
    fully_shard(model, reshard_after_forward=True)
    model.is_distributed_loading_by_transformers = True  # Trainer: no DDP wrap, no .to(), FSDP2 reduces the gradients
    return model


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """The model's own (root) parameters whole meanwhile, for code that calls inner modules directly rather than
    the model itself (``generate`` calls the transformers model under PEFT, so the root's pre-forward hook, which
    gathers the embeddings, the head and BeamLoRA's scores, never runs). The blocks gather their own as usual."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False, recurse=False)  # a forward pass inside must not reshard it either
    model.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(True, recurse=False)
        model.reshard()


def _local(tensor: Any) -> Any:
    from rankscope.tasks.sharded import local

    return local(tensor).detach().clone().cpu()


class FsdpCheckpoints:
    """Mixed into transformers' Trainer under ``--fsdp``: checkpoints whose every process writes (and reads back)
    its own shards of the trainable parameters and of the optimizer's moments, its random state, and rank 0
    the scheduler and Trainer state; a resumed run continues as if never stopped (same number of processes)."""

    def _shard_file(self, folder: str | os.PathLike) -> Path:
        import torch.distributed as dist

        return Path(folder) / SHARDS.format(rank=dist.get_rank(), world=dist.get_world_size())

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        import numpy as np
        import torch
        from transformers.trainer import TRAINER_STATE_NAME

        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        optimizer = self.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = {n: _local(p) for n, p in self.model.named_parameters() if p.requires_grad}
        moments = {names[id(p)]: {k: _local(v) if torch.is_tensor(v) else v for k, v in state.items()}
                   for p, state in optimizer.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"params": params, "moments": moments, "groups": groups, "rng": rng,
                    "scheduler": self.lr_scheduler.state_dict()}, self._shard_file(folder))
        if self.args.should_save:
            self.state.save_to_json(str(folder / TRAINER_STATE_NAME))
        barrier()  # every shard is on disk before rank 0 marks the checkpoint complete

    def _saved(self, checkpoint: str) -> dict[str, Any]:
        import torch

        path = self._shard_file(checkpoint)
        if not path.is_file():
            raise BeamLoraError(f"--resume: {path} is missing; expected the checkpoint of a --fsdp run with the same "
                                "number of processes")
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy and python RNG states

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        import torch

        from rankscope.tasks.sharded import local

        saved = self._saved(resume_from_checkpoint)["params"]
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in saved:
                    local(param).copy_(saved[name])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        from rankscope.tasks.sharded import is_sharded

        if checkpoint is None:
            return
        saved = self._saved(checkpoint)
        optimizer = self.optimizer
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        for name, param in self.model.named_parameters():
            if name not in saved["moments"]:
                continue
            state = {}
            for key, value in saved["moments"][name].items():
                if torch.is_tensor(value) and value.dim() and is_sharded(param):
                    value = DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                                               run_check=False, shape=param.shape, stride=param.stride())
                state[key] = value
            optimizer.state[param] = state
        for group, values in zip(optimizer.param_groups, saved["groups"]):
            group.update(values)
        self.lr_scheduler.load_state_dict(saved["scheduler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        import numpy as np
        import torch

        if checkpoint is None:
            return
        rng = self._saved(checkpoint)["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        pass
