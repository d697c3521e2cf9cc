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
import stat
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NoReturn

from rankscope.constants import ANALYSIS_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.patterns import PatternError, pattern_map

# ----------------------------------------------------------------------------- strict JSON

INT64_MAX = 2**63 - 1
_FLOAT_DIGITS = 309  # decimal digits of the largest finite float (1.8e308)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def json_int(text: str) -> int | float:
    """The one reader of JSON integers: an int, or ±inf where the value lies beyond float range.

    ``10**400`` parses as a Python int but ``float()`` of it overflows, and 5000 digits exceed Python's
    integer string-conversion limit (ValueError): both become ±inf here, as ``1e400`` already is, so
    one rule refuses them all where a field is checked (:func:`is_number`, :func:`is_int`).
    """
    negative = text.startswith("-")
    if len(text) - negative > _FLOAT_DIGITS:  # JSON has no leading zeros: the digit count is the magnitude
        return -math.inf if negative else math.inf
    value = int(text)
    if len(text) - negative == _FLOAT_DIGITS:
        try:
            float(value)
        except OverflowError:
            return -math.inf if negative else math.inf
    return value


def _out_of_range(text: str) -> NoReturn:
    raise ValueError(f"the number {text[:12]}{'...' if len(text) > 12 else ''} is beyond float range")


def _in_range_int(text: str) -> int:
    value = json_int(text)
    if isinstance(value, float):
        _out_of_range(text)
    return value


def _in_range_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        _out_of_range(text)
    return value


def loads(text: str | bytes, *, refuse_out_of_range: bool = False, **hooks: Any) -> Any:
    """``json.loads`` as every reader of rankscope parses: no NaN/Infinity, integers through :func:`json_int`.

    A float literal beyond float range (``1e400``) is ±inf, as in ``json``; with no Infinity literal in
    strict JSON, an infinite value read from a file always means a number beyond float range, which the
    field's check then refuses by name. With ``refuse_out_of_range`` such a number anywhere makes the text
    invalid (ValueError), as for the official safetensors reader (serde_json) in a header.
    """
    if refuse_out_of_range:
        hooks = {"parse_int": _in_range_int, "parse_float": _in_range_float, **hooks}
    return json.loads(text, parse_constant=_no_constant, **{"parse_int": json_int, **hooks})


def parse_json(text: str | bytes, source: str, what: str) -> Any:
    """Parse strict JSON (no NaN/Infinity); ``source`` names the file (and line) in the message."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RankscopeError(f"{source} is not UTF-8 text (byte {e.start}): expected {what}") from None
    try:
        return loads(text)
    except RecursionError:
        raise RankscopeError(f"{source} nests JSON too deeply to read: expected {what}") from None
    except ValueError as e:  # JSONDecodeError is a ValueError; so is NaN/Infinity from _no_constant
        raise RankscopeError(f"{source} is not valid JSON ({_short(str(e))}): expected {what}") from None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
            value = loads(line)
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
    if isinstance(value, float) and math.isinf(value):
        return f"a number beyond float range ({'-' if value < 0 else ''}1.8e308 or more in size)"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text}" if len(text) <= 24 else f"the number {text[:12]}...{text[-4:]} ({len(text)} digits)"
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
    """A JSON number within float range (±inf only ever comes from a number beyond it, see :func:`loads`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isinf(value))


def integer(minimum: int | None = None, maximum: int | None = None) -> Spec:
    words = ("an integer" if minimum is None else "a positive integer" if minimum == 1
             else "a non-negative integer" if minimum == 0 else f"an integer ≥ {minimum}")

    if maximum is not None:
        words += " within 64 bits" if maximum == INT64_MAX else f" ≤ {maximum}"

    def check(value: Any, field: str) -> None:
        if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise _Invalid(field, value, words)

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


STEP = integer(minimum=0, maximum=INT64_MAX)  # a training step, wherever one is read: 0 or more, within 64 bits

# ----------------------------------------------------------------------------- adapter configs

ADAPTER_CONFIG_WHAT = "the adapter's configuration"


def _pattern_keys(kind: str) -> Spec:
    """rank_pattern / alpha_pattern: keys are regexes PEFT matches against module names (checked and indexed once,
    by :mod:`rankscope.io.patterns`, which the readers then match with)."""
    value_spec = integer(minimum=1, maximum=INT64_MAX) if kind == "rank" else number()

    def check_map(value: Any, field: str) -> None:
        if value is None:
            return  # no pattern, as PEFT's default {}
        mapping(value_spec)(value, field)
        try:
            pattern_map(value)
        except PatternError as e:
            raise _Invalid(_key(field, e.key), e.key, e.reason) from None

    return check_map


