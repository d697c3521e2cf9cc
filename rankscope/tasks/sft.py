"""Instruction tuning mechanics: prompt / response pairs to token ids with the loss on the response only,
padding, and the held-out evaluation (loss, perplexity, and exact match by batched greedy generation).

Tokenisation. A chat example (``messages``) is rendered with the tokenizer's chat template: the
prompt is the conversation before the answer with the generation prompt (``<|im_start|>assistant``),
the response is the rest of the rendered conversation. Without a chat template the messages become
``Role: content`` lines and ``Assistant: ``. A plain example is its prompt text (with the tokenizer's
own special tokens, e.g. BOS) followed by the response text. Prompt and response are tokenised
separately, as generation sees them, and the response always ends with the EOS token, so the model
learns to stop. Labels are -100 on the prompt: the loss falls on the response tokens (and EOS) only.

Truncation (``max_length`` tokens in all): the response keeps all its tokens when it fits beside the
prompt; an over-long prompt loses its *start* (left truncation: the end of the question and the
assistant header stay next to the answer). The prompt keeps at least ``max_length // 2`` tokens (or
all of them when shorter); a response longer than what is left loses its end.

Padding is on the right for training and held-out loss, on the left for generation (so every prompt
ends where generation starts). When the model accepts ``logits_to_keep``, training batches ask for
the logits from the first response position on only: the vocabulary projection and its gradient
are skipped over the prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from rankscope.errors import RankscopeError
from rankscope.tasks.answers import exact_match, reference_answer
from rankscope.tasks.sft_data import SftExample

IGNORE = -100
EVAL_BATCH = 32
EXTRA_NEW_TOKENS = 16  # generation may run this far past the longest reference answer


@dataclass
class Encoded:
    """One tokenised example: ``input_ids`` = prompt + response, ``labels`` -100 over the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool
    reference: str  # the untruncated response, for exact match

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length:]


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise RankscopeError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token, expected one to end "
                            "each response with (so the model learns to stop)")
    return int(tokenizer.eos_token_id)


def render(example: SftExample, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example; the response ends with EOS."""
    eos = eos_id(tokenizer)
    if example.is_chat:
        if getattr(tokenizer, "chat_template", None):
            prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(example.messages(), tokenize=False)
            if full_text.startswith(prompt_text):
                response_text = full_text[len(prompt_text):]
            else:  # a template that renders the answer's turn differently: the answer alone
                response_text = example.response
        else:
            prompt_text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in example.prompt) + "Assistant: "
            response_text = example.response
        # The template writes the special tokens as text; adding them again would double BOS.
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(example.prompt)["input_ids"]
        response_text = example.response
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if eos not in response:
        response = response + [eos]
    elif getattr(tokenizer, "chat_template", None) and example.is_chat:
        # Keep the answer's turn up to and including its EOS (drop the template's trailing newline).
        response = response[: response.index(eos) + 1]
    return list(prompt), list(response)


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Truncate to ``max_length`` tokens: the prompt from the left, keeping at least half; then the response's end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:]
    return prompt, response[: max_length - keep_prompt], True


def encode(example: SftExample, tokenizer: Any, max_length: int) -> Encoded:
    prompt, response = render(example, tokenizer)  # the response holds at least EOS
    prompt, response, truncated = fit(prompt, response, max_length)
    return Encoded(prompt + response, [IGNORE] * len(prompt) + response, len(prompt), truncated, example.response)


class EncodedSet:
    """A torch-style Dataset of ``Encoded`` examples."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]

    @property
    def truncated(self) -> int:
        return sum(x.truncated for x in self.items)


def encode_all(examples: Sequence[SftExample], tokenizer: Any, max_length: int) -> EncodedSet:
    return EncodedSet([encode(e, tokenizer, max_length) for e in examples])


def truncation_note(name: str, encoded: EncodedSet, max_length: int) -> str | None:
    """One line when some examples were longer than ``max_length``, saying what was cut."""
    if not encoded.truncated:
        return None
    return (f"{encoded.truncated} of {len(encoded)} {name} examples are longer than --max-length {max_length} tokens: "
            "their prompts lose their start (and responses longer than what is left lose their end)")


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (most transformers causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def collator(pad_id: int, keep_logits: bool = False) -> Callable[[list[Encoded]], dict]:
    """Right-padded batches; with ``keep_logits`` only the positions from the first response on get logits.

    Logits at position t predict token t+1, so keeping the last K positions and the labels of those
    same positions leaves the model's own shift-by-one loss exactly as over the full sequence
    (every dropped position had label -100).
    """

    def collate(batch: list[Encoded]) -> dict:
        import torch

        width = max(len(x.input_ids) for x in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        out = {"input_ids": torch.tensor([pad(x.input_ids, pad_id) for x in batch]),
               "attention_mask": torch.tensor([pad([1] * len(x.input_ids), 0) for x in batch]),
               "labels": torch.tensor([pad(x.labels, IGNORE) for x in batch])}
        if keep_logits:
            first = min(x.prompt_length for x in batch)  # the first labelled position; logits from first - 1
            keep = width - first + 1
            out["labels"] = out["labels"][:, width - keep:]
            out["logits_to_keep"] = keep
        return out
    return collate


def _bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not progress, file=sys.stderr)


def response_nll(model: Any, encoded: EncodedSet, pad_id: int, batch_size: int = EVAL_BATCH,
                 bar: Any = None) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of tokens) over every response token."""
    import torch

    keep = accepts_logits_to_keep(model)
    collate = collator(pad_id, keep)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded.items[start:start + batch_size])
        extra = {"logits_to_keep": batch["logits_to_keep"]} if keep else {}
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       **extra).logits
        target = batch["labels"][:, 1:].to(device)  # the labels of the kept positions, shifted by one
        scores = logits[:, :-1] if logits.dtype == torch.float64 else logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(scores.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((target != IGNORE).sum())
        if bar is not None:
            bar.update(1)
    return total, count


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (an instruct model may have several)."""
    ids = {eos_id(tokenizer)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return sorted(ids)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             batch_size: int = EVAL_BATCH, bar: Any = None) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), batched with left padding, decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id
    stops = stop_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=stops)
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    # Similar lengths together: less padding, and the result does not depend on it.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + list(prompts[i]) for i in rows], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(rows):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            texts[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
        if bar is not None:
            bar.update(1)
    return texts


