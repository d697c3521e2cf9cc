"""Every JSON file rankscope reads is checked here before any code relies on its fields.

Readers parse strictly (no NaN or Infinity, valid UTF-8, nesting within Python's limits) and
check the fields they use against small specs. A problem becomes one :class:`RankscopeError`
line that names the file, the field (``snapshots[2].modules[0].rank``) and what was expected,
so no consumer further down ever meets a string where it wanted a number.

numpy-free and torch-free: ``rankscope analyze`` imports this on every run.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NoReturn

from rankscope.constants import ANALYSIS_SCHEMA
from rankscope.errors import RankscopeError

# ----------------------------------------------------------------------------- strict JSON


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, source: str, what: str) -> Any:
    """Parse strict JSON (no NaN/Infinity); ``source`` names the file (and line) in the message."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RankscopeError(f"{source} is not UTF-8 text (byte {e.start}): expected {what}") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RankscopeError(f"{source} nests JSON too deeply to read: expected {what}") from None
    except ValueError as e:  # JSONDecodeError is a ValueError; so is NaN/Infinity from _no_constant
        raise RankscopeError(f"{source} is not valid JSON ({e}): expected {what}") from None


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """Open a regular file for reading; a loop, a folder, a FIFO (which would block) or no permission is one error."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise RankscopeError(f"{path} is not a regular file: expected {what}")
        return open(path, "rb")
    except OSError as e:
        raise RankscopeError(f"{path} could not be read ({e.strerror or e}): expected {what}") from None


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read and parse a JSON file strictly."""
    with open_regular(path, what) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise RankscopeError(f"{path} could not be read ({e.strerror or e}): expected {what}") from None
    return parse_json(raw, str(path), what)



def json_lines(lines: Iterable[str], source: str | os.PathLike, what: str = "one object a line"
               ) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines file: the one reader of the data
    files; a line that is not strict JSON is an error naming it."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_no_constant)
        except RecursionError:
            raise RankscopeError(f"{source}: line {n} nests JSON too deeply to read, expected {what}") from None
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise RankscopeError(f"{source}: line {n} is not JSON ({reason}), expected {what}") from None
        yield n, value


# ----------------------------------------------------------------------------- specs

Spec = Callable[[Any, str], None]


class _Invalid(Exception):
    """A field that does not match its spec; turned into a RankscopeError naming the file."""

    def __init__(self, field: str, value: Any, expected: str):
        super().__init__(field)
        self.field, self.value, self.expected = field, value, expected