_ADAPTER_CONFIG_SPEC = obj(optional={
    "peft_type": nullable(string()),
    "r": integer(minimum=1, maximum=INT64_MAX),
    "lora_alpha": number(),
    "rank_pattern": _pattern_keys("rank"),
    "alpha_pattern": _pattern_keys("alpha"),
    "use_rslora": boolean,
    # mlx-lm's config: how it scales ΔW
    "lora_parameters": nullable(obj(optional={"rank": integer(minimum=1, maximum=INT64_MAX), "alpha": number(),
                                              "scale": number()})),
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
_TRAINER_STATE_SPEC = obj(optional={"global_step": nullable(STEP)})

EVENT_WHAT = "a BeamLoRA event object"
_EVENT_SPEC = obj(optional={
    "step": nullable(STEP),
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
              "verdict": nullable(obj(required={"sentence": string()})), "scale_sources": list_of(string())},
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
    required={"name": string(), "rank": integer(minimum=1, maximum=INT64_MAX), "scale": number(finite=False),
              "importance": nullable(list_of(_maybe_number)), "layer": string(), "kind": string()},
    optional={"shape": list_of(integer(minimum=0), length=2), "spectrum": nullable(list_of(_maybe_number)),
              "energy_rank": nullable(obj(required={_ENERGY_LEVELS[1]: nullable(integer(minimum=0))},
                                          optional={level: nullable(integer(minimum=0)) for level in _ENERGY_LEVELS})),
              "stable_rank": _maybe_number, "spectral_effective_rank": _maybe_number,
              "scores": list_of(_maybe_number), "adalora_E": list_of(_maybe_number), "error": string(),
              "layer_type": string(), "dtype": string(), "scale_source": string()},
    extra=_module_fields_agree,
)
_SNAPSHOT = obj(
    required={"step": nullable(STEP), "modules": list_of(_MODULE), "summary": _SUMMARY,
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


# ----------------------------------------------------------------------------- trace-v1

TRACE_WHAT = "a rank trace record (trace-v1)"
_PER_RANK = ("importance", "spectrum", "scores", "E")  # lists of one number (or null) per rank


_NUMBER_TYPES = frozenset({int, float, type(None)})
_numbers_or_null = list_of(nullable(number()))


def _per_rank(value: Any, field: str) -> None:
    """A list of numbers or nulls: one pass in C for the usual list (a trace holds ~30,000 per record), the
    element-by-element check only to name what is wrong."""
    if not (isinstance(value, list) and set(map(type, value)) <= _NUMBER_TYPES
            and math.inf not in value and -math.inf not in value):
        _numbers_or_null(value, field)


def _trace_lengths(module: dict, field: str) -> None:
    for key in _PER_RANK:
        values = module.get(key)
        if values is not None and len(values) != module["rank"]:
            raise _Invalid(_join(field, key), values, f"one value per rank ({module['rank']})")


_TRACE_MODULE = obj(
    required={"name": string(), "rank": integer(minimum=1, maximum=INT64_MAX), "scale": number(),
              "shape": list_of(integer(minimum=1, maximum=INT64_MAX), length=2)},
    optional={"layer_type": string(), "dtype": string(), "dora": boolean, "error": nullable(string()),
              **{key: nullable(_per_rank) for key in _PER_RANK}},
    extra=_trace_lengths,
)
_TRACE_RECORD = obj(
    required={"schema": string(), "step": STEP, "modules": list_of(_TRACE_MODULE)},
    optional={"time": number(), "format": string(), "method": string(),
              "beamlora": nullable(obj(optional={"ranks_operated": nullable(integer(minimum=0)),
                                                 "operation_step": nullable(STEP)}))},
)


def check_trace_record(record: Any, source: str) -> dict[str, Any]:
    """One record of ``rank_trace.jsonl``: the fields that become an analysis snapshot (rank ≥ 1, shapes of
    positive integers, one value per rank, a step of 0 or more), so a bad record is refused where it is read."""
    return check(record, _TRACE_RECORD, source, TRACE_WHAT)


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


__all__ = ["open_regular", "loads", "json_int", "parse_json", "read_json", "json_lines", "check", "fail", "describe",
           "is_int", "is_number", "check_adapter_config", "check_temperature", "check_trainer_state", "check_event",
           "check_run_config", "check_analysis", "check_sweep", "check_trace_record", "STEP", "INT64_MAX"]