def answerable(encoded: EncodedSet) -> list[Encoded]:
    """The examples whose reference defines a final answer (a ``####`` line)."""
    return [x for x in encoded.items if reference_answer(x.reference) is not None]


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode without gradients, then the model's mode as it was."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def mean_loss(model: Any, tokenizer: Any, encoded: EncodedSet, batch_size: int = EVAL_BATCH,
              progress: bool = True) -> float:
    """Mean negative log-likelihood per response token (nats), in eval mode."""
    with _eval_mode(model), _bar(math.ceil(len(encoded) / batch_size), progress, "held-out loss") as bar:
        total, count = response_nll(model, encoded, tokenizer.pad_token_id, batch_size, bar)
    return total / count


def exact_match_rate(model: Any, tokenizer: Any, encoded: EncodedSet, batch_size: int = EVAL_BATCH,
                     progress: bool = True, generations: list[dict] | None = None) -> float | None:
    """Share of answerable examples whose greedy generation gives the reference's final answer (None: none).

    Generation may run ``EXTRA_NEW_TOKENS`` past the longest reference response.
    ``generations``, when given, receives one record per example (prompt, reference, generation, correct).
    """
    items = answerable(encoded)
    if not items:
        return None
    new_tokens = max(len(x.response_ids) for x in items) + EXTRA_NEW_TOKENS
    with _eval_mode(model), _bar(math.ceil(len(items) / batch_size), progress, "held-out generation") as bar:
        texts = generate(model, tokenizer, [x.prompt_ids for x in items], new_tokens, batch_size, bar)
    hits = [exact_match(t, x.reference) for t, x in zip(texts, items)]
    if generations is not None:
        generations[:] = [{"prompt": tokenizer.decode(x.prompt_ids), "reference": x.reference, "generation": t,
                           "correct": h} for x, t, h in zip(items, texts, hits)]
    return sum(hits) / len(hits)


def perplexity(loss: float) -> float | None:
    """exp(loss), or None where it would overflow (strict JSON has no Infinity)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else None


def evaluate(model: Any, tokenizer: Any, encoded: EncodedSet, batch_size: int = EVAL_BATCH,
             progress: bool = True, generations: list[dict] | None = None) -> dict[str, float | None]:
    """Held-out ``loss`` (nats per response token), ``perplexity`` = exp(loss), and ``exact_match``
    of the final answer when some reference defines one (a ``####`` line; the key is absent otherwise)."""
    loss = mean_loss(model, tokenizer, encoded, batch_size, progress)
    result: dict[str, float | None] = {"loss": loss if math.isfinite(loss) else None, "perplexity": perplexity(loss)}
    rate = exact_match_rate(model, tokenizer, encoded, batch_size, progress, generations)
    if rate is not None:
        result["exact_match"] = rate
    return result
