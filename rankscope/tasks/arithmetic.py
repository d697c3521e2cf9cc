"""The built-in instruction-tuning set: short multi-step arithmetic word problems, GSM8K answer format.

Every problem is a story template with two or three operations on small whole numbers; the
answer lists one equation a line and ends with ``#### N`` (the GSM8K convention), e.g.::

    Mia has 12 apples. She buys 5 more and then gives 3 to a friend. How many apples does Mia have now?
    12 + 5 = 17
    17 - 3 = 14
    #### 14

The set is the same in every run (its own fixed seed, not the run's). Train and held-out problems
are disjoint by construction: a problem is held-out territory when a hash of its arithmetic (the
template and the numbers, not the name or the item) falls in a fixed 20% bucket, so no held-out
calculation is ever trained on, even under another name. Only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

ARITHMETIC = "arithmetic"
TRAIN_SIZE = 4000
GENERATOR_SEED = 20250613
HELD_OUT_BUCKETS = 5  # hash % 5 == 0: one fifth of all problems can only ever be held out
SYSTEM = "Solve step by step, one equation a line. End with: #### <answer>"

_NAMES = [("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Ben", "He"),
          ("Emma", "She"), ("Noah", "He"), ("Lily", "She"), ("Omar", "He"), ("Nina", "She"), ("Ravi", "He"),
          ("Sara", "She"), ("Tom", "He"), ("Iris", "She"), ("Luis", "He")]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards",
          "buttons", "oranges", "toy cars", "balloons", "candles", "eggs"]


@dataclass(frozen=True)
class Problem:
    """One generated problem: ``question``, ``answer`` (equations then ``#### N``), and its ``key``."""

    question: str
    answer: str
    key: str  # template and numbers: what the held-out hash is taken of
    value: int

    @property
    def held_out_territory(self) -> bool:
        return is_held_out_key(self.key)


def is_held_out_key(key: str) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def _lines(*steps: tuple[int, str, int, int]) -> tuple[str, int]:
    """Equations ``a op b = c`` one a line, then ``#### c`` of the last."""
    text = "\n".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps)
    last = steps[-1][3]
    return f"{text}\n#### {last}", last


# Each template draws its numbers from the generator and returns (question, key, answer, value).
# Bounds keep every intermediate result a whole number between 0 and a few hundred.

def _buy_give(rng: np.random.Generator, name: str, she: str, item: str):
    a, b = int(rng.integers(5, 60)), int(rng.integers(2, 40))
    c = int(rng.integers(1, a + b))
    q = (f"{name} has {a} {item}. {she} buys {b} more and then gives {c} to a friend. "
         f"How many {item} does {name} have now?")
    return q, f"buy_give:{a}:{b}:{c}", *_lines((a, "+", b, a + b), (a + b, "-", c, a + b - c))


def _bags_give(rng, name, she, item):
    a, b = int(rng.integers(2, 10)), int(rng.integers(2, 13))
    c = int(rng.integers(1, a * b))
    q = (f"{name} buys {a} bags of {item} with {b} in each bag. {she} gives away {c} of them. "
         f"How many {item} does {name} have left?")
    return q, f"bags_give:{a}:{b}:{c}", *_lines((a, "*", b, a * b), (a * b, "-", c, a * b - c))


def _boxes_loose(rng, name, she, item):
    a, b, c = int(rng.integers(2, 10)), int(rng.integers(2, 13)), int(rng.integers(1, 30))
    q = (f"{name} packs {a} boxes with {b} {item} in each box and has {c} {item} left over. "
         f"How many {item} does {name} have in total?")
    return q, f"boxes_loose:{a}:{b}:{c}", *_lines((a, "*", b, a * b), (a * b, "+", c, a * b + c))


