"""``beamlora train``: LoRA or BeamLoRA on a real model and real data with ``transformers.Trainer``.

Reads top to bottom: data → split → model → LoRA → (BeamLoRA) → Trainer with callbacks →
final adapter. The run folder holds ``config.json`` (enough to rerun), ``metrics.jsonl`` (held-out
metrics at each evaluation), ``step-NNNNNN/`` snapshots, ``events.jsonl`` (BeamLoRA) and
``final/`` (a plain PEFT adapter).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rankscope.atomic import write_json, write_text
from rankscope.validate import check_run_config

from .data import TextDataset, load_data, majority_rate, split
from .errors import BeamLoraError

METHODS = ("lora", "beamlora")


TASKS = ("classification", "sft")
# What a field left at None means, per task. Classification: MiniLM on Rotten Tomatoes. sft: SmolLM2 on
# the generated arithmetic problems, sized for a CPU (see README: time per step, exact match before/after).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "minilm", "data": "rotten-tomatoes", "rank": 16, "alpha": 32.0, "steps": 300,
                       "batch_size": 16, "lr": 5e-4, "delta_t": 50, "held_out": 1000, "max_length": 64},
    "sft": {"model": "smollm2", "data": "arithmetic", "rank": 8, "alpha": 16.0, "steps": 150,
            "batch_size": 4, "lr": 1e-3, "delta_t": 20, "held_out": 100, "max_length": 128},
}


@dataclass
class TrainConfig:
    """One training run. The defaults are the embedded default task (a few minutes on 2 CPU cores).

    Fields left at None take the task's default (``TASK_DEFAULTS``); after construction every one
    holds a value, so ``config.json`` records what ran.

    Args:
        task: "classification" (a label per text) or "sft" (instruction tuning of a causal LM:
            prompt / response pairs, loss on the response, exact match of the final answer).
        model: "minilm" (sequence classification), "smollm2" (causal LM: prompt, label word as
            target; the sft default), a local folder with a transformers model, or a hub id.
        data: classification: "rotten-tomatoes" or a .csv/.jsonl file with text and label columns;
            sft: "arithmetic" (built in) or a .jsonl of {"prompt", "response"} or {"messages"}.
        method: "lora" or "beamlora".
        ablation: BeamLoRA only: "none", or one of the paper's Table 3 controls, "no-expansion",
            "random" or "fixed-p" (see :class:`beamlora.BeamLoraConfig`).
        targets: LoRA target modules; None picks the model's attention projections.
        held_out: examples kept out of training for evaluation (a fixed, seeded split).
        seed: an integer in 0 … 2**32 − 1 (what numpy and transformers' set_seed accept).
        max_length: tokens per training sequence (sft: prompt and response together).
        eval_every / snapshot_every: steps between held-out evaluations / adapter snapshots.
        checkpoint_every: steps between the checkpoints a killed run resumes from (``--resume``); None:
            at each snapshot (or every tenth of the run without snapshots); 0: none.
        trace_every: steps between rank-trace records (``rank_trace.jsonl``: importances and spectra,
            read by ``rankscope analyze`` as the dense time axis); None: no trace.
    """

    task: str = "classification"
    model: str | None = None
    data: str | None = None
    method: str = "beamlora"
    rank: int | None = None
    alpha: float | None = None
    targets: list[str] | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    p_init: float = 0.95
    delta_t: int | None = None
    temperature: float = 0.05
    scope: str = "global"
    optimizer_state: str = "history"
    ablation: str = "none"
    snapshot_every: int | None = 50
    eval_every: int | None = 100
    trace_every: int | None = 10
    checkpoint_every: int | None = None
    seed: int = 0
    held_out: int | None = None
    max_length: int | None = None
    out: str = "runs/default"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BeamLoraError(f"task {self.task!r}, expected one of {', '.join(TASKS)}")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.method not in METHODS:
            raise BeamLoraError(f"method {self.method!r}, expected one of {', '.join(METHODS)}")
        for name in ("rank", "steps", "batch_size", "held_out", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise BeamLoraError(f"{name}={value!r}, expected a positive integer")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise BeamLoraError(f"{name}={value!r}, expected a positive, finite number")
        if self.max_length < 8:
            raise BeamLoraError(f"max_length={self.max_length}, expected at least 8 tokens")
        if self.ablation != "none" and self.method != "beamlora":
            raise BeamLoraError(f"ablation={self.ablation!r} with method={self.method!r}: the ablations change "
                                "BeamLoRA's operations, expected method 'beamlora' (or ablation 'none')")
        # The BeamLoRA fields (p_init, Δt, ablation, seed, ...) are checked now, whatever the method, so
        # a bad option fails before anything is written.
        self.beamlora_config(None)

    def beamlora_config(self, output_dir: Path | None):
        from .config import BeamLoraConfig

        return BeamLoraConfig(p_init=self.p_init, delta_t=self.delta_t, total_steps=self.steps,
                              temperature=self.temperature, scope=self.scope, optimizer_state=self.optimizer_state,
                              ablation=self.ablation, seed=self.seed, snapshot_every=self.snapshot_every,
                              output_dir=output_dir)


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


@dataclass
class TaskParts:
    """What a task hands the shared training loop: a model, its data, and how to evaluate it."""

    model: Any
    tokenizer: Any
    train_data: Any  # a torch-style Dataset that ``collate`` batches
    collate: Callable[[list], dict]
    evaluate: Callable[[Any], dict[str, Any]]  # model -> held-out metrics
    kind: str  # RunResult.task
    peft_task_type: str  # "SEQ_CLS" or "CAUSAL_LM"
    record: dict[str, Any] = field(default_factory=dict)  # more fields for config.json
    baseline: float | None = None  # classification: the majority rate
    eval_at_start: bool = False  # also evaluate the untuned model (step 0)
    files: Callable[[], dict[str, str]] | None = None  # the task's own files for the run folder, at the end


# ----------------------------------------------------------------------------- task


def task_of(model_spec: str) -> str:
    """Causal LM for SmolLM2 and local *ForCausalLM folders, sequence classification otherwise."""
    name = str(model_spec).strip().lower()
    if name == "smollm2":
        return "causal"
    if name == "minilm":
        return "classification"
    config = Path(model_spec).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    return "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "classification"


class _Encoded:
    """A torch Dataset of tokenised examples (built lazily by the collators' needs)."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def encode_classification(dataset: TextDataset, tokenizer: Any, max_length: int) -> _Encoded:
    enc = tokenizer(dataset.texts, truncation=True, max_length=max_length)
    return _Encoded([{"input_ids": ids, "attention_mask": mask, "labels": label}
                     for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], dataset.labels)])


