"""Issue #22: every input the readers meet ends as a result or as one ``Error:`` line (a RankscopeError naming
what was found and what was expected), never a traceback, a hang or a signal. One regression test (or a few)
per class of input users hit: numbers beyond float range, bad trace records and torn run files, odd tensors,
a file that changes while it is read, and rank_pattern / alpha_pattern keys that are slow to match.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import REPO, assert_one_error_line, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import rankscope
from rankscope.errors import RankscopeError
from rankscope.io.trace import module_text, record_text

A_NAME, B_NAME = "base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
BIG_INT = "1" + "0" * 400  # Python parses it; float() of it overflows
FLOAT_1E400 = "1e400"  # json gives inf
LONG_INT = "7" * 5000  # beyond Python's integer string-conversion limit (ValueError)
BEYOND = [BIG_INT, FLOAT_1E400, LONG_INT]


def pair(r: int = 4, n_in: int = 6, n_out: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(r, n_in)).astype(np.float32), rng.normal(size=(n_out, r)).astype(np.float32)


def write_adapter(folder: Path, config: dict | str | None = CONFIG, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        A, B = pair()
        tensors = {A_NAME: A, B_NAME: B}
    save_file(tensors, folder / "adapter_model.safetensors")
    if config is not None:
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def with_raw(document: dict, raw: str) -> str:
    """The document as JSON with the string "@RAW@" replaced by ``raw`` (a number literal json.dumps cannot write)."""
    return json.dumps(document).replace('"@RAW@"', raw)


def error_of(call) -> str:
    with pytest.raises(RankscopeError) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- 1. JSON numbers beyond float range


def test_the_one_json_number_reader():
    from rankscope.io.validate import describe, is_int, is_number, loads

    for literal in BEYOND:
        assert loads(literal) == math.inf and loads("-" + literal) == -math.inf
        assert not is_number(loads(literal)) and not is_int(loads(literal))
        assert "beyond float range" in describe(loads(literal))
    largest = str(int(np.finfo(np.float64).max))  # 309 digits, still a float
    assert loads(largest) == int(largest) and is_number(loads(largest))
    assert loads("[12, -3, 0.5]") == [12, -3, 0.5]


@pytest.mark.parametrize("literal", BEYOND, ids=["10**400", "1e400", "5000-digits"])
@pytest.mark.parametrize("field,template", [
    ("lora_alpha", '{"peft_type": "LORA", "r": 4, "lora_alpha": @}'),
    ('alpha_pattern["q"]', '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"q": @}}'),
    ("r", '{"peft_type": "LORA", "r": @, "lora_alpha": 8}'),
    ('rank_pattern["q"]', '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q": @}}'),
])
def test_config_numbers_beyond_float_range_name_the_field(tmp_path, field, template, literal):
    folder = write_adapter(tmp_path / "a", template.replace("@", literal))
    message = error_of(lambda: rankscope.analyze(folder, progress=False))
    assert f"field {field!r} is a number beyond float range" in message and "adapter_config.json" in message


@pytest.mark.parametrize("literal", BEYOND, ids=["10**400", "1e400", "5000-digits"])
def test_trainer_state_global_step_beyond_float_range(tmp_path, literal):
    for step in (10, 20):
        folder = write_adapter(tmp_path / "run" / f"checkpoint-{step}")
        (folder / "trainer_state.json").write_text(f'{{"global_step": {literal if step == 20 else step}}}')
    message = error_of(lambda: rankscope.analyze(tmp_path / "run", progress=False))
    assert "checkpoint-20/trainer_state.json: field 'global_step' is a number beyond float range" in message


def test_a_config_number_beyond_float_range_through_the_cli(tmp_path):
    folder = write_adapter(tmp_path / "a", '{"peft_type": "LORA", "r": 4, "lora_alpha": ' + LONG_INT + "}")
    assert_one_error_line(run_cli("analyze", folder), "field 'lora_alpha' is a number beyond float range")


@pytest.fixture(scope="module")
def analysis_text(tmp_path_factory) -> str:
    from rankscope.io.documents import to_json

    folder = write_adapter(tmp_path_factory.mktemp("doc") / "a")
    return to_json(rankscope.analyze(folder, progress=False))


@pytest.mark.parametrize("literal", BEYOND, ids=["10**400", "1e400", "5000-digits"])
@pytest.mark.parametrize("where,field", [
    (lambda m, s: s.__setitem__("step", "@RAW@"), "snapshots[0].step"),
    (lambda m, s: m["importance"].__setitem__(0, "@RAW@"), "snapshots[0].modules[0].importance[0]"),
    (lambda m, s: m["energy_rank"].__setitem__("0.95", "@RAW@"), "snapshots[0].modules[0].energy_rank.0.95"),
    (lambda m, s: m.__setitem__("top10_share", "@RAW@"), "snapshots[0].modules[0].top10_share"),
])
def test_analysis_json_numbers_beyond_float_range(tmp_path, analysis_text, where, field, literal):
    from rankscope.io.documents import load_document

    document = json.loads(analysis_text)
    where(document["snapshots"][0]["modules"][0], document["snapshots"][0])
    path = tmp_path / "analysis.json"
    path.write_text(with_raw(document, literal))
    message = error_of(lambda: load_document(path))
    assert f"field {field!r} is a number beyond float range" in message


@pytest.mark.parametrize("literal", BEYOND, ids=["10**400", "1e400", "5000-digits"])
@pytest.mark.parametrize("field", ["baseline", "points[0].value"])
def test_sweep_json_numbers_beyond_float_range(tmp_path, field, literal):
    from rankscope.io.documents import read_sweep

    point = {"order": "least", "fraction": 0.1, "value": "@RAW@" if field != "baseline" else 0.8}
    sweep = {"schema": "rankscope/sweep-v1", "metric": "accuracy", "baseline": "@RAW@" if field == "baseline" else 0.9,
             "points": [point]}
    path = tmp_path / "sweep.json"
    path.write_text(with_raw(sweep, literal))
    assert f"field {field!r} is a number beyond float range" in error_of(lambda: read_sweep(path))


# ----------------------------------------------------------------------------- 2. traces and torn run files


def trace_module(raw: tuple[str, str] | None = None, **fields) -> str:
    meta = {"name": "base_model.model.l.0.q", "rank": 2, "scale": 2.0, "shape": [5, 6], "layer_type": "linear",
            "dtype": "F32", **{k: v for k, v in fields.items() if k not in ("importance", "spectrum")}}
    arrays = {"importance": fields.get("importance", [1.0, 0.5]), "spectrum": fields.get("spectrum", [1.0, 0.25])}
    text = module_text(meta, arrays)
    return text.replace(*raw) if raw else text


def write_trace(folder: Path, records: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "rank_trace.jsonl").write_text("".join(record + "\n" for record in records))
    return folder


GOOD_RECORD = record_text(10, [trace_module()], time=1.0)


@pytest.mark.parametrize("record,expected", [
    (record_text(20, [trace_module(rank=0, importance=[], spectrum=[])], time=2.0),
     "field 'modules[0].rank' is the number 0, expected a positive integer"),
    (record_text(20, [trace_module(raw=("[5, 6]", "[1e400, 16]"))], time=2.0),
     "field 'modules[0].shape[0]' is a number beyond float range"),
    (record_text(20, [trace_module(raw=('"rank": 2', '"rank": 1e400'))], time=2.0),
     "field 'modules[0].rank' is a number beyond float range"),
    (record_text(20, [trace_module(raw=('"rank": 2', '"rank": 4.7'))], time=2.0),
     "field 'modules[0].rank' is the number 4.7, expected a positive integer"),
    (record_text(20, [trace_module(raw=("[5, 6]", "[5, 0]"))], time=2.0),
     "field 'modules[0].shape[1]' is the number 0, expected a positive integer"),
    (record_text(20, [trace_module(importance=[1.0, 0.5, 0.25])], time=2.0),
     "field 'modules[0].importance' is a list of 3, expected one value per rank (2)"),
    (record_text(-20, [trace_module()], time=2.0), "field 'step' is the number -20, expected a non-negative integer"),
    (record_text(20, [trace_module()], time=2.0).replace('"step": 20', '"step": ' + LONG_INT),
     "field 'step' is a number beyond float range"),
], ids=["rank-0", "shape-1e400", "rank-1e400", "rank-4.7", "shape-0", "importance-length", "negative-step",
        "step-5000-digits"])
@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
def test_bad_trace_records_are_refused_where_they_are_read(tmp_path, record, expected, last_only):
    folder = write_trace(tmp_path / "run", [GOOD_RECORD, record])
    message = error_of(lambda: rankscope.analyze(folder, progress=False, last_only=last_only))
    assert "rank_trace.jsonl" in message and expected in message, message


def test_negative_trace_steps_are_refused_by_analyze_compare_and_recommend_alike(tmp_path):
    folder = write_trace(tmp_path / "run", [GOOD_RECORD, record_text(-5, [trace_module()], time=1.0)])
    expected = "field 'step' is the number -5, expected a non-negative integer"
    assert expected in error_of(lambda: rankscope.analyze(folder, progress=False))
    assert_one_error_line(run_cli("recommend", folder), "rank_trace.jsonl line 2: " + expected)
    good = write_trace(tmp_path / "good", [GOOD_RECORD])  # compare reads only the last record: the same refusal
    assert_one_error_line(run_cli("compare", folder, good), "rank_trace.jsonl (its last complete record): " + expected)


def test_a_torn_last_line_of_events_is_skipped_with_a_note_like_the_traces(tmp_path):
    root = tmp_path / "run"
    for step in (10, 20):
        write_adapter(root / f"checkpoint-{step}", tensors=dict(zip((A_NAME, B_NAME), pair(seed=step))))
    event = {"step": 10, "module": "l.0.q", "pruned": [1], "p": 0.9}
    (root / "events.jsonl").write_bytes(json.dumps(event).encode() + b'\n{"step": 20, "modu')
    series, notes = rankscope.load(root), []
    assert series.events(notes) == [event]
    assert len(notes) == 1 and "events.jsonl: line 2, the last, is not a complete event" in notes[0]
    assert series.notes == notes
    assert rankscope.analyze(root, progress=False)["events"] == [event]
    # Damage anywhere else (or a last line that is whole, with its newline) is still an error naming the line.
    (root / "events.jsonl").write_bytes(b'{"step": 10}\n{"step": 20, "modu\n{"step": 30}')
    assert "events.jsonl line 2 is not valid JSON" in error_of(lambda: rankscope.load(root).events())


# ----------------------------------------------------------------------------- 3. tensors of the wrong kind


def _quantized(tensor):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantised tensors: they still come in old files
        return torch.quantize_per_tensor(tensor, 0.1, 0, torch.qint8)


def _pickles():
    import torch

    a, b = torch.randn(4, 6), torch.randn(5, 4)
    both = lambda f: {A_NAME: f(a), B_NAME: f(b)}  # noqa: E731
    return {
        "float8": (both(lambda t: t.to(torch.float8_e4m3fn)), "has dtype F8_E4M3"),
        "qint8": (both(lambda t: _quantized(t)), "has dtype quantized qint8"),
        "sparse": (both(lambda t: t.to_sparse()), "has dtype sparse_coo F32"),
        "meta": (both(lambda t: t.to("meta")), "has dtype meta F32 (no data)"),
        "int32": (both(lambda t: (t * 10).to(torch.int32)), "has dtype I32"),
        "bool": (both(lambda t: t > 0), "has dtype BOOL"),
        "complex": (both(lambda t: t.to(torch.complex64)), "has dtype C64"),
    }


@pytest.mark.parametrize("kind", ["float8", "qint8", "sparse", "meta", "int32", "bool", "complex"])
def test_pickled_factors_that_are_not_dense_floats_are_refused_by_name(tmp_path, kind):
    import torch

    state, expected = _pickles()[kind]
    folder = tmp_path / kind
    folder.mkdir()
    torch.save(state, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    message = error_of(lambda: rankscope.analyze(folder, progress=False))
    assert f"tensor {A_NAME!r} {expected}, expected a dense floating tensor (F16, BF16, F32 or F64)" in message
    assert "module 'base_model.model.l.0.q'" in message and "adapter_model.bin" in message


def test_a_pickle_with_integer_keys_is_refused_by_analyze_and_resize(tmp_path):
    import torch

    folder = tmp_path / "intkeys"
    folder.mkdir()
    torch.save({0: torch.randn(4, 6), 1: torch.randn(5, 4)}, folder / "adapter_model.bin")
    expected = "holds a dict with the key 0 (int): expected tensor names (strings) as keys"
    assert expected in error_of(lambda: rankscope.analyze(folder, progress=False))
    from rankscope.adapters.resize import resize

    assert expected in error_of(lambda: resize(folder, tmp_path / "out", energy=0.9))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.int64])
def test_safetensors_factors_of_integer_or_bool_dtype_are_refused(tmp_path, dtype):
    A, B = pair()
    folder = write_adapter(tmp_path / "a", tensors={A_NAME: (A * 10).astype(dtype), B_NAME: (B * 10).astype(dtype)})
    stored = {np.int32: "I32", np.uint8: "U8", np.bool_: "BOOL", np.int64: "I64"}[dtype]
    message = error_of(lambda: rankscope.analyze(folder, progress=False))
    assert f"has dtype {stored}, expected a dense floating tensor" in message


def test_safetensors_factors_in_fp8_are_refused_at_load_not_analysed(tmp_path):
    header = {A_NAME: {"dtype": "F8_E4M3", "shape": [4, 6], "data_offsets": [0, 24]},
              B_NAME: {"dtype": "F8_E4M3", "shape": [5, 4], "data_offsets": [24, 44]}}
    text = json.dumps(header).encode()
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(44))
    assert "has dtype F8_E4M3, expected a dense floating tensor" in error_of(lambda: rankscope.load(folder))


@pytest.mark.parametrize("a_shape,b_shape,expected", [
    ((8, 0), (5, 8), "A [8, 0] and B [5, 8] (in_features 0)"),
    ((8, 6), (0, 8), "A [8, 6] and B [0, 8] (out_features 0)"),
])
def test_zero_size_factors_are_refused_as_empty_not_reported_as_unlearned(tmp_path, a_shape, b_shape, expected):
    folder = write_adapter(tmp_path / "a", tensors={A_NAME: np.zeros(a_shape, np.float32),
                                                    B_NAME: np.ones(b_shape, np.float32)})
    message = error_of(lambda: rankscope.analyze(folder, progress=False))
    assert "has rank 8 but an empty factor" in message and expected in message


# ----------------------------------------------------------------------------- 4. a file that changes while it is read

TRUNCATE_WHILE_READING = """
import os, sys
import numpy as np
from safetensors.numpy import save_file
import rankscope
from rankscope.errors import RankscopeError
from rankscope.maths.analysis import analyze_checkpoint
folder = sys.argv[1]
rng = np.random.default_rng(0)
tensors = {}
for i in range(8):  # 8 modules of 2 x 256 KiB: the last ones lie far past the truncation
    tensors[f"base_model.model.l.{i}.q.lora_A.weight"] = rng.normal(size=(64, 1024)).astype(np.float32)
    tensors[f"base_model.model.l.{i}.q.lora_B.weight"] = rng.normal(size=(1024, 64)).astype(np.float32)
