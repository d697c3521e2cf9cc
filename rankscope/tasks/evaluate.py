"""The evaluations behind ``rankscope sweep``: a base model with the adapter loaded, and a metric.

Built-in tasks: held-out accuracy (or loss) on the classification default (MiniLM, SmolLM2 as a
causal LM with label words, or a local model), loss / perplexity of a causal LM on a text
or JSONL file, and for instruction tuning (``beamlora train --task sft``) exact match of the final
answer by greedy generation or loss / perplexity on the response tokens. For a ``beamlora train``
run folder, the model, data and held-out split default to the ones the run used, so the sweep
evaluates on exactly the examples training never saw.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rankscope.errors import RankscopeError
from rankscope.io.loading import Checkpoint
from rankscope.io.validate import json_lines
from rankscope.tasks import models, sft
from rankscope.tasks.classification import classification_metrics, encode_classification
from rankscope.tasks.data import load_data, open_data_file, split
from rankscope.tasks.models import head_of
from rankscope.tasks.placement import Placement
from rankscope.tasks.runconfig import TASK_DEFAULTS
from rankscope.tasks.sft_data import load_sft_data, read_jsonl

METRICS = ("accuracy", "exact_match", "loss", "perplexity")
TEXT_MAX_LENGTH = 256  # tokens per text when a causal LM is scored on a plain text file (no run to take it from)


@dataclass
class Evaluation:
    """A model with the adapter loaded and how to measure it: ``evaluate(model)`` gives the metric."""

    model: Any
    evaluate: Callable[[Any], float]
    metric: str
    higher_is_better: bool
    description: str


def load_error(error: Exception) -> str:
    """The line of a loading error that says what differs: torch's ``Error(s) in loading state_dict for X:`` is
    followed by the ``size mismatch for ...`` lines that matter (the first, and how many more)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    if not details:
        return lines[0] if lines else type(error).__name__
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return details[0].rstrip(".") + more + ": expected an adapter trained on this model and task (the same labels)"


def check_fits(base: Any, checkpoint: Checkpoint) -> None:
    """Every adapter module exists in ``base`` with matching shapes; name the first that does not."""
    modules = dict(base.named_modules())
    for module in checkpoint.modules:
        name = module.name.removeprefix("base_model.model.")
        target = modules.get(name)
        if target is None:
            raise RankscopeError(f"the adapter's module {module.name} is not in the model ({type(base).__name__}): "
                                 "the adapter does not fit this base model")
        weight = getattr(target, "weight", None)
        if weight is None or weight.dim() < 2:
            continue
        shape = tuple(weight.shape[:2])
        if type(target).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            shape = shape[::-1]
        if module.layer_type == "embedding":
            shape = shape[::-1]  # nn.Embedding is (num, dim); the adapter's "in" is num
        if shape != (module.out_features, module.in_features):
            raise RankscopeError(f"the adapter's module {module.name} is {module.out_features}×{module.in_features} "
                                 f"but the model's {name} is {shape[0]}×{shape[1]}: the adapter does not fit this "
                                 "base model")


