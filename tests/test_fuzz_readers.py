"""Fuzzing every reader with hypothesis: mutated real checkpoints load, or fail with RankscopeError.

Each example copies one real fixture (../shared/fixtures/real, never touched) into a fresh
temporary folder, mutates it (safetensors headers, raw bytes, adapter configs, trainer_state.json,
events.jsonl, BeamLoRA scores, analysis and sweep JSON read back) and asserts that
``rankscope.analyze`` either succeeds or raises :class:`RankscopeError` with a one-line message,
never any other exception, and within a time limit. For safetensors headers it also checks
rankscope's reader against the official one: it never accepts a header that ``safe_open``
refuses, and refuses only what ``safe_open`` refuses or a duplicated name.

``HYPOTHESIS_PROFILE=long`` (``make fuzz``) runs many more examples than the suite's profile,
with fresh random draws each time; the suite's profile is derandomised, so it is reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import rankscope
from rankscope.errors import RankscopeError
from rankscope.io.formats import FORMATS

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
TIME_LIMIT_S = 30.0  # one example takes well under a second; a hang is anything far beyond that

settings.register_profile("suite", max_examples=350, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=4000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


def examples(weight: float) -> settings:
    """The profile, with this test's share of its examples."""
    return settings(PROFILE, max_examples=max(5, int(PROFILE.max_examples * weight)))


# ----------------------------------------------------------------------------- harness


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test hides it."""


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def fixture_copy(name: str) -> Iterator[Path]:
    """A private copy of one real fixture; the originals are only ever read."""
    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        target = Path(tmp) / name
        shutil.copytree(REAL / name, target)
        yield target


def outcome(call: Callable[[], Any]) -> str:
    """'ok' or 'error' (a RankscopeError with a one-line message); anything else fails the test."""
    with time_limit():
        try:
            call()
        except RankscopeError as e:
            message = str(e)
            assert message and "\n" not in message, f"not a one-line message: {message!r}"
            assert "/." not in message, f"the message names a hidden file: {message}"
            record(f"RankscopeError: {message[:300]}", "RankscopeError")
            return "error"
    record("loaded", "loaded")
    return "ok"


def record(text: str, kind: str) -> None:
    """Note the outcome for a failing example's report and count it in the statistics (inside a test only)."""
    with contextlib.suppress(InvalidArgument):
        note(text)
        event(kind)


def analyze(path: Path, format: str | None = None) -> str:
    return outcome(lambda: rankscope.analyze(path, format=format, progress=False))


def write_replacing(path: Path, data: bytes) -> None:
    """Replace the copy's file with a new one (a new inode: nothing shared with the original is written)."""
    tmp = path.with_name(path.name + ".fuzz-new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- values

DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}
SAFETENSORS_DTYPES = list(DTYPE_BITS)
U64 = 2**64 - 1

# Number literals beyond float range, which json.dumps cannot write: a marker string, replaced by the literal in
# the text written (raw_numbers). 10**400 parses as an int whose float() overflows, 1e400 as inf, and 5000
# digits exceed Python's integer string-conversion limit.
RAW_NUMBERS = ["1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "7" * 5000, "1" + "0" * 19, "-5"]
RAW = "@@raw:{}@@"
_RAW_MARK = re.compile(r'"@@raw:(-?[0-9e]+)@@"')


def raw_numbers(text: str) -> str:
    """JSON text with each raw-number marker replaced by its literal."""
    return _RAW_MARK.sub(lambda m: m.group(1), text)


raw_number = st.sampled_from([RAW.format(n) for n in RAW_NUMBERS])
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=8) | raw_number)
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)


def near_misses(original: Any) -> st.SearchStrategy:
    """Values a careless writer puts where ``original`` belongs: the same thing in the wrong type, or at an edge."""
    candidates = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), -float("inf"), "", [], {}, 2**63, 2**64,
                  str(original), [original], {"value": original}, *(RAW.format(n) for n in RAW_NUMBERS)]
    if isinstance(original, (int, float)) and not isinstance(original, bool):
        candidates += [-original, original * 2, original + 1, float(original), original * 10**20]
    if isinstance(original, list):
        candidates += [original[::-1], original[:-1], original + original[-1:], [str(x) for x in original],
                       [float(x) if isinstance(x, int) else x for x in original], [-x if isinstance(x, int) else x for x in original]]
    return st.sampled_from(candidates) | json_values


def nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


