"""PEFT's ``rank_pattern`` / ``alpha_pattern`` keys matched against module names, in bounded time.

PEFT's rule (``peft.utils.other.get_pattern_key``): the first key, in the map's order, for which
``re.match(rf"(.*\\.)?({key})$", name)`` succeeds gives the module its value. Matching that with
``re`` as it stands can take exponential time (``(a|aa)+$`` against 34 ``a``\\ s then ``X0``) and a
map of 100,000 keys compiles 100,000 expressions per module. Here:

- a *plain* key (literal characters, escaped punctuation such as ``\\.``, and ``.``, which matches any
  character but a newline, as in ``re``: every module path such as ``model.layers.0.self_attn.q_proj``)
  is matched without a regex, by an index built once per map: a name is looked up in a few
  dictionaries, whatever the number of keys;
- any other key is checked once with ``re`` (so what PEFT refuses is refused), refused when it is
  too large to compile in bounded memory, compiled once with the ``regex`` engine (the same syntax
  and meaning for every pattern ``re`` accepts, POSIX ``[[:alpha:]]`` sets aside, which are refused)
  and matched with a per-match timeout, and a total time budget per map. A key that exceeds either
  is refused by name (:class:`PatternTooSlow`), never waited on.

Lookups are remembered per name, so the snapshots of a run cost one match per module.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from typing import Any, Iterable

try:  # re's own parser, so a key means here what it means to PEFT's re
    from re import _parser as _sre_parse  # Python ≥ 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MATCH_TIMEOUT_S = 0.25  # one key against one name: microseconds when the key is sane
BUDGET_S = 5.0  # all regex matching of one map, over every module of every snapshot
MAX_EXPANSION = 20_000  # repeat counts multiplied through nesting: `(a{1000}){1000}` would compile to ~1e6 nodes
_SYNTAX = frozenset("^$*+?{}[]|()")  # outside an escape, what makes a key more than literals and '.'


class PatternError(ValueError):
    """A key that is not a regular expression PEFT's ``re`` accepts, or one too large to match in bounded time."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


class PatternTooSlow(Exception):
    """A key whose match against a module name ran past the time bound."""

    def __init__(self, key: str, name: str, seconds: float, budget: bool):
        super().__init__(key)
        self.key, self.name, self.seconds, self.budget = key, name, seconds, budget

    def describe(self) -> str:
        name = self.name if len(self.name) <= 60 else self.name[:57] + "..."
        if self.budget:
            return (f"together with the other keys it took more than {self.seconds:g} s to match against module "
                    f"names (at {name!r})")
        return f"takes more than {self.seconds:g} s to match module {name!r} (a pattern that backtracks without end?)"


def _wrapped(key: str) -> str:
    return rf"(.*\.)?({key})$"  # as PEFT matches it


def _op(item: tuple) -> str:
    return getattr(item[0], "name", str(item[0]))


def _expansion(parsed: Iterable) -> int:
    """A bound on how many nodes a backtracking engine unrolls the parsed pattern into."""
    total = 0
    for item in parsed:
        op, av = _op(item), item[1]
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            total += max(1, av[0]) * _expansion(av[2])
        elif op == "SUBPATTERN":
            total += _expansion(av[-1])
        elif op == "BRANCH":
            total += sum(_expansion(branch) for branch in av[1])
        elif op in ("ASSERT", "ASSERT_NOT"):
            total += _expansion(av[1])
        elif op == "ATOMIC_GROUP":
            total += _expansion(av)
        elif op == "GROUPREF_EXISTS":
            total += _expansion(av[1]) + (_expansion(av[2]) if av[2] is not None else 0)
        else:
            total += 1
        if total > MAX_EXPANSION:
            break
    return total


def plain_tokens(key: str) -> list[str | None] | None:
    """A plain key as one token per character it matches (a literal, or None for '.'), or None if it is not plain.

    As ``re`` reads a pattern: a backslash before anything but an ASCII letter or digit is that character itself.
    """
    tokens: list[str | None] = []
    escaped = False
    for c in key:
        if escaped:
            if c.isascii() and c.isalnum():
                return None  # \d, \w, \1, \A, ...: regex syntax
            tokens.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ".":
            tokens.append(None)
        elif c in _SYNTAX:
            return None
        else:
            tokens.append(c)
    return None if escaped else tokens


def is_plain(key: str) -> bool:
    return plain_tokens(key) is not None