def describe(value: Any) -> str:
    """What a JSON value is, in words short enough for one error line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(field: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{field}[{key}]"
    return f"{field}.{key}" if field else key


def _key(field: str, key: str) -> str:
    """A free-form key (a module name, a regex) quoted, as it may hold dots itself."""
    return f"{field}[{json.dumps(key)}]"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int | None = None, maximum: int | None = None) -> Spec:
    words = ("an integer" if minimum is None else "a positive integer" if minimum == 1
             else "a non-negative integer" if minimum == 0 else f"an integer ≥ {minimum}")

    def check(value: Any, field: str) -> None:
        if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise _Invalid(field, value, words if maximum is None else f"{words} ≤ {maximum}")

    return check


def number(finite: bool = True, positive: bool = False, low: float | None = None, high: float | None = None) -> Spec:
    words = "a positive number" if positive else "a number" if finite else "a number (or NaN)"
    if low is not None and high is not None:
        words = f"a number in [{low:g}, {high:g}]"

    def check(value: Any, field: str) -> None:
        ok = is_number(value) and (not finite or math.isfinite(value)) and (not positive or value > 0)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if not ok:
            raise _Invalid(field, value, words)

    return check


def string(choices: tuple[str, ...] | None = None) -> Spec:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise _Invalid(field, value, "a string" if choices is None else " or ".join(map(json.dumps, choices)))

    return check


def boolean(value: Any, field: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(field, value, "true or false")


def nullable(spec: Spec) -> Spec:
    def check(value: Any, field: str) -> None:
        if value is not None:
            try:
                spec(value, field)
            except _Invalid as e:
                if e.field != field:
                    raise
                raise _Invalid(field, value, e.expected + " or null") from None

    return check


def list_of(item: Spec, length: int | None = None, min_length: int = 0) -> Spec:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) < min_length:
            words = (f"a list of {length}" if length is not None
                     else "a non-empty list" if min_length else "a list")
            raise _Invalid(field, value, words)
        for i, element in enumerate(value):
            item(element, _join(field, i))

    return check


def mapping(value_spec: Spec) -> Spec:
    """An object with any keys, each value matching ``value_spec``."""

    def check(value: Any, field: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(field, value, "an object")
        for key, element in value.items():
            value_spec(element, _key(field, key))

    return check


def obj(required: dict[str, Spec] | None = None, optional: dict[str, Spec] | None = None,
        extra: Callable[[dict, str], None] | None = None) -> Spec:
    """An object with these fields (others are allowed and ignored); ``extra`` checks across fields."""
    required, optional = required or {}, optional or {}

    def check(value: Any, field: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(field, value, "an object")
        for key, spec in required.items():
            if key not in value:
                raise _Invalid(_join(field, key), _MISSING, "present")
            spec(value[key], _join(field, key))
        for key, spec in optional.items():
            if key in value:
                spec(value[key], _join(field, key))
        if extra is not None:
            extra(value, field)

    return check


_MISSING = object()


def check(value: Any, spec: Spec, source: str, what: str) -> Any:
    """``value`` if it matches ``spec``; else one RankscopeError naming ``source``, the field and the expectation."""
    try:
        spec(value, "")
    except _Invalid as e:
        where = f"{source}: field {e.field!r}" if e.field else source
        if e.value is _MISSING:
            raise RankscopeError(f"{where} is missing: expected it in {what}") from None
        raise RankscopeError(f"{where} is {describe(e.value)}, expected {e.expected} ({what})") from None
    return value


def fail(source: str, field: str, value: Any, expected: str, what: str) -> NoReturn:
    """Raise the same one-line error as :func:`check`, for checks that need code rather than a spec."""
    raise RankscopeError(f"{source}: field {field!r} is {describe(value)}, expected {expected} ({what})")


# ----------------------------------------------------------------------------- adapter configs

ADAPTER_CONFIG_WHAT = "the adapter's configuration"


def _pattern_keys(kind: str) -> Spec:
    """rank_pattern / alpha_pattern: keys are regexes PEFT matches against module names."""
    value_spec = integer(minimum=1) if kind == "rank" else number()

    def check_map(value: Any, field: str) -> None:
        if value is None:
            return  # no pattern, as PEFT's default {}
        mapping(value_spec)(value, field)
        for key in value:
            try:
                re.compile(key)
                re.compile(rf"(.*\.)?({key})$")  # as PEFT uses it
            except re.error as e:
                raise _Invalid(_key(field, key), key, f"a valid regular expression ({e})") from None

    return check_map


_ADAPTER_CONFIG_SPEC = obj(optional={
    "peft_type": nullable(string()),
    "r": integer(minimum=1),
    "lora_alpha": number(),
    "rank_pattern": _pattern_keys("rank"),
    "alpha_pattern": _pattern_keys("alpha"),
    "use_rslora": boolean,
    # mlx-lm's config: how it scales ΔW
    "lora_parameters": nullable(obj(optional={"rank": integer(minimum=1), "alpha": number(), "scale": number()})),
})


def check_adapter_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The fields of adapter_config.json (PEFT, torchtune, mlx-lm) that decide ranks and scales."""
    return check(config, _ADAPTER_CONFIG_SPEC, str(path), ADAPTER_CONFIG_WHAT)