# ----------------------------------------------------------------------------- safetensors headers

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


NEST_MARK = "@@nest{}@@"


def well_formed(entry: Any) -> bool:
    def ints(value: Any) -> bool:
        return isinstance(value, list) and all(type(x) is int for x in value)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape"))
            and ints(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2)


@st.composite
def header_mutation(draw, header: dict) -> tuple[dict, list[tuple[str, str]]]:
    """One edit of a parsed header; returns the header and raw text substitutions (nesting, duplicates)."""
    header = copy.deepcopy(header)
    raw_edits: list[tuple[str, str]] = []
    # Edits of a field need an entry an earlier edit left whole; the others work on any header.
    whole = [k for k, v in header.items() if k != "__metadata__" and well_formed(v)]
    names = [k for k in header if k != "__metadata__"]
    kinds = ["rename", "duplicate", "metadata", "lora-metadata", "extra-tensor", "entry", "delete-tensor"] if names else [
        "metadata", "extra-tensor"]
    if whole:
        kinds += ["offsets", "offsets-from-other", "shift", "dtype", "reinterpret", "reinterpret", "shape",
                  "delete-field", "nest", "extra-field"]
    kind = draw(st.sampled_from(kinds))
    needs_whole = kind in ("offsets", "offsets-from-other", "shift", "dtype", "reinterpret", "shape", "delete-field", "nest",
                           "extra-field")
    name = draw(st.sampled_from(whole if needs_whole else names)) if names else None
    entry = header.get(name)
    note(f"header edit {kind} on {name}")
    if kind == "offsets":
        entry["data_offsets"] = draw(near_misses(entry["data_offsets"]) | st.lists(st.integers(-5, 10**7), min_size=2, max_size=2))
    elif kind == "offsets-from-other":
        other = header[draw(st.sampled_from(whole))]
        entry["data_offsets"] = list(other["data_offsets"])
        if draw(st.booleans()):
            entry["shape"], entry["dtype"] = list(other["shape"]), other["dtype"]
    elif kind == "shift":
        delta = draw(st.integers(-64, 64))
        entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta * draw(st.sampled_from([0, 1]))]
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES + ["float32", "f32", "", "Q8_0"]) | json_scalars)
    elif kind == "reinterpret":  # the same bytes read as another dtype: a valid header whose values change
        old_bits = DTYPE_BITS.get(entry["dtype"], 32)
        new_dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
        shape = list(entry["shape"])
        if shape and (shape[-1] * old_bits) % DTYPE_BITS[new_dtype] == 0:
            shape[-1] = shape[-1] * old_bits // DTYPE_BITS[new_dtype]
            entry["dtype"], entry["shape"] = new_dtype, shape
    elif kind == "shape":
        shape = entry.get("shape")
        permuted = st.permutations(shape).map(list) if isinstance(shape, list) else st.nothing()
        entry["shape"] = draw(near_misses(shape) | permuted | st.lists(st.integers(-2, U64 + 2), max_size=4))
    elif kind == "delete-tensor":
        del header[name]
    elif kind == "delete-field":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif kind == "rename":
        replacement = draw(st.sampled_from([("lora_A", "lora_B"), ("lora_B", "lora_A"), ("lora_a", "lora_b"), ("down", "up"),
                                            ("weight", "alpha"), (".", "_"), ("lora_A", "lora_E"), ("lora_A", "lora_gate"),
                                            ("w_a", "w_b"), ("w_b", "w_a"), (":down", ":up"), (":", "."), ("lora_A", "lora_down")]))
        new_name = draw(st.just(name.replace(*replacement)) | st.text(max_size=12))
        header = {(new_name if k == name else k): v for k, v in header.items()}
    elif kind == "duplicate":
        other = draw(st.sampled_from(names))
        mark = NEST_MARK.format(f"dup{len(header)}")
        header[mark] = 0
        raw_edits.append((f'"{mark}": 0', f"{json.dumps(other)}: {json.dumps(header[other])}"))
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values | st.dictionaries(st.text(max_size=6), json_scalars, max_size=3)
                                      | st.dictionaries(st.sampled_from(["format", "ss_network_alpha", "lora_adapter_metadata"]),
                                                        st.text(max_size=8) | json_scalars, min_size=1, max_size=2))
    elif kind == "lora-metadata":  # diffusers' LoraConfig in the metadata: flat, per component, or packed "unet.r"
        metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
        config = {"r": draw(near_misses(4)), "lora_alpha": draw(near_misses(16)),
                  draw(st.sampled_from(["rank_pattern", "alpha_pattern"])): draw(st.dictionaries(
                      st.sampled_from(["to_q", "attn1.to_k", "(", ".*", "w_000"]) | st.text(max_size=6),
                      st.integers(-2, 16) | json_scalars, max_size=2))}
        layout = draw(st.sampled_from(["flat", "nested", "packed", "not-json"]))
        if layout == "nested":
            config = {draw(st.sampled_from(["unet", "transformer", "down_blocks", ""])): config}
        elif layout == "packed":
            config = {f"{draw(st.sampled_from(['unet', 'down_blocks', 'text_encoder']))}.{k}": v for k, v in config.items()}
        text = raw_numbers(json.dumps(config))
        metadata["lora_adapter_metadata"] = text[:draw(st.integers(0, len(text)))] if layout == "not-json" else text
        header["__metadata__"] = metadata
    elif kind == "nest":
        depth = draw(st.sampled_from([1, 3, 100, 1000, 5000, 100_000]))
        mark = NEST_MARK.format(depth)
        field = draw(st.sampled_from(["data_offsets", "shape", "dtype", "__entry__"]))
        if field == "__entry__":
            header[name] = mark
        else:
            entry[field] = mark
        raw_edits.append((json.dumps(mark), nested(depth)))
    elif kind == "extra-tensor":
        header[draw(st.text(max_size=10))] = draw(json_values | st.fixed_dictionaries({
            "dtype": st.sampled_from(SAFETENSORS_DTYPES), "shape": st.lists(st.integers(0, 8), max_size=3),
            "data_offsets": st.lists(st.integers(0, 10**6), min_size=2, max_size=2)}))
    elif kind == "extra-field":
        entry[draw(st.text(max_size=6))] = draw(json_values)
    else:  # the whole entry
        header[name] = draw(json_values)
    return header, raw_edits