path = os.path.join(folder, "adapter_model.safetensors")
save_file(tensors, path)
checkpoint = rankscope.load(folder)  # opened: the tensors are read when each module is analysed
os.truncate(path, 1 << 20)  # what `truncate -s` does to a file another process is reading
try:
    analyze_checkpoint(checkpoint, spectrum=False)
except RankscopeError as e:
    print("Error:", e)
"""


def test_a_file_truncated_while_it_is_read_is_one_error_not_sigbus(tmp_path):
    """In a child process: were the file memory-mapped, touching its pages past the new end would kill it (SIGBUS)."""
    result = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_READING, str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), "RANKSCOPE_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr)  # -7 would be SIGBUS
    assert result.stdout.startswith("Error: ") and len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert "adapter_model.safetensors changed while it was read (its size went from" in result.stdout
    assert "to 1048576 bytes" in result.stdout


def test_a_file_rewritten_in_place_while_it_is_read_is_one_error(tmp_path):
    from rankscope.io.tensors import SafetensorsFile

    A, B = pair()
    path = write_adapter(tmp_path / "a", tensors={A_NAME: A, B_NAME: B}) / "adapter_model.safetensors"
    tensors = SafetensorsFile(path)
    np.testing.assert_array_equal(tensors[A_NAME], A)  # read exactly, before anything changes
    stat = path.stat()
    with open(path, "r+b") as f:  # same size, new bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    message = error_of(lambda: tensors[B_NAME])
    assert "changed while it was read (it was rewritten" in message and B_NAME in message
    message = error_of(lambda: tensors.raw(A_NAME))  # resize copies tensors byte for byte through raw()
    assert "changed while it was read" in message


def test_tensors_read_one_at_a_time_are_copies_exactly_as_stored(tmp_path):
    """What replaced the memory map: every dtype reads back exactly, and arrays survive the file being closed."""
    from rankscope.io.tensors import SafetensorsFile

    rng = np.random.default_rng(1)
    arrays = {"f16": rng.normal(size=(3, 5)).astype(np.float16), "f64": rng.normal(size=(7,)),
              "u64": rng.integers(0, 2**60, size=(2, 2)).astype(np.uint64), "b": rng.normal(size=(4,)) > 0,
              "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, tmp_path / "x.safetensors")
    tensors = SafetensorsFile(tmp_path / "x.safetensors")
    read = {name: tensors[name] for name in arrays}
    raw = tensors.raw("f64")
    tensors.close()
    for name, array in arrays.items():
        np.testing.assert_array_equal(read[name], array)
        assert read[name].dtype == array.dtype and read[name].flags.writeable  # a copy, not a read-only map
    assert bytes(raw) == arrays["f64"].tobytes()
    assert "was closed" in error_of(lambda: tensors["f16"])


# ----------------------------------------------------------------------------- 5. slow and catastrophic patterns

AAA = "a" * 34 + "X0"


def pattern_adapter(folder: Path, names: list[str], config: dict) -> Path:
    tensors = {}
    for i, name in enumerate(names):
        A, B = pair(seed=i)
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = A, B
    return write_adapter(folder, {**CONFIG, **config}, tensors)


def test_a_nested_quantifier_key_on_a_long_name_no_longer_hangs(tmp_path):
    folder = pattern_adapter(tmp_path / "a", [AAA, "model.layers.0.q_proj"], {"rank_pattern": {"(a+)+$": 2},
                                                                               "alpha_pattern": {"(a+)+$": 2}})
    started = time.perf_counter()
    scales = {m.name.rsplit(".", 1)[-1]: m.scale for m in rankscope.load(folder).modules}
    assert time.perf_counter() - started < 5
    assert scales == {AAA: 8 / 4, "q_proj": 8 / 4}  # "(a+)+$" matches neither name: lora_alpha / r for both


def test_a_key_that_backtracks_without_end_is_refused_by_name(tmp_path):
    folder = pattern_adapter(tmp_path / "a", [AAA], {"rank_pattern": {"q_proj": 2, "(a|aa)+$": 2}})
    started = time.perf_counter()
    message = error_of(lambda: rankscope.load(folder))
    assert time.perf_counter() - started < 5
    assert "adapter_config.json: rank_pattern key '(a|aa)+$' takes more than" in message and AAA in message
    line = assert_one_error_line(run_cli("suggest", folder), "rank_pattern key '(a|aa)+$'")
    assert "bounded time" in line


@pytest.mark.parametrize("key,expected", [
    ("(a{1000}){1000}", "repeat counts multiply to at most"),
    ("[[:alpha:]]", "a regular expression with one meaning (Possible nested set"),
    ("q(", "a valid regular expression (missing ), unterminated subpattern"),
])
def test_keys_that_cannot_be_matched_safely_are_refused_when_the_config_is_read(tmp_path, key, expected):
    folder = pattern_adapter(tmp_path / "a", ["model.layers.0.q_proj"], {"alpha_pattern": {key: 4}})
    message = error_of(lambda: rankscope.load(folder))
    assert f"field {'alpha_pattern[' + json.dumps(key) + ']'!r}" in message and expected in message


def test_a_rank_pattern_of_100000_keys_is_indexed_once(tmp_path):
    names = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 7, 99, 1000, 5000, 77777, 99998, 99999)]
    rank_pattern = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(100_000)}
    alpha_pattern = {rf"model\.layers\.{i}\.self_attn\.q_proj": 8 * (i % 3 + 1) for i in range(100_000)}
    rank_pattern["q_proj"] = 2  # comes last: never picked, every name matches an earlier key
    folder = pattern_adapter(tmp_path / "a", names, {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    started = time.perf_counter()
    checkpoint = rankscope.load(folder)
    assert time.perf_counter() - started < 5  # 95 s before (a regex compiled per module and key)
    for module in checkpoint.modules:
        i = int(module.name.split(".")[4])
        assert module.scale == 8 * (i % 3 + 1) / 4, module.name
    assert not any("gives rank" in note for note in checkpoint.notes)  # rank_pattern's 4 agrees with the tensors


KEY_PARTS = ["a", "b", ".", r"\.", "_", "0", "\n", "[ab]", "a*", "(a|b)", "b?", r"\d", "$", "^", ".*"]
NAME_CHARS = "ab._0\nX"


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(keys=st.lists(st.lists(st.sampled_from(KEY_PARTS), max_size=5).map("".join), min_size=1, max_size=5),
       names=st.lists(st.text(NAME_CHARS, max_size=8), min_size=1, max_size=5))
def test_pattern_matching_follows_peft_get_pattern_key(keys, names):
    """Differential: the index and the bounded engine pick the key PEFT's own loop picks, for every name."""
    from rankscope.io.patterns import PatternError, PatternMap

    keys = list(dict.fromkeys(keys))
    try:
        index = PatternMap(keys)
    except PatternError:
        return  # a key re refuses: refused by the config check (PEFT would fail on it too)
    for name in names:
        peft = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)  # peft.utils.other.get_pattern_key
        found = index.lookup(name)
        assert (keys[found] if found is not None else None) == peft, (keys, name)
