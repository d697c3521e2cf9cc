"""The classification task: labelled texts encoded for a classifier or a causal LM's label words, and its accuracy."""

from __future__ import annotations

from typing import Any, Callable

from rankscope.tasks.data import TextDataset
from rankscope.tasks.models import causal_prompt, label_word_ids


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
    """Held-out accuracy and mean cross-entropy, in eval mode and without gradients.

    Examples go through in order of length, so each batch is padded to about its own length rather than to the
    longest text of a random draw (the attention mask makes the padding irrelevant to each example's logits).
    """
    import torch

    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            order = sorted(range(len(encoded)), key=lambda i: len(encoded.items[i]["input_ids"]))
            for start in range(0, len(order), batch_size):
                items = [encoded.items[i] for i in order[start:start + batch_size]]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                out = model(**batch)
                labels = batch["labels"]
                correct += int((out.logits.argmax(-1) == labels).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), labels, reduction="sum"))
                n += len(labels)
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "loss": loss_sum / n}