@st.composite
def header_case(draw) -> dict:
    fixture = draw(st.sampled_from(["peft-gpt2-conv1d", "peft-roberta-series", "mlx-gemma-series", "diffusers-legacy-sd15",
                                    "diffusers-peft-metadata-sd15", "lora-diffusion-cloneofsimo-sd15", "lora-vit-sam"]))
    files = sorted(p.relative_to(REAL / fixture) for p in (REAL / fixture).rglob("*.safetensors"))
    target = draw(st.sampled_from(files))
    header, data = split_safetensors((REAL / fixture / target).read_bytes())
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        header, raw = draw(header_mutation(header))
        edits += raw
    text = raw_numbers(json.dumps(header))  # NaN and Infinity as Python writes them: invalid JSON the reader must refuse
    for old, new in edits:
        text = text.replace(old, new)
    encoded = text.encode("utf-8", "surrogatepass")
    length = len(encoded)
    if draw(st.integers(0, 9)) == 0:  # now and then, a wrong length field too
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, length + 8, 2**63, U64, 100_000_001]) | st.integers(0, U64))
    return {"fixture": fixture, "target": target, "bytes": length.to_bytes(8, "little") + encoded + data,
            "format": draw(st.none() | st.none() | st.sampled_from(FORMATS))}


def official_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
        return True
    except Exception:  # the official reader raises SafetensorError, and others on odd input
        return False


def rankscope_accepts(path: Path) -> bool:
    from rankscope.io.tensors import SafetensorsFile

    return outcome(lambda: SafetensorsFile(path)) == "ok"


def has_duplicate_names(data: bytes) -> bool:
    n = int.from_bytes(data[:8], "little")
    seen: list[bool] = []

    def pairs(items):
        keys = [k for k, _ in items]
        seen.append(len(set(keys)) != len(keys))
        return dict(items)

    try:
        json.loads(data[8:8 + n], object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return False
    return any(seen)


@examples(0.35)
@given(case=header_case())
def test_mutated_safetensors_headers(case):
    with fixture_copy(case["fixture"]) as root:
        path = root / case["target"]
        write_replacing(path, case["bytes"])
        ours, theirs = rankscope_accepts(path), official_accepts(path)
        # Never laxer than the official reader; stricter only on a duplicated name (it keeps the last one).
        assert not ours or theirs, "rankscope read a header the official safetensors reader refuses"
        assert ours or not theirs or has_duplicate_names(case["bytes"]), \
            "rankscope refused a header the official safetensors reader accepts"
        analyze(root, case["format"])


# ----------------------------------------------------------------------------- raw bytes


GROW_OR_CUT = ("truncate", "append", "insert")


def grow_or_cut(draw, data: bytearray, kind: str) -> None:
    """A file cut short at a random byte, bytes appended, or bytes inserted anywhere (``data`` edited in place)."""
    if kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))