def encode_causal(dataset: TextDataset, tokenizer: Any, max_length: int) -> _Encoded:
    """Prompt then the label word; the loss falls on the label word only."""
    from .models import causal_prompt, label_word_ids

    words = label_word_ids(tokenizer, dataset.label_names)
    items = []
    for text, label in zip(dataset.texts, dataset.labels):
        prompt = tokenizer(causal_prompt(text))["input_ids"][-(max_length - 1):]  # keep "Sentiment:" at the end
        items.append({"input_ids": prompt + [words[label]], "labels": [-100] * len(prompt) + [words[label]]})
    return _Encoded(items)


def causal_collator(pad_id: int) -> Callable[[list[dict]], dict]:
    def collate(batch: list[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(x["input_ids"], pad_id) for x in batch]),
                "attention_mask": torch.tensor([pad([1] * len(x["input_ids"]), 0) for x in batch]),
                "labels": torch.tensor([pad(x["labels"], -100) for x in batch])}
    return collate


def classification_metrics(model: Any, encoded: _Encoded, collate: Callable, batch_size: int = 64) -> dict[str, float]:
    """Held-out accuracy and mean cross-entropy, in eval mode and without gradients."""
    import torch

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = {k: v.to(device) for k, v in collate(encoded.items[start:start + batch_size]).items()}
                out = model(**batch)
                labels = batch["labels"]
                correct += int((out.logits.argmax(-1) == labels).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum"))
                n += len(labels)
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "loss": loss_sum / n}


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


