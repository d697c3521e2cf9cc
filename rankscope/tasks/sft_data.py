"""Instruction-tuning data: the built-in arithmetic set or a user's .jsonl, as prompt / response pairs.

A .jsonl line is either ``{"prompt": "...", "response": "..."}`` (``"completion"`` is read as
``"response"``, as in TRL), used as plain text, or ``{"messages": [{"role": ..., "content": ...}, ...]}``
whose last message is the assistant's answer and goes through the tokenizer's chat template.
Every bad line is named by its number, before any model loads. Only the standard library and numpy.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.io.validate import describe, json_lines
from rankscope.tasks.arithmetic import ARITHMETIC, SYSTEM, TRAIN_SIZE, generate
from rankscope.tasks.data import open_data_file, split_indices

_RESPONSE_KEYS = ("response", "completion")
_EXPECTED = ('expected {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]} '
             "ending with the assistant's answer")


@dataclass
class SftExample:
    """One example. ``prompt`` is plain text or the chat messages before the answer; ``response`` the answer."""

    prompt: str | list[dict[str, str]]
    response: str
    source: str = ""  # "file.jsonl: line 7": where it came from, for messages

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, answer included (chat examples only)."""
        return [*self.prompt, {"role": "assistant", "content": self.response}]


@dataclass
class SftData:
    train: list[SftExample]
    held_out: list[SftExample]


def _count(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} message{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


def _message(value: Any) -> str:
    """A message that is not one, in words: its JSON when that is short and shallow, else what it is."""
    if isinstance(value, dict) and all(isinstance(v, (str, int, float, bool, type(None))) for v in value.values()):
        try:
            return json.dumps(value)[:60]
        except ValueError:  # an integer too long to write out
            pass
    return describe(value)


def _messages(value: Any, where: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(value, list) or len(value) < 2:
        raise RankscopeError(f"{where}: 'messages' holds {_count(value)}, expected a list of at least two messages "
                            "(a question, then the assistant's answer)")
    out = []
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise RankscopeError(f"{where}: message {i + 1} is {_message(message)}, expected "
                                '{"role": str, "content": str}')
        out.append({"role": message["role"], "content": message["content"]})
    if out[-1]["role"] != "assistant":
        raise RankscopeError(f"{where}: the last message is from {out[-1]['role']!r}, expected the assistant's answer "
                            "(the loss falls on it)")
    return out[:-1], out[-1]["content"]


def parse_line(obj: Any, where: str) -> SftExample:
    """One parsed JSON line as an example; ``where`` ("file: line N") names it in every error."""
    if not isinstance(obj, dict):
        raise RankscopeError(f"{where}: a JSON {type(obj).__name__}, {_EXPECTED}")
    if "messages" in obj:
        prompt, response = _messages(obj["messages"], where)
    else:
        key = next((k for k in _RESPONSE_KEYS if k in obj), None)
        if not isinstance(obj.get("prompt"), str) or key is None or not isinstance(obj[key], str):
            raise RankscopeError(f"{where}: found keys {sorted(obj)}, {_EXPECTED}")
        prompt, response = obj["prompt"], obj[key]
        if not prompt.strip():
            raise RankscopeError(f"{where}: the prompt is empty, expected the text the response answers")
    if not response.strip():
        raise RankscopeError(f"{where}: the response is empty, expected the text to train on (fill it or drop the line)")
    return SftExample(prompt, response, where)


def read_jsonl(path: str | Path) -> list[SftExample]:
    """Every example of a .jsonl file; it must be a regular file (a FIFO, which would block, is refused unopened)."""
    path = Path(path)
    examples = []
    expected = "a readable UTF-8 .jsonl file of prompt/response or messages lines"
    with open_data_file(path, expected) as handle:
        try:
            with io.TextIOWrapper(handle, encoding="utf-8") as f:
                for n, obj in json_lines(f, path):
                    examples.append(parse_line(obj, f"{path}: line {n}"))
        except (OSError, UnicodeDecodeError) as e:
            raise RankscopeError(f"{path}: cannot read the file ({type(e).__name__}: {e}), expected a UTF-8 .jsonl") \
                from None
    if not examples:
        raise RankscopeError(f"{path}: no examples, {_EXPECTED}, one a line")
    return examples


def arithmetic_examples(held_out: int) -> SftData:
    """The built-in set: chat examples (a one-line system instruction, the question) and GSM8K answers."""
    train, held = generate(TRAIN_SIZE, held_out)
    as_example = lambda p: SftExample([{"role": "system", "content": SYSTEM},  # noqa: E731
                                       {"role": "user", "content": p.question}], p.answer, ARITHMETIC)
    return SftData([as_example(p) for p in train], [as_example(p) for p in held])


def load_sft_data(spec: str, held_out: int, seed: int) -> SftData:
    """``"arithmetic"`` (a fixed set; ``held_out`` problems from its held-out territory) or a .jsonl,
    split at random by ``seed`` into train and ``held_out`` examples."""
    if str(spec).strip().lower() == ARITHMETIC:
        return arithmetic_examples(held_out)
    path = Path(spec)
    if path.suffix.lower() != ".jsonl" or not path.exists():
        what = "no such file" if not path.exists() else f"a {path.suffix or 'file without extension'}"
        raise RankscopeError(f"data {str(spec)!r}: {what}; --task sft expects {ARITHMETIC!r} or a .jsonl file "
                            "of prompt/response or messages lines")
    examples = read_jsonl(path)  # a folder or a FIFO named .jsonl is refused there, unopened
    if len(examples) <= held_out:
        raise RankscopeError(f"{path}: {len(examples)} examples, expected more than held_out={held_out} "
                            "(pass a smaller --held-out)")
    train, held = split_indices(len(examples), held_out, seed)
    return SftData([examples[i] for i in train], [examples[i] for i in held])