@st.composite
def byte_case(draw) -> dict:
    fixture = draw(st.sampled_from(["peft-gpt2-conv1d", "peft-roberta-series/checkpoint-500", "mlx-gemma-series",
                                    "peft-bloom-enable-lora", "lora-vit-sam", "diffusers-peft-metadata-sd15"]))
    files = sorted(p.relative_to(REAL / fixture) for p in (REAL / fixture).rglob("*") if p.is_file())
    target = draw(st.sampled_from(files))
    data = bytearray((REAL / fixture / target).read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little") if target.suffix == ".safetensors" else 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip-length", "flip-header", "flip-data", "truncate", "append", "insert"]))
        note(f"byte edit {kind} on {target}")
        if not data:
            break
        if kind in GROW_OR_CUT:
            grow_or_cut(draw, data, kind)
        else:
            low, high = {"flip-length": (0, 7), "flip-header": (8, max(8, header_end - 1)),
                         "flip-data": (header_end, len(data) - 1)}[kind]
            at = draw(st.integers(min(low, len(data) - 1), min(high, len(data) - 1)))
            data[at] ^= draw(st.integers(1, 255))
    return {"fixture": fixture, "target": target, "bytes": bytes(data)}


@examples(0.2)
@given(case=byte_case())
def test_flipped_and_truncated_bytes(case):
    with fixture_copy(case["fixture"]) as root:
        write_replacing(root / case["target"], case["bytes"])
        analyze(root)


# ----------------------------------------------------------------------------- configs

CONFIG_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "lora_parameters",
                 "beamlora_temperature", "target_modules", "fan_in_fan_out", "enable_lora"]


@st.composite
def config_case(draw) -> dict:
    fixture, config_path = draw(st.sampled_from([
        ("peft-gpt2-conv1d", "adapter_config.json"), ("peft-roberta-series/checkpoint-500", "adapter_config.json"),
        ("mlx-gemma-series", "adapter_config.json"), ("diffusers-legacy-sd15", "adapter_config.json"),
        ("peft-bloom-enable-lora", "adapter_config.json")]))
    existing = REAL / fixture / config_path
    config = json.loads(existing.read_text()) if existing.is_file() else {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "set", "delete", "pattern", "mlx", "whole"]))
        key = draw(st.sampled_from(CONFIG_FIELDS + sorted(config)))
        note(f"config edit {kind} {key}")
        if kind == "set":
            config[key] = draw(near_misses(config.get(key, 8)))
        elif kind == "delete":
            config.pop(key, None)
        elif kind == "pattern":
            pattern_key = draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))
            config[pattern_key] = draw(st.dictionaries(st.sampled_from(["query", "c_attn", "q_proj", "(", "[a-", ".*", "layer.0.*query"])
                                                       | st.text(max_size=6), st.integers(-2, 16) | json_scalars, max_size=3))
        elif kind == "mlx":
            params = config.setdefault("lora_parameters", {}) if isinstance(config.get("lora_parameters"), dict) else {}
            config["lora_parameters"] = params
            params[draw(st.sampled_from(["scale", "alpha", "rank"]))] = draw(near_misses(10.0))
        else:
            config = draw(json_values)
            break
    text = raw_numbers(json.dumps(config))
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]  # a half-written file
    return {"fixture": fixture, "target": config_path, "bytes": text.encode()}


@examples(0.2)
@given(case=config_case())
def test_mutated_adapter_configs(case):
    with fixture_copy(case["fixture"]) as root:
        write_replacing(root / case["target"], case["bytes"])
        analyze(root)


# ----------------------------------------------------------------------------- run folders