def _classification_parts(config: TrainConfig) -> TaskParts:
    """Sequence classification (or label words of a causal LM) on a labelled text set."""
    # Data first: bad input fails in a second, before any model loads.
    dataset = load_data(config.data)
    if len(dataset) <= config.held_out + config.batch_size:
        raise BeamLoraError(f"{config.data}: {len(dataset)} examples, expected more than held_out={config.held_out} "
                            f"+ one batch of {config.batch_size}")
    train_set, held_out = split(dataset, config.held_out, config.seed)
    kind = task_of(config.model)

    from transformers import DataCollatorWithPadding, set_seed

    from . import models

    set_seed(config.seed)
    if kind == "classification":
        model, tokenizer = models.load_classifier(config.model, len(dataset.label_names), seed=config.seed)
        train_data = encode_classification(train_set, tokenizer, config.max_length)
        eval_data = encode_classification(held_out, tokenizer, config.max_length)
        collate = DataCollatorWithPadding(tokenizer)
        evaluate = lambda m: classification_metrics(m, eval_data, collate)  # noqa: E731
    else:
        model, tokenizer = models.load_causal_lm(config.model)
        train_data = encode_causal(train_set, tokenizer, config.max_length)
        collate = causal_collator(tokenizer.pad_token_id)
        evaluate = lambda m: {"accuracy": models.causal_accuracy(m, tokenizer, held_out,  # noqa: E731
                                                                 max_length=config.max_length)}
    record = {"head": kind, "train_examples": len(train_set), "held_out_examples": len(held_out),
              "label_names": dataset.label_names}
    return TaskParts(model, tokenizer, train_data, collate, evaluate, kind,
                     "SEQ_CLS" if kind == "classification" else "CAUSAL_LM", record, baseline=majority_rate(held_out))


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
    from .guards import schedule_warning
    from .runfolder import RunFolder

    if config.method == "beamlora" and (warning := schedule_warning(config.beamlora_config(None))):
        log(warning)
    folder = RunFolder.open(config.out, overwrite=overwrite, resume=resume)
    try:
        for note in folder.notes:
            log(note)
        result = _train_in(folder, config, progress, log)
        folder.finish()
        result.run_dir = folder.path
        return result
    except BaseException:
        folder.abandon()
        raise
    finally:
        folder.close()


