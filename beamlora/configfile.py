"""``beamlora train --config FILE``: a YAML or JSON file of :class:`~beamlora.config.TrainConfig` fields.

Keys are the field names (``grad_accum``; the option spelling ``grad-accum`` is read too). Every value is
checked against the field's type here, so an unknown key or a wrong type is one error naming the key and the
expected type, before anything loads. A run's own ``config.json`` reads as a config file too (its extra
records, such as ``versions``, are skipped), so a run reruns with ``--config RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from beamlora.config import TrainConfig
from beamlora.errors import BeamLoraError
from rankscope.io.validate import open_regular

FIELDS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# Keys that mean the same setting: one given on the command line replaces the other from the file.
EXCLUSIVE = (("steps", "epochs"), ("warmup_steps", "warmup_ratio"))
_WHAT = "a YAML or JSON file of beamlora train options"
_RUN_RECORD = "versions"  # a key every run's config.json has and no option file needs

# What each annotation (a string: the module uses postponed annotations) accepts, and its words for errors.
_TYPES = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list[str]": ("a list of strings or one comma-separated string",
                  lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))),
}


def expected_type(name: str) -> str:
    """The words for what field ``name`` takes, e.g. "an integer or null"."""
    annotation = str(FIELDS[name]).replace(" ", "")
    base = annotation.removesuffix("|None")
    words = _TYPES[base][0]
    return f"{words} or null" if base != annotation else words


def _check(name: str, value: Any, source: str) -> Any:
    annotation = str(FIELDS[name]).replace(" ", "")
    base = annotation.removesuffix("|None")
    if value is None and base != annotation:
        return None
    if not _TYPES[base][1](value):
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
        raise BeamLoraError(f"{source}: key {name!r} is {shown} ({type(value).__name__}), expected {expected_type(name)}")
    if base == "list[str]":
        items = value.split(",") if isinstance(value, str) else value
        return [item.strip() for item in items if item.strip()]
    return value


def _yaml_loader():
    """PyYAML's SafeLoader, but reading ``3e-4`` as a number (YAML 1.2), not as the string YAML 1.1 makes of it."""
    import yaml  # imported on use: only a YAML config needs it

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise BeamLoraError(f"{path} is not valid JSON ({e}): expected {_WHAT}") from None
    import yaml  # imported on use: only a YAML config needs it

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise BeamLoraError(f"{path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}): "
                            f"expected {_WHAT}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in ``path`` (.yaml, .yml or .json), checked key by key; keys as TrainConfig field names."""
    path = Path(path)
    with open_regular(path, _WHAT) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BeamLoraError(f"{path} is not UTF-8 text (byte {e.start}): expected {_WHAT}") from None
    document = _parse(path, text)
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise BeamLoraError(f"{path} holds a {type(document).__name__}, expected {_WHAT} (key: value lines)")
    is_run_record = _RUN_RECORD in document
    out: dict[str, Any] = {}
    for key, value in document.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            if is_run_record:
                continue  # a run's config.json: what it records beside the options (versions, train_examples, ...)
            raise BeamLoraError(f"{path}: unknown key {key!r}, expected one of {', '.join(FIELDS)}")
        if name in out:
            raise BeamLoraError(f"{path}: key {name!r} given twice")
        out[name] = _check(name, value, str(path))
    if is_run_record and out.get("steps") is not None:
        out.pop("epochs", None)  # the run resolved its epochs into steps: rerun those steps
    return out


def merge(from_file: dict[str, Any], from_command_line: dict[str, Any]) -> dict[str, Any]:
    """The file's options with the command line's on top; a command-line setting replaces its counterpart
    (``--steps`` the file's ``epochs``, ``--warmup-ratio`` its ``warmup_steps``, and the other way round)."""
    merged = dict(from_file)
    for pair in EXCLUSIVE:
        for name, other in (pair, pair[::-1]):
            if from_command_line.get(name) is not None:
                merged.pop(other, None)
    merged.update(from_command_line)
    return merged