@st.composite
def run_case(draw) -> dict:
    steps = ["checkpoint-500", "checkpoint-1000", "checkpoint-1500", "checkpoint-2000", "checkpoint-2400"]
    edits: list[tuple[str, str, bytes | None]] = []  # (kind, relative path, bytes)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["state", "state-bytes", "events", "events-bytes", "scores", "hidden", "loop"]))
        step = draw(st.sampled_from(steps))
        note(f"run edit {kind} in {step}")
        if kind == "state":
            state = json.loads((REAL / "peft-roberta-series" / step / "trainer_state.json").read_text())
            state["global_step"] = draw(near_misses(state["global_step"]))
            edits.append((kind, f"{step}/trainer_state.json", raw_numbers(json.dumps(state)).encode()))
        elif kind == "state-bytes":
            edits.append((kind, f"{step}/trainer_state.json", draw(st.binary(max_size=40) | st.sampled_from(
                [b'{"global_step": NaN}', b'{"global_step": Infinity}', b'{"global_step": 1e400}', b'[]', b'{"global_step": 5',
                 b'{"global_step": 1' + b"0" * 400 + b"}", b'{"global_step": ' + b"7" * 5000 + b"}"]))))
        elif kind == "events":
            lines = draw(st.lists(json_values | st.fixed_dictionaries(
                {"step": near_misses(500), "module": st.text(max_size=5) | json_scalars, "pruned": near_misses([1, 2]),
                 "p": near_misses(0.95)}), min_size=1, max_size=4))
            text = "".join(raw_numbers(json.dumps(x)) + "\n" for x in lines)
            if draw(st.booleans()):
                text = text[:draw(st.integers(0, len(text)))]  # a last line cut short mid-write
            edits.append((kind, "events.jsonl", text.encode()))
        elif kind == "events-bytes":
            edits.append((kind, "events.jsonl", draw(st.binary(max_size=60))))
        elif kind == "scores":
            import numpy as np
            from safetensors.numpy import save as save_numpy

            name = draw(st.sampled_from(["base_model.model.roberta.encoder.layer.0.attention.self.query", "other"]))
            shape = draw(st.lists(st.integers(0, 4), max_size=2))
            edits.append((kind, f"{step}/beamlora_scores.safetensors",
                          save_numpy({name: np.ones(shape, dtype=np.float32)})))
        elif kind == "hidden":
            edits.append((kind, f".{step}.x1y2z3.tmp/adapter_model.safetensors", draw(st.binary(max_size=16))))
        else:
            edits.append((kind, draw(st.sampled_from([f"{step}/adapter_model.safetensors", f"{step}/adapter_config.json",
                                                      f"{step}/trainer_state.json", "events.jsonl"])), None))
    return {"edits": edits}


@examples(0.15)
@given(case=run_case())
def test_mutated_run_folders(case):
    with fixture_copy("peft-roberta-series") as root:
        for kind, relative, data in case["edits"]:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path):
                path.unlink()
            if data is None:
                os.symlink(path.name, path)  # a link to itself: a loop
            else:
                path.write_bytes(data)
        analyze(root)


# ----------------------------------------------------------------------------- JSON documents read back


@functools.lru_cache(maxsize=1)
def real_analysis() -> str:
    from rankscope.io.documents import to_json

    return to_json(rankscope.analyze(REAL / "peft-roberta-series", progress=False))


def sweep_document() -> dict:
    points = [{"order": order, "fraction": f / 10, "seed": None, "value": 0.9 - 0.05 * f * (order == "most")}
              for order in ("least", "most") for f in range(11)]
    return {"schema": "rankscope/sweep-v1", "metric": "accuracy", "baseline": 0.9, "higher_is_better": True,
            "points": points}


def json_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i in sorted({0, 1, len(value) - 1} & set(range(len(value)))):  # first and last: far fewer paths
            yield from json_paths(value[i], prefix + (i,))


DELETE = "<delete>"


def apply_edit(document: Any, path: tuple, value: Any) -> bool:
    """Set (or delete) the value at ``path``; False when an earlier edit removed the path."""
    parent = document
    try:
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]]
    except (KeyError, IndexError, TypeError):
        return False
    if value == DELETE and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return True


def base_document(which: str) -> Any:
    return json.loads(real_analysis()) if which == "analysis" else sweep_document()


@st.composite
def document_case(draw) -> dict:
    """Edits of a real analysis (or a sweep) document: a field set to a near miss, or deleted."""
    which = draw(st.sampled_from(["analysis", "sweep"]))
    document = base_document(which)
    paths = [p for p in json_paths(document) if p]
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            original = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
        value = DELETE if draw(st.integers(0, 3)) == 0 else draw(near_misses(original))
        apply_edit(document, path, value)
        edits.append((path, value))
    return {"which": which, "edits": edits}


