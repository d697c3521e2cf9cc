"""transformers ``TrainerCallback``s: BeamLoRA inside ``Trainer``, and snapshots for plain LoRA runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from beamlora.controller import BeamLoraController
from beamlora.errors import BeamLoraError
from beamlora.files import as_open_gives, writing
from beamlora.runfolder import COMPLETE, prune_checkpoints
from beamlora.snapshots import is_main_process, snapshot_dir, write_adapter
from rankscope.constants import STATE_FILE
from rankscope.io.atomic import write_json, write_with
from rankscope.tasks import sharded


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class BeamLoraCallback(TrainerCallback):
    """Runs ``controller.step`` after every optimizer step of a ``Trainer``.

    ``on_step_end`` fires once per optimizer step, so gradient accumulation counts optimizer
    steps, not micro-batches. Trainer checkpoints get ``beamlora_state.pt`` beside them, and a
    run resumed with ``resume_from_checkpoint`` restores it (Trainer has already reloaded the
    adapter and the optimizer by ``on_train_begin``).
    """

    def __init__(self, controller: BeamLoraController):
        self.controller = controller

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step == self.controller.step_count:
            return
        saved = _checkpoint_dir(args, state) / STATE_FILE
        if not saved.is_file():
            raise BeamLoraError(f"resuming at step {state.global_step} but {saved} is missing; expected the "
                                "beamlora_state.pt that BeamLoraCallback writes into every Trainer checkpoint")
        self.controller.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        self.controller.write_events()  # events a killed run wrote after this checkpoint are not this run's

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.controller.step(kwargs["optimizer"])
        if self.controller.step_count != state.global_step:
            raise BeamLoraError(f"BeamLoRA counted {self.controller.step_count} optimizer steps, Trainer "
                                f"{state.global_step}; attach a fresh controller for each run")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if is_main_process() or sharded.any_sharded(self.controller.scores()):  # FSDP2: every process gathers
            folder = _checkpoint_dir(args, state)
            state_dict = self.controller.state_dict()
            if not is_main_process():
                return
            with writing(folder / STATE_FILE):
                folder.mkdir(parents=True, exist_ok=True)
                write_with(folder / STATE_FILE, lambda tmp: torch.save(state_dict, tmp))


class SnapshotCallback(TrainerCallback):
    """Writes ``output_dir/step-NNNNNN/`` (a plain PEFT adapter) every ``every`` steps of a LoRA run.

    The same layout as BeamLoRA's snapshots, so rankscope compares the two runs step by step.
    """

    def __init__(self, every: int, output_dir: str | os.PathLike):
        if not isinstance(every, int) or every < 1:
            raise BeamLoraError(f"every={every!r}, expected a positive integer")
        self.every = every
        self.output_dir = Path(output_dir)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.every == 0 and (is_main_process() or sharded.any_sharded(kwargs["model"].parameters())):
            write_adapter(kwargs["model"], snapshot_dir(self.output_dir, state.global_step))


class StopOnRequest(TrainerCallback):
    """Ends training at the end of the step once a stop was requested (SIGINT / SIGTERM), with a checkpoint."""

    def __init__(self, request: Any, checkpoint: bool = True):
        self.request = request
        self.checkpoint = checkpoint

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.request.signum is not None:
            control.should_save = self.checkpoint
            control.should_training_stop = True


class CheckpointMarker(TrainerCallback):
    """Completes each Trainer checkpoint: ``extra()`` files (JSON), then ``complete.json`` last, then drops
    the older checkpoints. Register it after every callback that writes into checkpoints (BeamLoraCallback)."""

    def __init__(self, run_dir: str | os.PathLike, extra: Callable[[], dict[str, Any]]):
        self.run_dir = Path(run_dir)
        self.extra = extra

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not is_main_process():
            return
        folder = _checkpoint_dir(args, state)
        with writing(folder):
            for name, value in self.extra().items():
                write_json(folder / name, value)
            as_open_gives(folder)  # Trainer's safetensors files come out 0600
            write_json(folder / COMPLETE, {"step": state.global_step})
        prune_checkpoints(self.run_dir, keep=folder)
