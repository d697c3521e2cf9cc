"""The tasks of ``beamlora train``: what each hands the shared training loop (:class:`TaskParts`).

Classification: a labelled text set, a classifier (or a causal LM's label words), accuracy. sft:
data, tokenizer and checks first, then the causal LM. Bad input (a bad .jsonl line, an empty response, a model without a language-model head) ends in
one ``Error:`` line before the model's weights load; an over-long example and a tokenizer without a
pad token each get one line in the log, saying what was done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from beamlora.errors import BeamLoraError
from rankscope.constants import GENERATIONS_FILE
from rankscope.tasks import models, sft
from rankscope.tasks.classification import causal_collator, classification_metrics, encode_causal, encode_classification
from rankscope.tasks.data import TextDataset, load_data, majority_rate, split
from rankscope.tasks.models import head_of
from rankscope.tasks.sft_data import SftData, load_sft_data

if TYPE_CHECKING:
    from beamlora.config import TrainConfig


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


def task_data(config: "TrainConfig") -> Any:
    """The task's data, read and checked (a FIFO, an unreadable file, a bad line is one error): the first thing a
    run does, before its folder is touched and before any model loads."""
    if config.task == "sft":
        data = load_sft_data(config.data, config.held_out, config.seed)
        if len(data.train) < config.batch_size:
            raise BeamLoraError(f"{config.data}: {len(data.train)} training examples, expected at least one batch "
                                f"of {config.batch_size}")
        return data
    dataset = load_data(config.data)
    if len(dataset) <= config.held_out + config.batch_size:
        raise BeamLoraError(f"{config.data}: {len(dataset)} examples, expected more than held_out={config.held_out} "
                            f"+ one batch of {config.batch_size}")
    return dataset


def sft_parts(config: "TrainConfig", progress: bool = True, log: Callable[[str], None] = print,
              data: SftData | None = None) -> TaskParts:
    """Instruction tuning; ``data``: what :func:`task_data` read (None: read it now)."""
    data = data if data is not None else task_data(config)
    models.check_causal_lm(config.model)  # from config.json: no weights loaded yet
    tokenizer, note = models.load_tokenizer(config.model)
    if note:
        log(f"note: {note}")
    train_set = sft.encode_all(data.train, tokenizer, config.max_length)
    held_out = sft.encode_all(data.held_out, tokenizer, config.max_length)
    for name, encoded in (("training", train_set), ("held-out", held_out)):
        note = sft.truncation_note(name, encoded, config.max_length)
        if note:
            log(f"note: {note}")

    from transformers import set_seed

    set_seed(config.seed)
    model, tokenizer = models.load_causal_lm(config.model, tokenizer, dtype=config.weights_dtype)
    keep_logits = sft.accepts_logits_to_keep(model)
    generations: list[dict[str, Any]] = []

    def evaluate(m: Any) -> dict[str, Any]:
        return sft.evaluate(m, tokenizer, held_out, progress=progress, generations=generations)

    def files() -> dict[str, str]:
        # The last evaluation's generations, to read what the model answers.
        return {GENERATIONS_FILE: "".join(json.dumps(g) + "\n" for g in generations)} if generations else {}

    answerable = len(sft.answerable(held_out))
    record = {"train_examples": len(train_set), "held_out_examples": len(held_out),
              "answerable_held_out": answerable, "truncated_train": train_set.truncated,
              "truncated_held_out": held_out.truncated, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
              "logits_to_keep": keep_logits}
    return TaskParts(model, tokenizer, train_set, sft.collator(tokenizer.pad_token_id, keep_logits), evaluate, "sft",
                     "CAUSAL_LM", record, eval_at_start=True, files=files)


def classification_parts(config: TrainConfig, dataset: TextDataset | None = None) -> TaskParts:
    """Sequence classification (or label words of a causal LM) on a labelled text set; ``dataset``: what
    :func:`task_data` read (None: read it now)."""
    # Data first: bad input fails in a second, before any model loads.
    dataset = dataset if dataset is not None else task_data(config)
    train_set, held_out = split(dataset, config.held_out, config.seed)
    kind = head_of(config.model)

    from transformers import DataCollatorWithPadding, set_seed


    set_seed(config.seed)
    if kind == "classification":
        model, tokenizer = models.load_classifier(config.model, len(dataset.label_names), seed=config.seed,
                                                  dtype=config.weights_dtype)
        train_data = encode_classification(train_set, tokenizer, config.max_length)
        eval_data = encode_classification(held_out, tokenizer, config.max_length)
        collate = DataCollatorWithPadding(tokenizer)
        evaluate = lambda m: classification_metrics(m, eval_data, collate)  # noqa: E731
    else:
        model, tokenizer = models.load_causal_lm(config.model, dtype=config.weights_dtype)
        train_data = encode_causal(train_set, tokenizer, config.max_length)
        collate = causal_collator(tokenizer.pad_token_id)
        evaluate = lambda m: {"accuracy": models.causal_accuracy(m, tokenizer, held_out,  # noqa: E731
                                                                 max_length=config.max_length)}
    record = {"head": kind, "train_examples": len(train_set), "held_out_examples": len(held_out),
              "label_names": dataset.label_names}
    return TaskParts(model, tokenizer, train_data, collate, evaluate, kind,
                     "SEQ_CLS" if kind == "classification" else "CAUSAL_LM", record, baseline=majority_rate(held_out))