def _train_in(folder: Any, config: TrainConfig, progress: bool, log: Callable[[str], None]) -> RunResult:
    """The run itself, written into ``folder.work``."""
    from .guards import check_metrics, guard_loss, width_warning
    from .runfolder import CHECKPOINTS, HELD_OUT_STATE, Interrupted, signal_name, stop_on_signals

    if config.task == "sft":
        from .sft_task import sft_parts

        parts = sft_parts(config, progress=progress, log=log)
    else:
        parts = _classification_parts(config)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from . import models
    from .callbacks import BeamLoraCallback, CheckpointMarker, SnapshotCallback, StopOnRequest
    from .snapshots import write_adapter

    model, tokenizer, evaluate = parts.model, parts.tokenizer, parts.evaluate
    targets = config.targets or models.default_targets(model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                      task_type=parts.peft_task_type)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        raise BeamLoraError(f"--targets {','.join(targets)}: {str(e).splitlines()[0]}") from None
    if warning := width_warning(model, config.rank):
        log(warning)

    run_dir = folder.work
    record = {**dataclasses.asdict(config), "targets": targets, **parts.record}
    if folder.resume_from is None and not (run_dir / "config.json").is_file():
        write_json(run_dir / "config.json", {**record, "versions": _versions()})
    else:
        folder.check_same_run(record, [f.name for f in dataclasses.fields(TrainConfig)])

    callbacks: list[Any] = []
    controller = None
    if config.method == "beamlora":
        from .controller import attach

        controller = attach(model, config.beamlora_config(run_dir))
        callbacks.append(BeamLoraCallback(controller))
    elif config.snapshot_every:
        callbacks.append(SnapshotCallback(config.snapshot_every, run_dir))
    if config.trace_every:  # after the BeamLoRA step: a record at an operation's step shows its result
        from rankscope.monitor import RankMonitorCallback

        callbacks.append(RankMonitorCallback(every=config.trace_every, output_dir=run_dir, log=log))

    metrics: list[dict[str, Any]] = []

    class HeldOut(TrainerCallback):
        """Held-out metrics every eval_every steps and at the end, appended to metrics.jsonl, with the mean
        training-step loss since the previous evaluation; its state (the metrics so far, the losses since
        the last evaluation) goes into every checkpoint, so a resumed run writes the same numbers."""

        def __init__(self):
            self.losses: list[float] = []

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
            record = {"step": step, **evaluate(model)}
            if self.losses:
                record["train_loss"] = sum(self.losses) / len(self.losses)
                self.losses = []
            check_metrics(record, step, run_dir)
            metrics.append(record)
            self.write()
            log("  " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))

        def write(self) -> None:
            write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics))

    held_out = HeldOut()
    if folder.resume_from is not None:
        held_out.restore(json.loads((folder.resume_from / HELD_OUT_STATE).read_text()))
    every = config.checkpoint_every if config.checkpoint_every is not None else (
        config.snapshot_every or max(1, config.steps // 10))
    with stop_on_signals() as stop:
        callbacks += [held_out, StopOnRequest(stop, checkpoint=bool(every)),
                      CheckpointMarker(run_dir, lambda: {HELD_OUT_STATE: held_out.state()})]
        args = TrainingArguments(
            output_dir=str(run_dir / CHECKPOINTS), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            seed=config.seed, data_seed=config.seed, save_strategy="steps" if every else "no", save_steps=every or None,
            logging_steps=max(1, min(10, config.steps // 10)), report_to=[], disable_tqdm=not progress,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=parts.train_data, data_collator=parts.collate,
                          callbacks=callbacks)
        _quiet_logs(trainer, progress)
        guard_loss(trainer, run_dir, on_loss=lambda value: held_out.losses.append(value))
        trainer.train(resume_from_checkpoint=str(folder.resume_from) if folder.resume_from else None)
    if stop.signum is not None:
        where = ("a checkpoint was written: continue with the same command and --resume" if every
                 else "no checkpoint (--checkpoint-every 0)")
        raise Interrupted(f"interrupted by {signal_name(stop.signum)} at step {trainer.state.global_step}; {where}",
                          stop.signum)

    if controller is not None:
        controller.export(run_dir / "final")
    else:
        write_adapter(model, run_dir / "final")
    tokenizer.save_pretrained(str(run_dir / "final"))
    for name, text in (parts.files() if parts.files else {}).items():
        write_text(run_dir / name, text)
    final = metrics[-1]
    return RunResult(run_dir=run_dir, task=parts.kind, accuracy=final.get("accuracy"), majority_rate=parts.baseline,
                     metrics=metrics, events=len(controller.events) if controller else 0)


def _quiet_logs(trainer: Any, progress: bool) -> None:
    """Keep Trainer's progress bar but not its log dicts; held-out lines come from our own callback."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly())


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` a ``beamlora train`` run wrote, or None for folders made by other tools."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return None
    return check_run_config(data, path) if isinstance(data, dict) and "method" in data and "held_out" in data else None