def check_key(key: str) -> None:
    """Raise :class:`PatternError` unless ``key`` compiles in ``re`` (alone and as PEFT wraps it) and is bounded."""
    if is_plain(key):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # re: "Possible nested set", where regex reads a POSIX class
        try:
            parsed = _sre_parse.parse(key)  # the key alone must be a regular expression
            re.compile(_wrapped(key))  # and PEFT's pattern built from it (look-behinds are checked here)
        except FutureWarning as e:
            raise PatternError(key, f"a regular expression with one meaning ({e}: escape the '[')") from None
        except re.error as e:
            raise PatternError(key, f"a valid regular expression ({e})") from None
        except OverflowError as e:
            raise PatternError(key, f"a valid regular expression ({e})") from None
        except RecursionError:
            raise PatternError(key, "a regular expression that does not nest too deeply to read") from None
    try:
        expansion = _expansion(parsed)
    except RecursionError:
        raise PatternError(key, "a regular expression that does not nest too deeply to read") from None
    if expansion > MAX_EXPANSION:
        raise PatternError(key, f"a regular expression whose repeat counts multiply to at most {MAX_EXPANSION:,} "
                                "(nested counted repeats such as (a{1000}){1000} are too large to match safely)")


def _plain_shape(tokens: list[str | None]) -> tuple[tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]], str]:
    """((length, positions of '.', the literal runs between them as slices), the literal characters) of a plain key."""
    dots = tuple(i for i, t in enumerate(tokens) if t is None)
    runs, start = [], 0
    for i in (*dots, len(tokens)):
        if i > start:
            runs.append((start, i))
        start = i + 1
    return (len(tokens), dots, tuple(runs)), "".join(t for t in tokens if t is not None)


class PatternMap:
    """One ``rank_pattern`` or ``alpha_pattern``: ``lookup(name)`` is the index of the key PEFT would pick."""

    def __init__(self, keys: Iterable[str]):
        self.keys = list(keys)
        # plain keys: (length, '.' positions, literal runs) -> {the literal runs joined: first index}
        self._plain: dict[tuple, dict[str, int]] = {}
        self._complex: list[int] = []
        for index, key in enumerate(self.keys):
            tokens = plain_tokens(key)
            if tokens is None:
                check_key(key)
                self._complex.append(index)
            else:
                shape, literal = _plain_shape(tokens)
                self._plain.setdefault(shape, {}).setdefault(literal, index)
        self._compiled: dict[int, Any] = {}
        self._memo: dict[str, int | None] = {}
        self._spent = 0.0

    def __len__(self) -> int:
        return len(self.keys)

    def _first_plain(self, name: str) -> int | None:
        best = None
        ends = (len(name), len(name) - 1) if name.endswith("\n") else (len(name),)  # `$` also matches before a final \n
        newline = name.find("\n")
        for (length, dots, runs), literals in self._plain.items():
            for end in ends:
                start = end - length
                if start < 0:
                    continue
                if start and (name[start - 1] != "." or 0 <= newline < start):
                    continue  # the prefix must match `.*\.`: no newline, and a '.' last
                if any(name[start + i] == "\n" for i in dots):
                    continue  # '.' matches anything but a newline
                index = literals.get("".join(name[start + a:start + b] for a, b in runs))
                if index is not None and (best is None or index < best):
                    best = index
        return best

    def _matches(self, index: int, name: str) -> bool:
        key = self.keys[index]
        pattern = self._compiled.get(index)
        if pattern is None:
            import regex  # a dependency of transformers; imported only when a key is a real regular expression

            try:
                pattern = self._compiled[index] = regex.compile(_wrapped(key))
            except (regex.error, OverflowError, RecursionError, ValueError) as e:
                raise PatternError(key, f"a regular expression the bounded matcher can compile ({e})") from None
        budget = BUDGET_S - self._spent < MATCH_TIMEOUT_S  # the map's budget, not this key, is the bound now
        timeout = max(1e-3, BUDGET_S - self._spent) if budget else MATCH_TIMEOUT_S
        started = time.perf_counter()
        try:
            return pattern.match(name, timeout=timeout) is not None
        except TimeoutError:
            raise PatternTooSlow(key, name, BUDGET_S if budget else MATCH_TIMEOUT_S, budget) from None
        finally:
            self._spent += time.perf_counter() - started

    def lookup(self, name: str) -> int | None:
        """The index of the first key (in the map's order) that PEFT's rule matches with ``name``, or None."""
        if name in self._memo:
            return self._memo[name]
        best = self._first_plain(name)
        for index in self._complex:
            if best is not None and index > best:
                break
            if self._matches(index, name):
                best = index
                break
        self._memo[name] = best
        return best


@functools.lru_cache(maxsize=8)
def _cached(keys: tuple[str, ...]) -> PatternMap:
    return PatternMap(keys)


def pattern_map(patterns: dict[str, Any] | None) -> PatternMap:
    """The :class:`PatternMap` of a pattern dict's keys (JSON keys: strings), built and checked once per distinct map."""
    return _cached(tuple(patterns or ()))


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's value for module ``name``: ``patterns.get(get_pattern_key(patterns, name), default)``."""
    if not patterns:
        return default
    keys = pattern_map(patterns)
    index = keys.lookup(name)
    return default if index is None else patterns[keys.keys[index]]


__all__ = ["PatternMap", "PatternError", "PatternTooSlow", "pattern_map", "pattern_value", "check_key", "is_plain",
           "plain_tokens",
           "MATCH_TIMEOUT_S", "BUDGET_S", "MAX_EXPANSION"]