def _texts_from_file(path: Path) -> list[str]:
    """Texts of a .txt (blank-line separated paragraphs) or .jsonl (a "text" field) file.

    It must be a regular file: a FIFO (which would block), a folder or a device is refused unopened.
    """
    expected = "a readable UTF-8 .txt or .jsonl file"
    with open_data_file(path, expected) as f:
        try:
            raw = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RankscopeError(f"{path}: cannot read the data file ({type(e).__name__}): expected {expected}") \
                from None
    if path.suffix.lower() == ".jsonl":
        texts = []
        for n, obj in json_lines(raw.splitlines(), path, "one object with a 'text' field a line"):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RankscopeError(f"{path}: line {n} has no 'text' string: expected one object with a 'text' field a line")
            texts.append(obj["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise RankscopeError(f"{path}: no text found: expected paragraphs (.txt) or a 'text' field per line (.jsonl)")
    return texts


def causal_lm_loss(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood over every token of ``texts`` (nats per token)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # pads after the text: positions match an unpadded pass
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, keep = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
    finally:
        tokenizer.padding_side = side
    if count == 0:
        raise RankscopeError("the data holds no token to predict: expected texts of at least two tokens")
    return total / count


def default_metric(run_config: dict[str, Any] | None) -> str:
    """exact_match for an instruction-tuning run, accuracy otherwise."""
    return "exact_match" if (run_config or {}).get("task") == "sft" else "accuracy"


def _with_adapter(base: Any, checkpoint: Checkpoint, model_spec: str, placement: Placement) -> Any:
    """``base`` with the checkpoint's adapter loaded by PEFT, on the placement's device, in eval mode.

    The base is in the placement's dtype; PEFT keeps the adapter's own weights in float32 on a bf16/fp16
    base (its ``autocast_adapter_dtype``), as mixed-precision training keeps them.
    """
    check_fits(base, checkpoint)
    from peft import PeftModel

    base = base.to(placement.device)  # loaded there already (device_map); the LoRA layers are created beside it
    try:
        model = PeftModel.from_pretrained(base, str(checkpoint.path.parent))
    except (ValueError, RuntimeError, KeyError) as e:
        raise RankscopeError(f"the adapter does not load onto {model_spec}: {load_error(e)}") from None
    return model.to(placement.device).eval()


def build_evaluation(checkpoint: Checkpoint, model_spec: str | None, data: str | None, metric: str | None,
               examples: int | None, run_config: dict[str, Any] | None,
               placement: Placement | None = None) -> Evaluation:
    """Load the base model, put the adapter on it, and choose the evaluation (``metric`` None: the run's own).

    ``placement`` (from :func:`rankscope.tasks.placement.resolve_placement`): the device and dtype the base
    model is loaded in and the evaluation batch size; None: the CPU in float32, each metric's own batch size.
    """
    hub_model = model_spec or (run_config or {}).get("model")
    if hub_model and models.is_hub_id(hub_model):
        models.model_path(hub_model)  # a hub id: fetched (or found in the cache) now, before the rest runs offline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    placement = placement or Placement()
    batch = {} if placement.batch_size is None else {"batch_size": placement.batch_size}
    metric = metric or default_metric(run_config)
    if metric not in METRICS:
        raise RankscopeError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    if checkpoint.format != "peft":
        raise RankscopeError(f"{checkpoint.path} is a {checkpoint.format} checkpoint: sweeps load the adapter with PEFT, "
                             "expected a PEFT adapter folder")
    run_config = run_config or {}
    model_spec = model_spec or run_config.get("model")
    if not model_spec:
        raise RankscopeError("no base model: pass --model minilm|smollm2|FOLDER (the adapter's run has no config.json)")
    if run_config.get("task") == "sft" or metric == "exact_match":
        return _sft_task(checkpoint, model_spec, data, metric, examples, run_config, placement)
    data = data or run_config.get("data") or "rotten-tomatoes"


    head = head_of(model_spec)
    suffix = Path(data).suffix.lower()
    # Plain text (or JSONL text for a causal LM's loss) is scored token by token; the rest is labelled data.
    use_texts = suffix == ".txt" or (suffix == ".jsonl" and head == "causal" and metric != "accuracy")
    text_file = Path(data) if use_texts else None
    if metric == "accuracy" and suffix == ".txt":
        raise RankscopeError(f"{data}: accuracy needs labelled data (.csv/.jsonl with text and label), found a text file")

    labelled = texts = None
    if text_file is not None:  # read and checked before any model loads
        texts = _texts_from_file(text_file)[: examples or None]
    else:

        dataset = load_data(data)
        same_run = run_config.get("data") == data
        seed = int(run_config.get("seed", 0)) if same_run else 0
        default_held = TASK_DEFAULTS["classification"]["held_out"]
        held = int(run_config.get("held_out", default_held)) if same_run else min(default_held, len(dataset) // 5)
        _, labelled = split(dataset, held, seed)
        if examples:
            labelled = labelled.subset(range(min(examples, len(labelled))))

    if head == "classification":
        if text_file is not None:
            raise RankscopeError(f"{model_spec} is a classifier: loss/perplexity on a text file need a causal LM")
        base, tokenizer = models.load_classifier(model_spec, len(labelled.label_names), dtype=placement.precision,
                                                  device=placement.device)
    else:
        base, tokenizer = models.load_causal_lm(model_spec, dtype=placement.precision, device=placement.device)
    model = _with_adapter(base, checkpoint, model_spec, placement)
    max_length = int(run_config.get("max_length", TASK_DEFAULTS["classification"]["max_length"]
                                    if head == "classification" else TEXT_MAX_LENGTH))

    if texts is not None:
        loss = lambda m: causal_lm_loss(m, tokenizer, texts, max_length, **batch)  # noqa: E731
        evaluate = loss if metric == "loss" else (lambda m: math.exp(loss(m)))
        return Evaluation(model, evaluate, metric, False, f"{metric} on {len(texts)} texts of {text_file}")
    what = f"{len(labelled)} held-out examples of {data}"
    if head == "classification":
        from transformers import DataCollatorWithPadding


        encoded = encode_classification(labelled, tokenizer, max_length)
        collate = DataCollatorWithPadding(tokenizer)
        key = "accuracy" if metric == "accuracy" else "loss"

        def evaluate(m: Any) -> float:
            value = classification_metrics(m, encoded, collate, **batch)[key]
            return math.exp(value) if metric == "perplexity" else value
    else:
        if metric != "accuracy":
            raise RankscopeError(f"metric {metric} on labelled data needs a classifier; for a causal LM pass a .txt "
                                 "or .jsonl text file as --data, or use --metric accuracy")
        evaluate = lambda m: models.causal_accuracy(m, tokenizer, labelled, max_length=max_length, **batch)  # noqa: E731
    return Evaluation(model, evaluate, metric, metric == "accuracy", what)


def _sft_task(checkpoint: Checkpoint, model_spec: str, data: str | None, metric: str, examples: int | None,
              run_config: dict[str, Any], placement: Placement) -> Evaluation:
    """Exact match, or loss / perplexity on the response tokens, of prompt / response examples.

    For a ``beamlora train --task sft`` run, the run's own held-out split (same data, size and
    seed), tokenised with its ``max_length`` as during training.
    """

    if metric == "accuracy":
        raise RankscopeError("an instruction-tuning (sft) adapter has no accuracy: expected --metric exact_match, "
                             "loss or perplexity")
    sft_run = run_config.get("task") == "sft"
    data = data or (run_config.get("data") if sft_run else None)
    if not data:
        raise RankscopeError("exact match needs prompt/response data: pass --data arithmetic or a .jsonl of "
                             "prompt/response or messages lines")
    if sft_run and data == run_config.get("data"):
        held = load_sft_data(data, int(run_config["held_out"]), int(run_config.get("seed", 0))).held_out
        what = f"held-out examples of {data}"
    elif data.strip().lower() == "arithmetic":
        held = load_sft_data(data, examples or TASK_DEFAULTS["sft"]["held_out"], 0).held_out
        what = "held-out arithmetic problems"
    else:
        held = read_jsonl(data)
        what = f"examples of {data}"
    held = held[: examples or None]
    base, tokenizer = models.load_causal_lm(model_spec, dtype=placement.precision, device=placement.device)
    model = _with_adapter(base, checkpoint, model_spec, placement)
    max_length = int(run_config.get("max_length") or TASK_DEFAULTS["sft"]["max_length"])
    batch = {} if placement.batch_size is None else {"batch_size": placement.batch_size}
    encoded = sft.encode_all(held, tokenizer, max_length)
    if metric == "exact_match":
        if not sft.answerable(encoded):
            raise RankscopeError(f"{data}: no response ends with a '#### answer' line, so exact match is undefined; "
                                 "expected GSM8K-style answers, or use --metric loss")
        evaluate = lambda m: sft.exact_match_rate(m, tokenizer, encoded, progress=False, **batch)  # noqa: E731
        return Evaluation(model, evaluate, metric, True, f"exact match on {len(sft.answerable(encoded))} {what}")
    loss = lambda m: sft.mean_loss(m, tokenizer, encoded, progress=False, **batch)  # noqa: E731
    evaluate = loss if metric == "loss" else (lambda m: math.exp(min(loss(m), 700.0)))
    return Evaluation(model, evaluate, metric, False, f"{metric} on the responses of {len(encoded)} {what}")