@examples(0.25)
@given(case=document_case())
def test_mutated_documents_read_back(case):
    from rankscope.io.documents import load_document
    from rankscope.maths.compare import compare, load_run_for_compare
    from rankscope.views.outputs import temporal_view
    from rankscope.views.text import summary_lines

    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        tmp = Path(tmp)
        good = tmp / "good.json"
        good.write_text(real_analysis())
        document = base_document(case["which"])
        for path, value in case["edits"]:
            apply_edit(document, path, value)
        if case["which"] == "analysis":
            path = tmp / "analysis.json"
            path.write_text(raw_numbers(json.dumps(document)))

            def consume():
                document = load_document(path)
                summary_lines(document)
                temporal_view(document, total_steps=6000)
                compare([document, load_document(good)], labels=["mutated", "good"])
        else:
            run = tmp / "run"
            run.mkdir()
            shutil.copytree(REAL / "peft-roberta-series" / "checkpoint-2400", run / "checkpoint-2400")
            (run / "sweep.json").write_text(raw_numbers(json.dumps(document)))
            (tmp / "sweep.json").write_text(json.dumps(sweep_document()))

            def consume():
                first, second = load_run_for_compare(run), load_run_for_compare(good)
                compare([first[0], second[0]], labels=["mutated", "good"], sweeps=[first[1], second[1]])

        outcome(consume)


# ----------------------------------------------------------------------------- rank traces


@functools.lru_cache(maxsize=1)
def real_trace_lines() -> tuple[str, ...]:
    """A rank trace written with rankscope's own writer from the real roberta run's analysis: one record a snapshot."""
    from rankscope.io.trace import module_text, record_text

    document = json.loads(real_analysis())
    lines = []
    for snapshot in document["snapshots"]:
        modules = [module_text({k: m[k] for k in ("name", "rank", "scale", "shape", "layer_type", "dtype")},
                               {"importance": m["importance"], "spectrum": m["spectrum"]}) for m in snapshot["modules"]]
        lines.append(record_text(snapshot["step"], modules, time=1.0))
    return tuple(lines)


TRACE_FIELDS = ["rank", "scale", "shape", "importance", "spectrum", "name", "dtype", "error"]


@st.composite
def trace_case(draw) -> dict:
    """Edits of a real trace: a module field or a record's step set to a near miss (raw numbers beyond float range
    included), a line cut short, lines dropped or repeated (a resumed run)."""
    lines = [json.loads(line) for line in real_trace_lines()]
    texts: list[str | None] = [None] * len(lines)  # a raw text that replaces the record's JSON (a torn line)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["module", "module", "step", "torn", "drop", "repeat", "per-rank"]))
        i = draw(st.integers(0, len(lines) - 1))
        note(f"trace edit {kind} on record {i}")
        record = lines[i]
        if kind == "module" and record["modules"]:
            module = draw(st.sampled_from(record["modules"]))
            key = draw(st.sampled_from(TRACE_FIELDS))
            module[key] = draw(near_misses(module.get(key, 2)))
        elif kind == "per-rank" and record["modules"]:
            module = draw(st.sampled_from(record["modules"]))
            values = module[draw(st.sampled_from(["importance", "spectrum"]))]
            if isinstance(values, list) and values:  # an earlier edit may have replaced the list itself
                values[draw(st.integers(0, len(values) - 1))] = draw(near_misses(1.0))
        elif kind == "step":
            record["step"] = draw(near_misses(record["step"]) | st.integers(-10, 3000))
        elif kind == "torn":
            text = json.dumps(record)
            texts[i] = text[:draw(st.integers(0, len(text) - 1))]
        elif kind == "drop" and len(lines) > 1:
            del lines[i], texts[i]
        elif kind == "repeat":
            lines.append(copy.deepcopy(record))
            texts.append(None)
    body = "".join((text if text is not None else raw_numbers(json.dumps(record))) + "\n"
                   for record, text in zip(lines, texts))
    return {"text": body, "last_only": draw(st.booleans())}


@examples(0.15)
@given(case=trace_case())
def test_mutated_rank_traces(case):
    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        path = Path(tmp) / "rank_trace.jsonl"
        path.write_text(case["text"])
        outcome(lambda: rankscope.analyze(path, progress=False, last_only=case["last_only"]))


# ----------------------------------------------------------------------------- odd tensors, built from scratch

