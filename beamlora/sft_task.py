"""The sft task of ``beamlora train``: data, tokenizer and checks first, then the causal LM.

Bad input (a bad .jsonl line, an empty response, a model without a language-model head) ends in
one ``Error:`` line before the model's weights load; an over-long example and a tokenizer without a
pad token each get one line in the log, saying what was done.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from . import models, sft
from .errors import BeamLoraError
from .sft_data import load_sft_data

if TYPE_CHECKING:
    from .train import TaskParts, TrainConfig

GENERATIONS_FILE = "generations.jsonl"


def sft_parts(config: "TrainConfig", progress: bool = True, log: Callable[[str], None] = print) -> "TaskParts":
    from .train import TaskParts

    data = load_sft_data(config.data, config.held_out, config.seed)
    if len(data.train) < config.batch_size:
        raise BeamLoraError(f"{config.data}: {len(data.train)} training examples, expected at least one batch of "
                            f"{config.batch_size}")
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
    model, tokenizer = models.load_causal_lm(config.model, tokenizer)
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