def _spend_twice(rng, name, she, item):
    a = int(rng.integers(20, 100))
    b = int(rng.integers(1, a))
    c = int(rng.integers(1, a - b + 1))
    q = (f"{name} has {a} dollars. {she} spends {b} dollars on lunch and {c} dollars on a book. "
         f"How many dollars does {name} have left?")
    return q, f"spend_twice:{a}:{b}:{c}", *_lines((a, "-", b, a - b), (a - b, "-", c, a - b - c))


def _share_add(rng, name, she, item):
    b, each, c = int(rng.integers(2, 10)), int(rng.integers(2, 13)), int(rng.integers(1, 20))
    a = b * each
    q = (f"{name} shares {a} {item} equally among {b} friends. Each friend already had {c} {item}. "
         f"How many {item} does each friend have now?")
    return q, f"share_add:{a}:{b}:{c}", *_lines((a, "/", b, each), (each, "+", c, each + c))


def _pick_days(rng, name, she, item):
    a, b, c = int(rng.integers(2, 30)), int(rng.integers(2, 30)), int(rng.integers(2, 8))
    q = (f"{name} collects {a} {item} in the morning and {b} in the afternoon. {she} does this for {c} days. "
         f"How many {item} does {name} collect in all?")
    return q, f"pick_days:{a}:{b}:{c}", *_lines((a, "+", b, a + b), (a + b, "*", c, (a + b) * c))


def _shop_delivery(rng, name, she, item):
    a = int(rng.integers(10, 80))
    b = int(rng.integers(1, a))
    c, d = int(rng.integers(2, 8)), int(rng.integers(2, 11))
    q = (f"A shop has {a} {item}. It sells {b} of them, then receives {c} boxes with {d} {item} in each. "
         f"How many {item} does the shop have now?")
    return q, f"shop_delivery:{a}:{b}:{c}:{d}", *_lines(
        (a, "-", b, a - b), (c, "*", d, c * d), (a - b, "+", c * d, a - b + c * d))


def _earn_split(rng, name, she, item):
    d, each = int(rng.integers(2, 6)), int(rng.integers(2, 16))
    rest = d * each
    a, b = int(rng.integers(3, 13)), int(rng.integers(2, 8))
    while a * b <= rest:  # earnings must cover what is split, leaving something spent
        a += 1
    c = a * b - rest
    q = (f"{name} earns {a} dollars a day for {b} days and spends {c} dollars. {she} splits the rest equally "
         f"into {d} envelopes. How many dollars go in each envelope?")
    return q, f"earn_split:{a}:{b}:{c}:{d}", *_lines((a, "*", b, a * b), (a * b, "-", c, rest), (rest, "/", d, each))


TEMPLATES: tuple[Callable, ...] = (_buy_give, _bags_give, _boxes_loose, _spend_twice, _share_add, _pick_days,
                                   _shop_delivery, _earn_split)


def draw(rng: np.random.Generator) -> Problem:
    """One problem: a template, a name and an item uniformly at random, then the template's numbers."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    name, she = _NAMES[int(rng.integers(len(_NAMES)))]
    item = _ITEMS[int(rng.integers(len(_ITEMS)))]
    question, key, answer, value = template(rng, name, she, item)
    return Problem(question, answer, key, value)


def generate(train_size: int = TRAIN_SIZE, held_out: int = 200, seed: int = GENERATOR_SEED) -> tuple[list[Problem], list[Problem]]:
    """``(train, held_out)`` problems, drawn in one seeded stream and routed by the hash of their arithmetic.

    A problem whose arithmetic was already drawn is skipped, so each calculation appears once.
    The held-out list for a smaller ``held_out`` is a prefix of that for a larger one, and the
    train list does not depend on ``held_out``.
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    train: list[Problem] = []
    held: list[Problem] = []
    while len(train) < train_size or len(held) < held_out:
        problem = draw(rng)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        target, size = (held, held_out) if problem.held_out_territory else (train, train_size)
        if len(target) < size:
            target.append(problem)
    return train, held