FLOATS = ["float16", "float32", "float64", "bfloat16"]
ODD = ["int8", "int32", "int64", "uint8", "bool", "complex64", "float8_e4m3fn", "float8_e5m2", "sparse", "meta",
       "qint8"]
NUMPY_ONLY = {"float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"}  # what safetensors.numpy writes


@st.composite
def tensor_case(draw) -> dict:
    """A one-module adapter (PEFT, or another key family) whose factors have any dtype and any (possibly zero) dimensions."""
    container = draw(st.sampled_from(["safetensors", "pickle"]))
    family = draw(st.sampled_from(sorted(FAMILY_NAMES)))
    kinds = FLOATS + ODD if container == "pickle" else sorted(NUMPY_ONLY)
    dtypes = [draw(st.sampled_from(kinds)) for _ in range(2)]
    r, n_in, n_out = draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(0, 5))
    return {"container": container, "family": family, "dtypes": dtypes, "shapes": [(r, n_in), (n_out, r)]}


FAMILY_NAMES = {  # the A and B of one module, as each key family names them
    "peft": ["base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"],
    "lora-vit": ["w_a_000", "w_b_000"],
    "lora-diffusion": ["unet:0:down", "unet:0:up"],
    "comfyui": ["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"],
    "kohya-flux": ["lora_unet_single_blocks_0_linear1.lora_down.weight", "lora_unet_single_blocks_0_linear1.lora_up.weight"],
}


def _make(kind: str, shape: tuple[int, int], rng):
    import torch

    base = torch.from_numpy(rng.normal(size=shape).astype("float32"))
    if kind == "sparse":
        return base.to_sparse()
    if kind == "meta":
        return base.to("meta")
    if kind == "qint8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantised tensors: they still come in old files
            return torch.quantize_per_tensor(base, 0.1, 0, torch.qint8)
    return (base * 3).to(getattr(torch, kind))


@examples(0.15)
@given(case=tensor_case())
def test_factors_of_any_dtype_and_shape(case):
    """Dense floating factors with r, in, out ≥ 1 load; anything else is one error naming what it found."""
    import numpy as np

    rng = np.random.default_rng(0)
    names = FAMILY_NAMES[case.get("family", "peft")]
    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        folder = Path(tmp)
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
        if case["container"] == "safetensors":
            from safetensors.numpy import save_file

            arrays = {n: (rng.normal(size=shape) * 3).astype(kind) for n, kind, shape in
                      zip(names, case["dtypes"], case["shapes"])}
            save_file(arrays, folder / "adapter_model.safetensors")
        else:
            import torch

            torch.save({n: _make(kind, shape, rng) for n, kind, shape in zip(names, case["dtypes"], case["shapes"])},
                       folder / "adapter_model.bin")
        result = outcome(lambda: rankscope.analyze(folder, progress=False))
    r, n_in = case["shapes"][0]
    n_out = case["shapes"][1][0]
    readable = all(kind in FLOATS for kind in case["dtypes"]) and min(r, n_in, n_out) >= 1
    assert result == ("ok" if readable else "error"), case


# ----------------------------------------------------------------------------- files that change while read


@st.composite
def change_case(draw) -> dict:
    fixture, name = draw(st.sampled_from([("peft-gpt2-conv1d", "adapter_model.safetensors"),
                                          ("mlx-gemma-series", "adapters.safetensors"),
                                          ("diffusers-legacy-sd15", "pytorch_lora_weights.safetensors")]))
    size = (REAL / fixture / name).stat().st_size
    kind = draw(st.sampled_from(["truncate", "truncate", "append", "rewrite"]))
    at = draw(st.integers(0, size - 1)) if kind == "truncate" else None
    return {"fixture": fixture, "name": name, "kind": kind, "at": at}


@examples(0.1)
@given(case=change_case())
def test_files_that_change_while_they_are_read(case):
    """The file is opened (rankscope.load), then cut short, grown or rewritten before its tensors are read: the
    analysis is one "changed while it was read" error, never SIGBUS (a memory-mapped reader died here)."""
    from rankscope.maths.analysis import analyze_checkpoint

    with fixture_copy(case["fixture"]) as root:
        path = root / case["name"]
        checkpoint = rankscope.load(path)
        if case["kind"] == "truncate":
            os.truncate(path, case["at"])
        elif case["kind"] == "append":
            with open(path, "ab") as f:
                f.write(b"\0" * 8)
        else:
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with time_limit():
            try:
                analyze_checkpoint(checkpoint, spectrum=False)
            except RankscopeError as e:
                assert "changed while it was read" in str(e) and "\n" not in str(e), str(e)
                return
        raise AssertionError("a file that changed while it was read was analysed as if it had not")


