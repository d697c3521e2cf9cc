"""``beamlora train``: LoRA or BeamLoRA on a real model and real data with ``transformers.Trainer``.

Reads top to bottom: data → split → model → LoRA → (BeamLoRA) → Trainer with callbacks →
final adapter. The run folder holds ``config.json`` (enough to rerun), ``metrics.jsonl`` (held-out
metrics at each evaluation), ``step-NNNNNN/`` snapshots, ``events.jsonl`` (BeamLoRA) and
``final/`` (a plain PEFT adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from beamlora import distributed
from beamlora.config import TrainConfig
from beamlora.errors import BeamLoraError
from beamlora.files import WriteError, failure_reason, user_path, writing
from beamlora.guards import check_metrics, guard_loss, schedule_warning, width_warning
from beamlora.resolve import Prepared, prepare, training_arguments
from beamlora.runfolder import CHECKPOINTS, HELD_OUT_STATE, Interrupted, RunFolder, signal_name, stop_on_signals
from beamlora.tasks import classification_parts, sft_parts
from rankscope.constants import METRICS_FILE, RUN_CONFIG
from rankscope.io.atomic import write_json, write_manifest, write_text
from rankscope.progress import LogProgress
from rankscope.tasks import models


@dataclass
class RunResult:
    run_dir: Path
    task: str  # "classification", "causal" (label words of a causal LM) or "sft"
    accuracy: float | None  # held-out accuracy at the end (None for sft)
    majority_rate: float | None  # accuracy of always answering the most common held-out label (None for sft)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0

    @property
    def final(self) -> dict[str, Any]:
        """The last held-out evaluation (sft: loss, perplexity, exact_match)."""
        return self.metrics[-1] if self.metrics else {}


# ----------------------------------------------------------------------------- task


# ----------------------------------------------------------------------------- the run


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _log_line(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it


def train(config: TrainConfig, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] = _log_line, resume: bool = False) -> RunResult:
    """Run one training job into ``config.out`` and return its held-out result.

    ``overwrite`` replaces an earlier beamlora run there, once this one has finished; ``resume``
    continues a killed run from its last complete checkpoint (see :mod:`beamlora.runfolder`).
    Warnings (settings that do nothing) go to ``log`` as ``Warning: ...`` lines. A training loss or
    held-out metric that becomes NaN or infinite stops the run with ``guards.NonFiniteError``
    naming the step; the snapshots written so far stay. SIGINT or SIGTERM stops it after writing a
    checkpoint (:class:`beamlora.runfolder.Interrupted`).
    """

    distributed.check_launch(config.fsdp, config.batch_size)  # --fsdp without torchrun: before anything loads
    # The hardware, the data and the steps (from epochs) are settled here: bad input fails before the run folder
    # is touched and before any model loads.
    prepared = prepare(config)
    config = prepared.config
    if config.method == "beamlora" and distributed.is_main() and (
            warning := schedule_warning(config.beamlora_config(None))):
        log(warning)
    distributed.init()
    folder = distributed.open_folder(lambda: RunFolder.open(config.out, overwrite=overwrite, resume=resume))
    try:
        for note in folder.notes:
            log(note)
        result = _train_in(folder, prepared, progress, log if distributed.is_main() else lambda line: None)
        distributed.barrier()  # every process has written its part before rank 0 finishes the folder
        with writing(folder.path):
            folder.finish()
        result.run_dir = folder.path
        return result
    except BaseException as e:
        failed = _failed_write(e, folder)
        kept = folder.abandon(write_failed=failed is not None)
        if failed is None:
            raise
        raise WriteError(failed.path, f"{failed.reason}; {kept}" if kept else failed.reason, failed.errno) from None
    finally:
        folder.close()
        distributed.close()


_DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def _failed_write(error: BaseException, folder: RunFolder) -> WriteError | None:
    """``error`` as a failed write (a full disk) of the run, naming the path the user knows; None if it is not one.

    Writes through our own code come as :class:`WriteError`; an ``OSError`` counts where it names a file of the run
    (the rank trace, say), not one the run only reads (a model's).
    """
    if isinstance(error, WriteError):
        return error
    reason = failure_reason(error)
    filename = getattr(error, "filename", None)
    if reason is None:
        return None
    code = getattr(error, "errno", None)
    if filename is None:  # a write to a file already open (the rank trace's append) names none
        return WriteError(folder.path, reason, code) if code in _DISK_ERRORS else None
    if not isinstance(filename, (str, os.PathLike)):
        return None
    named = Path(os.path.abspath(filename))
    path = Path(os.path.abspath(folder.path))
    if named == path.parent / f".{path.name}.lock":
        return WriteError(named, reason, code)
    for root in (Path(os.path.abspath(folder.work)), path):
        if named == root or root in named.parents:
            return WriteError(user_path(path / named.relative_to(root)), reason, code)
    return None


def _train_in(folder: Any, prepared: Prepared, progress: bool, log: Callable[[str], None]) -> RunResult:
    """The run itself, written into ``folder.work``."""
    config, data = prepared.config, prepared.data

    parts = (sft_parts(config, progress=progress, log=log, data=data) if config.task == "sft"
             else classification_parts(config, data))

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback

    # imported on use: torch, peft and transformers load only when training starts
    from beamlora.callbacks import BeamLoraCallback, CheckpointMarker, SnapshotCallback, StopOnRequest
    from beamlora.snapshots import write_adapter

    model, tokenizer, evaluate = parts.model, parts.tokenizer, parts.evaluate
    targets = config.peft_targets or models.default_targets(model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                      task_type=parts.peft_task_type)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise BeamLoraError(f"--targets {targets if isinstance(targets, str) else ','.join(targets)}: "
                            f"{str(e).splitlines()[0]}") from None
    keep_trainables_fp32(model)
    if warning := width_warning(model, config.rank):
        log(warning)

    run_dir = folder.work
    record = {**dataclasses.asdict(config), "targets": targets, **parts.record}
    if not distributed.is_main():
        pass  # rank 0 writes and checks config.json
    elif folder.resume_from is None and not (run_dir / RUN_CONFIG).is_file():
        with writing(run_dir / RUN_CONFIG):
            write_json(run_dir / RUN_CONFIG, {**record, "versions": _versions()})
    else:
        folder.check_same_run(record, [f.name for f in dataclasses.fields(TrainConfig)])

    callbacks: list[Any] = []
    controller = None
    if config.method == "beamlora":
        # imported on use: torch, peft and transformers load only when training starts
        from beamlora.controller import attach

        controller = attach(model, config.beamlora_config(run_dir))
        callbacks.append(BeamLoraCallback(controller))
    elif config.snapshot_every:
        callbacks.append(SnapshotCallback(config.snapshot_every, run_dir))
    if config.fsdp:  # after attach: the scores are sharded with the rest
        distributed.shard(model)
    if config.trace_every:  # after the BeamLoRA step: a record at an operation's step shows its result
        # imported on use: torch, peft and transformers load only when training starts
        from rankscope.telemetry.callback import RankMonitorCallback

        callbacks.append(RankMonitorCallback(every=config.trace_every, output_dir=run_dir, log=log))

    metrics: list[dict[str, Any]] = []

    class HeldOut(TrainerCallback):
        """Held-out metrics every eval_every steps and at the end, appended to metrics.jsonl, with the mean
        training-step loss since the previous evaluation; its state (the metrics so far, the losses since
        the last evaluation) goes into every checkpoint, so a resumed run writes the same numbers."""

        def __init__(self):
            self.losses: list[float] = []  # one a completed optimizer step
            self.loss_step: int | None = None  # the step the last entry of losses belongs to

        def add_loss(self, step: int, value: float) -> None:
            """A micro-batch's share of the loss of optimizer step ``step`` (Trainer scales each micro-batch's loss
            so that the shares of one step add up to its loss, whatever --grad-accum is)."""
            if self.losses and self.loss_step == step:
                self.losses[-1] += value
            else:
                self.losses.append(value)
            self.loss_step = step

        def state(self) -> dict[str, Any]:
            return {"metrics": metrics, "losses": self.losses}

        def restore(self, saved: dict[str, Any]) -> None:
            metrics[:] = saved["metrics"]
            self.losses = list(saved["losses"])
            self.write()

        def on_train_begin(self, args, state, control, **kwargs):
            if parts.eval_at_start and state.global_step == 0:
                self.record(0, kwargs["model"])

        def on_step_end(self, args, state, control, **kwargs):
            if (config.eval_every and state.global_step % config.eval_every == 0) or state.global_step == config.steps:
                self.record(state.global_step, kwargs["model"])

        def record(self, step: int, model: Any) -> None:
            # FSDP2: generation calls the inner model, not the sharded root, so the root's parameters stay gathered
            with distributed.gathered(model) if config.fsdp else contextlib.nullcontext():
                record = {"step": step, **evaluate(model)}
            if self.losses:
                record["train_loss"] = sum(self.losses) / len(self.losses)
                self.losses, self.loss_step = [], None
            check_metrics(record, step, run_dir)
            metrics.append(record)
            self.write()
            log("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

        def write(self) -> None:
            if not distributed.is_main():
                return
            with writing(run_dir / METRICS_FILE):
                write_text(run_dir / METRICS_FILE, "".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics))

    held_out = HeldOut()
    if folder.resume_from is not None:
        held_out.restore(json.loads((folder.resume_from / HELD_OUT_STATE).read_text()))
    every = config.checkpoint_every if config.checkpoint_every is not None else (
        config.snapshot_every or max(1, config.steps // 10))
    with stop_on_signals() as stop:
        callbacks += [held_out, StopOnRequest(stop, checkpoint=bool(every)),
                      CheckpointMarker(run_dir, lambda: {HELD_OUT_STATE: held_out.state()})]
        args = training_arguments(prepared, run_dir / CHECKPOINTS, every, progress)

        class CheckpointingTrainer(Trainer):
            """A checkpoint that cannot be written (a full disk) is one error naming its folder."""

            def _save_checkpoint(self, *given: Any, **named: Any) -> Any:
                with writing(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"):
                    return super()._save_checkpoint(*given, **named)

        if config.fsdp:  # each process checkpoints its own shards (see beamlora.distributed)
            CheckpointingTrainer = type("CheckpointingTrainer", (distributed.FsdpCheckpoints, CheckpointingTrainer), {})
        trainer = CheckpointingTrainer(model=model, args=args, train_dataset=parts.train_data,
                                       data_collator=parts.collate, callbacks=callbacks)
        if parts.peft_task_type == "SEQ_CLS":
            # A classifier's loss is the batch mean and ignores num_items_in_batch, but its forward takes **kwargs,
            # so Trainer would skip dividing by grad_accum: accumulated gradients would be grad_accum times too big.
            trainer.model_accepts_loss_kwargs = False
        quiet_logs(trainer, progress)
        guard_loss(trainer, run_dir, on_loss=lambda value: held_out.add_loss(trainer.state.global_step, value))
        trainer.train(resume_from_checkpoint=str(folder.resume_from) if folder.resume_from else None)
    if stop.signum is not None:
        where = ("a checkpoint was written: continue with the same command and --resume" if every
                 else "no checkpoint (--checkpoint-every 0)")
        raise Interrupted(f"interrupted by {signal_name(stop.signum)} at step {trainer.state.global_step}; {where}",
                          stop.signum)

    if controller is not None:
        controller.export(run_dir / "final")
    elif config.fsdp or distributed.is_main():  # FSDP2: every process gathers, rank 0 writes
        write_adapter(model, run_dir / "final")
    if not distributed.is_main():
        return RunResult(run_dir=run_dir, task=parts.kind, accuracy=None, majority_rate=None, metrics=metrics)
    with writing(run_dir / "final"):
        tokenizer.save_pretrained(str(run_dir / "final"))
        write_manifest(run_dir / "final", "adapter")  # the tokenizer's files are the adapter folder's too
    for name, text in (parts.files() if parts.files else {}).items():
        with writing(run_dir / name):
            write_text(run_dir / name, text)
    final = metrics[-1]
    return RunResult(run_dir=run_dir, task=parts.kind, accuracy=final.get("accuracy"), majority_rate=parts.baseline,
                     metrics=metrics, events=len(controller.events) if controller else 0)


def keep_trainables_fp32(model: Any) -> None:
    """Trainable weights in float32 whatever dtype the base was loaded in (--weights-dtype): PEFT keeps its LoRA
    weights float32 already; a task head it trains in full (modules_to_save) would otherwise be bf16 / fp16."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def quiet_logs(trainer: Any, progress: bool) -> None:
    """Keep Trainer's progress bar (on a terminal; in a log, a line every 10% or 30 s) but not its log dicts;
    held-out lines come from our own callback."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    class StepLines(TrainerCallback):
        """stderr is a file (CI, nohup): a few lines instead of a bar redrawn at every step."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.log = LogProgress(state.max_steps, "training", "optimizer steps")
            self.log.n = state.global_step  # a resumed run starts where it stopped

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.log.update(state.global_step - self.log.n)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly() if sys.stderr.isatty() else StepLines())


