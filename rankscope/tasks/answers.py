"""Final answers and exact match, GSM8K style: the text after the last ``####``, compared as a number.

Pure standard library. A reference defines an answer only when it has a ``####`` line; a
generation's answer is what follows its last ``####`` or, when it has none, its last number (the
"flexible" extraction of GSM8K harnesses, so an untuned model that says "the answer is 14" still
counts). Numbers are compared as exact decimals: ``1,234``, ``1234.0``, ``+1234`` and ``$1,234``
are the same answer; ``-5`` is not ``5``.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

MARKER = "####"
# Thousands separators only in groups of three ("1,234,567"), so "3, 4" stays two numbers.
_NUMBER = re.compile(r"(?<![\w.])([-+−]?)\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])")


def parse_number(text: str) -> Decimal | None:
    """The first number in ``text`` as an exact decimal, or None."""
    match = _NUMBER.search(unicodedata.normalize("NFKC", text))
    if match is None:
        return None
    sign, digits = match.groups()
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    return -value if sign in ("-", "−") else value


def last_number(text: str) -> Decimal | None:
    matches = list(_NUMBER.finditer(unicodedata.normalize("NFKC", text)))
    return parse_number(matches[-1].group(0)) if matches else None


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").lower().split())


def reference_answer(response: str) -> str | None:
    """The answer a reference response defines: the rest of its last ``####`` line, or None."""
    if MARKER not in response:
        return None
    answer = response.rsplit(MARKER, 1)[1].strip().split("\n", 1)[0].strip()
    return answer or None


def predicted_answer(generation: str) -> str | None:
    """What a generation answers: after its last ``####`` (that line only), else its last number."""
    if MARKER in generation:
        answer = generation.rsplit(MARKER, 1)[1].strip().split("\n", 1)[0].strip()
        return answer or None
    number = last_number(generation)
    return None if number is None else str(number)


def same_answer(predicted: str | None, reference: str) -> bool:
    """Equal as numbers when the reference holds one (its first), else equal as case- and space-folded text."""
    if predicted is None:
        return False
    want = parse_number(reference)
    if want is not None:
        return parse_number(predicted) == want
    return _normalise(predicted) == _normalise(reference)


def exact_match(generation: str, reference_response: str) -> bool:
    """Does ``generation`` give the final answer of ``reference_response``? (False when it defines none.)"""
    reference = reference_answer(reference_response)
    return reference is not None and same_answer(predicted_answer(generation), reference)