# ----------------------------------------------------------------------------- GGUF adapters (llama.cpp)


@functools.lru_cache(maxsize=1)
def gguf_adapter() -> tuple[bytes, tuple[tuple[int, int], ...]]:
    """A small GGUF LoRA adapter written by gguf's GGUFWriter as convert_lora_to_gguf.py writes it (f16 and q8_0
    factors, a norm vector), and the byte spans of its header's 8-byte counts, lengths, dims and offsets."""
    import gguf
    import numpy as np
    from helpers.gguf_adapters import llama_modules, write_gguf_lora

    modules = llama_modules(blocks=2, r=4, d=32, ff=64)
    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        path = write_gguf_lora(Path(tmp) / "a.gguf", "llama", dict(list(modules.items())[:5]), 8.0, "q8_0",
                               norms={"blk.0.attn_norm.weight": np.ones(32)})
        data = path.read_bytes()
        # Every u64 the header holds (counts, string lengths, dims, offsets): where a lying number does most harm.
        reader = gguf.GGUFReader(path)
        spans = []
        for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
            for part in field.parts:
                if part.dtype.itemsize == 8 and part.size:
                    start = part.ctypes.data - reader.data.ctypes.data
                    spans += [(start + 8 * i, 8) for i in range(part.size)]
        del reader, field, part
    assert spans and all(len(data) >= at + n for at, n in spans)
    return data, tuple(spans)


@st.composite
def gguf_case(draw) -> dict:
    data, spans = gguf_adapter()
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["number", "number", "flip", "truncate", "append", "insert", "type"]))
        note(f"gguf edit {kind}")
        if kind == "number":  # a count, a length, a dim or an offset that lies
            at, _ = draw(st.sampled_from(spans))
            old = int.from_bytes(data[at:at + 8], "little")
            new = draw(st.sampled_from([0, 1, old + 1, old - 1 if old else 0, old * 2, old + 32, 2**32, 2**63, U64,
                                        len(data), len(data) * 4]) | st.integers(0, U64))
            data[at:at + 8] = new.to_bytes(8, "little")
        elif kind == "type":  # a value or tensor type code: a 4-byte field just before an 8-byte one
            at, _ = draw(st.sampled_from(spans))
            if at >= 4:
                data[at - 4:at] = draw(st.sampled_from([0, 1, 2, 8, 9, 13, 30, 39, 99, 2**31])).to_bytes(4, "little")
        elif kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif kind in GROW_OR_CUT and (data or kind != "truncate"):
            grow_or_cut(draw, data, kind)
    return {"bytes": bytes(data), "resize": draw(st.booleans())}


@examples(0.1)
@given(case=gguf_case())
def test_mutated_gguf_adapters(case):
    """A corrupted GGUF adapter is read, analysed and resized, or refused with one line: never another exception,
    never a hang (a lying array length once made gguf's reader loop far past the end of the file)."""
    from rankscope.adapters.resize import resize

    with tempfile.TemporaryDirectory(prefix="rankscope-fuzz-") as tmp:
        path = Path(tmp) / "adapter.gguf"
        path.write_bytes(case["bytes"])
        if outcome(lambda: rankscope.analyze(path, progress=False)) == "ok" and case["resize"]:
            outcome(lambda: resize(path, Path(tmp) / "out", rank=2))


def test_fixtures_are_untouched_and_the_unmutated_copies_load():
    """The property's baseline: every fixture loads as it is (so a failure above is the mutation's doing)."""
    for name in ("peft-gpt2-conv1d", "peft-roberta-series", "mlx-gemma-series", "diffusers-legacy-sd15",
                 "diffusers-peft-metadata-sd15", "peft-bloom-enable-lora", "lora-diffusion-cloneofsimo-sd15", "lora-vit-sam"):
        with fixture_copy(name) as root:
            assert analyze(root) == "ok"
            assert all(official_accepts(p) and rankscope_accepts(p) for p in root.rglob("*.safetensors"))
    assert not [p for p in REAL.rglob("*") if p.name.endswith(".fuzz-new")]