def check_temperature(config: dict[str, Any], path: str | os.PathLike) -> float:
    """BeamLoRA's softmax temperature T for gates stored beside A (default 0.05, the authors')."""
    key = "beamlora_temperature" if "beamlora_temperature" in config else "temperature"
    value = config.get(key, 0.05)
    if not (is_number(value) and math.isfinite(value) and value > 0):
        fail(str(path), key, value, "a positive number (BeamLoRA's softmax temperature)", ADAPTER_CONFIG_WHAT)
    return float(value)


# ----------------------------------------------------------------------------- run folders

TRAINER_STATE_WHAT = "the HF Trainer state"
_TRAINER_STATE_SPEC = obj(optional={"global_step": nullable(integer(minimum=0))})

EVENT_WHAT = "a BeamLoRA event object"
_EVENT_SPEC = obj(optional={
    "step": nullable(integer(minimum=0)),
    "p": nullable(number(finite=False)),
    "module": string(),
    "pruned": nullable(lambda v, f: (list_of(integer(minimum=0)) if isinstance(v, list) else integer(minimum=0))(v, f)),
})


def check_trainer_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    return check(state, _TRAINER_STATE_SPEC, str(path), TRAINER_STATE_WHAT)


def check_event(event: Any, source: str) -> dict[str, Any]:
    return check(event, _EVENT_SPEC, source, EVENT_WHAT)


RUN_CONFIG_WHAT = "a beamlora run's config.json"
_RUN_CONFIG_SPEC = obj(optional={
    "method": string(),
    "model": string(),
    "data": string(),
    "seed": integer(minimum=0),
    "held_out": integer(minimum=1),
    "max_length": integer(minimum=1),
})


def check_run_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a ``beamlora train`` run's config.json that a sweep reuses (model, data, split)."""
    return check(config, _RUN_CONFIG_SPEC, str(path), RUN_CONFIG_WHAT)


# ----------------------------------------------------------------------------- analysis-v1

ANALYSIS_WHAT = "a rankscope analysis-v1 document"
DECILES = 11

_maybe_number = nullable(number(finite=False))
_BAND = obj(required={"median": _maybe_number, "q25": _maybe_number, "q75": _maybe_number},
            optional={"iqr": _maybe_number, "min": _maybe_number, "max": _maybe_number, "n": integer(minimum=0)})
_DECILE_BAND = obj(required={key: list_of(_maybe_number, length=DECILES) for key in ("median", "q25", "q75")})
_GROUP = mapping(obj(required={"modules": integer(minimum=0), "deciles": _DECILE_BAND},
                     optional={"top10_share": _maybe_number, "effective_rank_ratio": _maybe_number}))
_CURVE_BAND = obj(required={key: list_of(_maybe_number) for key in ("median", "q25", "q75")},
                  optional={"k_over_r": list_of(number())})
_ENERGY_LEVELS = ("0.9", "0.95", "0.99")  # the energy ranks k90, k95, k99 of the spectral view
_SPECTRAL_SUMMARY = {  # present, with these types, where the summary counts spectral modules
    "zero_modules": integer(minimum=0), "full_rank_modules": integer(minimum=0),
    "energy_ranks": obj(required={level: _BAND for level in _ENERGY_LEVELS}), "stable_rank": _BAND,
    "energy_rank_ratio": _BAND, "stable_rank_ratio": _BAND, "spectral_effective_rank_ratio": _BAND,
    "energy_curve": _CURVE_BAND,
}


def _spectral_summary(summary: dict, field: str) -> None:
    if summary.get("spectral_modules"):
        obj(required=_SPECTRAL_SUMMARY)(summary, field)


_SUMMARY = obj(
    required={"modules": integer(minimum=0), "ranks": list_of(integer(minimum=1)), "scales": list_of(_maybe_number),
              "total_ranks": integer(minimum=0), "top10_share": _BAND, "top10_share_uniform": _maybe_number,
              "effective_rank_ratio": _BAND, "gini": _BAND, "deciles": _DECILE_BAND, "errors": list_of(string())},
    optional={"by_layer": _GROUP, "by_kind": _GROUP, "spectral_modules": integer(minimum=0),
              "verdict": nullable(obj(required={"sentence": string()}))},
    extra=_spectral_summary,
)


def _module_fields_agree(module: dict, field: str) -> None:
    """An analysed module (importance given) carries the numbers compare and recommend divide by rank."""
    importance = module.get("importance")
    if importance is None:
        return
    if len(importance) != module["rank"]:
        raise _Invalid(_join(field, "importance"), importance, f"one value per rank ({module['rank']})")
    for key, spec in (("deciles", list_of(_maybe_number, length=DECILES)), ("top10_share", _maybe_number),
                      ("effective_rank", _maybe_number), ("gini", _maybe_number)):
        if key not in module:
            raise _Invalid(_join(field, key), _MISSING, "present")
        spec(module[key], _join(field, key))
    if module["top10_share"] is not None and (module["effective_rank"] is None or module["gini"] is None):
        bad = "effective_rank" if module["effective_rank"] is None else "gini"
        raise _Invalid(_join(field, bad), None, "a number where top10_share is one")
    if module.get("energy_rank") is not None:  # the spectral view: its energy ranks come from the spectrum
        if "spectrum" not in module:
            raise _Invalid(_join(field, "spectrum"), _MISSING, "present")
        list_of(_maybe_number, length=module["rank"])(module["spectrum"], _join(field, "spectrum"))


_MODULE = obj(
    required={"name": string(), "rank": integer(minimum=1), "scale": number(finite=False),
              "importance": nullable(list_of(_maybe_number)), "layer": string(), "kind": string()},
    optional={"shape": list_of(integer(minimum=0), length=2), "spectrum": nullable(list_of(_maybe_number)),
              "energy_rank": nullable(obj(required={_ENERGY_LEVELS[1]: nullable(integer(minimum=0))},
                                          optional={level: nullable(integer(minimum=0)) for level in _ENERGY_LEVELS})),
              "stable_rank": _maybe_number, "spectral_effective_rank": _maybe_number,
              "scores": list_of(_maybe_number), "adalora_E": list_of(_maybe_number), "error": string(),
              "layer_type": string(), "dtype": string()},
    extra=_module_fields_agree,
)
_SNAPSHOT = obj(
    required={"step": nullable(integer(minimum=0)), "modules": list_of(_MODULE), "summary": _SUMMARY,
              "skipped": integer(minimum=0)},
    optional={"path": nullable(string()), "format": nullable(string()), "skipped_names": list_of(string()),
              "notes": list_of(string())},
)
_ANALYSIS = obj(
    required={"schema": string((ANALYSIS_SCHEMA,)), "path": string(), "format": nullable(string()),
              "snapshots": list_of(_SNAPSHOT, min_length=1)},
    optional={"layout": nullable(string()), "final": nullable(string()),
              "events": nullable(list_of(_EVENT_SPEC))},
)


def check_analysis(document: Any, path: str | os.PathLike) -> dict[str, Any]:
    """An analysis JSON read back (compare, recommend): the analysis-v1 fields their code relies on."""
    return check(document, _ANALYSIS, str(path), ANALYSIS_WHAT)


# ----------------------------------------------------------------------------- sweep-v1

SWEEP_WHAT = "a rankscope sweep-v1 document"
_SWEEP = obj(
    required={"points": list_of(obj(required={"order": string(), "fraction": number(low=0.0, high=1.0)},
                                    optional={"value": _maybe_number, "seed": nullable(integer())}))},
    optional={"metric": string(), "baseline": nullable(number()), "higher_is_better": boolean,
              "restored_value": _maybe_number},
)


def check_sweep(sweep: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A sweep.json read back (compare overlays it): points, metric and baseline."""
    return check(sweep, _SWEEP, str(path), SWEEP_WHAT)


__all__ = ["open_regular", "parse_json", "read_json", "json_lines", "check", "fail", "describe", "check_adapter_config", "check_temperature",
           "check_trainer_state", "check_event", "check_run_config", "check_analysis", "check_sweep"]
