"""Every reader validates what it reads: each class of bad input is one RankscopeError line that names
the file, the field and what was expected (exit 2 from the CLI, no traceback, nothing written).

Safetensors headers are also checked against the official reader (``safetensors.safe_open``): what
rankscope refuses, it refuses too (rankscope follows its rules, and refuses duplicated names besides).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from helpers.cli import REPO, run_cli
from safetensors.numpy import save_file

import rankscope
from rankscope.errors import RankscopeError
from rankscope.maths.analysis import analyze_module

REAL = REPO.parent / "shared" / "fixtures" / "real"
A_NAME, B_NAME = "base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"



def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def pair(r: int = 4, n_in: int = 6, n_out: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(r, n_in)).astype(np.float32), rng.normal(size=(n_out, r)).astype(np.float32)


def write_adapter(folder: Path, config: dict | str | None = None, tensors: dict | None = None, r: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        A, B = pair(r)
        tensors = {A_NAME: A, B_NAME: B}
    save_file(tensors, folder / "adapter_model.safetensors")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "adapter_config.json").write_text(text)
    return folder


# ----------------------------------------------------------------------------- safetensors headers


def safetensors_bytes(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(text).to_bytes(8, "little") + text + data


def base_header() -> tuple[dict, bytes]:
    A, B = pair()
    header = {A_NAME: {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]},
              B_NAME: {"dtype": "F32", "shape": [5, 4], "data_offsets": [96, 176]}}
    return header, A.tobytes() + B.tobytes()


def edited(edit) -> bytes:
    header, data = base_header()
    out = edit(header)  # edits change the header in place, or return the whole file's bytes
    return out if isinstance(out, bytes) else safetensors_bytes(header, data)


def _set(name: str, field: str, value):
    def edit(header):
        header[name][field] = value
    return edit


def _raw_header(text: str, data_len: int = 176) -> Callable:
    return lambda header: safetensors_bytes(text, bytes(data_len))


DUPLICATED_KEY = ('{"%s": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]}, '
                  '"%s": {"dtype": "F32", "shape": [5, 4], "data_offsets": [96, 176]}, '
                  '"%s": {"dtype": "F32", "shape": [5, 4], "data_offsets": [96, 176]}}') % (A_NAME, B_NAME, B_NAME)


@pytest.mark.parametrize("edit,expected", [
    (_set(A_NAME, "data_offsets", ["0", "96"]), ['data_offsets is ["0", "96"]', "two non-negative 64-bit integers"]),
    (_set(A_NAME, "data_offsets", [0.0, 96.0]), ["data_offsets is [0.0, 96.0]", "integers"]),
    (_set(A_NAME, "data_offsets", [-96, 0]), ["data_offsets is [-96, 0]", "non-negative"]),
    (_set(A_NAME, "data_offsets", [0, 96, 192]), ["data_offsets is [0, 96, 192]", "[begin, end]"]),
    (_set(A_NAME, "data_offsets", [96, 0]), ["data_offsets [96, 0] end before they begin"]),
    (_set(A_NAME, "data_offsets", [0, 80]), ["takes 96 bytes, but its data_offsets [0, 80] span 80"]),
    (_set(B_NAME, "data_offsets", [0, 80]), ["overlaps tensor", "begin where the previous one's end"]),
    (lambda h: h[B_NAME].update(shape=[4, 6], data_offsets=[0, 96]), ["overlaps tensor"]),  # duplicated offsets
    (lambda h: h.pop(A_NAME), ["96 bytes between the start of the data and tensor"]),  # a gap
    (lambda h: safetensors_bytes(h, base_header()[1] + b"\0" * 8), ["8 bytes after the last tensor's data"]),
    (_raw_header(DUPLICATED_KEY), ["appears twice in its header"]),
    (_set(A_NAME, "shape", [-4, -6]), ["shape is [-4, -6]", "non-negative"]),
    (_set(A_NAME, "shape", [4.0, 6]), ["shape is [4.0, 6]"]),
    (_set(A_NAME, "shape", ["4", 6]), ['shape is ["4", 6]']),
    (_set(A_NAME, "shape", [2**40, 2**40, 2**10]), ["overflows a 64-bit integer"]),
    (_set(A_NAME, "shape", [2**70, 0]), ["non-negative 64-bit integers"]),
    (_set(A_NAME, "dtype", "Q7"), ["dtype is the string 'Q7'", "one of the safetensors dtypes"]),
    (_set(A_NAME, "dtype", 32), ["dtype is the number 32"]),
    (_set(A_NAME, "dtype", "F4"), ["F4", "takes 12 bytes"]),
    (lambda h: h.__setitem__("__metadata__", {"format": 1}), ["__metadata__['format'] is the number 1", "a string"]),
    (lambda h: h.__setitem__("__metadata__", ["pt"]), ["__metadata__ is a list of 1", "strings to strings"]),
    (lambda h: h.__setitem__(A_NAME, [1, 2]), ["is a list of 2 without all of its fields"]),
    (lambda h: h[A_NAME].pop("dtype"), ["without all of its fields"]),
    (_raw_header("[" * 100_000 + "]" * 100_000), ["nests JSON too deeply"]),
    (_raw_header('{"a": ' * 100_000 + "1" + "}" * 100_000), ["nests JSON too deeply"]),
    (_raw_header('{"x": NaN}'), ["header is not JSON (NaN is not a JSON number)"]),
    (_raw_header("[1, 2]"), ["its header is a list of 2, expected a JSON object"]),
    (lambda h: (2**40).to_bytes(8, "little") + json.dumps(h).encode() + base_header()[1], ["more than the format's limit"]),
    (lambda h: safetensors_bytes(h, base_header()[1][:-20]), ["is truncated: its tensors need 176 bytes", "holds only 156"]),
])
def test_bad_safetensors_headers_are_refused_like_the_official_reader(tmp_path, edit, expected):
    from safetensors import safe_open

    from rankscope.io.tensors import SafetensorsFile

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(edited(edit))
    with pytest.raises(RankscopeError) as caught:
        SafetensorsFile(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for text in expected:
        assert text in message, (text, message)
    assert "should take" not in message  # the old message gave "should take 96 bytes, its offsets give 96"
    if "appears twice" not in message:  # the official reader keeps the last of two equal names; we refuse
        with pytest.raises(Exception):
            with safe_open(str(path), framework="numpy") as f:
                f.keys()


def test_a_header_in_any_key_order_with_every_readable_dtype_reads_back_exactly(tmp_path):
    """The rules refuse nothing valid: tensors listed out of offset order, zero-size and unsigned ones."""
    from safetensors import safe_open

    from rankscope.io.tensors import SafetensorsFile

    rng = np.random.default_rng(3)
    arrays = {"z": rng.normal(size=(3, 2)).astype(np.float16), "a": rng.integers(0, 60000, size=5).astype(np.uint16),
              "m": np.zeros((0, 4), np.float32), "u": rng.integers(0, 2**40, size=(2, 2)).astype(np.uint64),
              "b": rng.normal(size=(2,)).astype(np.float64)}
    data, offsets, position = b"", {}, 0
    for name in ("a", "u", "b", "z", "m"):  # data order differs from the header's key order below
        raw = arrays[name].tobytes()
        offsets[name] = [position, position + len(raw)]
        data, position = data + raw, position + len(raw)
    dtypes = {np.float16: "F16", np.uint16: "U16", np.float32: "F32", np.uint64: "U64", np.float64: "F64"}
    header = {name: {"dtype": dtypes[arrays[name].dtype.type], "shape": list(arrays[name].shape),
                     "data_offsets": offsets[name]} for name in ("z", "m", "b", "u", "a")}
    header["__metadata__"] = {"format": "np"}
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    ours = SafetensorsFile(path)
    with safe_open(str(path), framework="numpy") as theirs:
        for name, array in arrays.items():
            np.testing.assert_array_equal(ours[name], array)
            np.testing.assert_array_equal(theirs.get_tensor(name), array)
    assert list(ours) == ["z", "m", "b", "u", "a"] and ours.metadata == {"format": "np"}


def test_known_but_unreadable_dtypes_are_listed_and_refused_only_when_read(tmp_path):
    from rankscope.io.tensors import SafetensorsFile

    header = {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(4)))
    tensors = SafetensorsFile(path)
    assert tensors.dtype("w") == "F8_E4M3" and tensors.shape("w") == (4,)
    with pytest.raises(RankscopeError, match="has dtype F8_E4M3, which rankscope cannot read"):
        tensors["w"]


@pytest.mark.parametrize("edit,expected", [
    (_set(A_NAME, "data_offsets", [-96, 0]), "data_offsets is [-96, 0]"),
    (_set(B_NAME, "data_offsets", [0, 80]), "overlaps tensor"),
    (_raw_header(DUPLICATED_KEY), "appears twice"),
    (_raw_header("[" * 100_000 + "]" * 100_000), "nests JSON too deeply"),
])
def test_bad_headers_through_the_cli(tmp_path, edit, expected):
    folder = write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    (folder / "adapter_model.safetensors").write_bytes(edited(edit))
    assert_one_error_line(run_cli("analyze", folder, "--out", tmp_path / "never"), expected, "adapter_model.safetensors")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- configs

GOOD_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}


@pytest.mark.parametrize("field,value,expected", [
    ("lora_alpha", "8", "field 'lora_alpha' is the string '8', expected a number"),
    ("lora_alpha", None, "field 'lora_alpha' is null, expected a number"),
    ("lora_alpha", [8], "field 'lora_alpha' is a list of 1, expected a number"),
    ("lora_alpha", True, "field 'lora_alpha' is true, expected a number"),
    ("r", "4", "field 'r' is the string '4', expected a positive integer"),
    ("r", None, "field 'r' is null, expected a positive integer"),
    ("r", 4.5, "field 'r' is the number 4.5, expected a positive integer"),
    ("r", 0, "field 'r' is the number 0, expected a positive integer"),
    ("r", False, "field 'r' is false"),
    ("rank_pattern", ["q"], "field 'rank_pattern' is a list of 1, expected an object"),
    ("rank_pattern", "q", "field 'rank_pattern' is the string 'q', expected an object"),
    ("rank_pattern", {"q": "8"}, "field 'rank_pattern[\"q\"]' is the string '8', expected a positive integer"),
    ("rank_pattern", {"q(": 8}, "field 'rank_pattern[\"q(\"]' is the string 'q(', expected a valid regular expression"),
    ("alpha_pattern", {"q": None}, "field 'alpha_pattern[\"q\"]' is null, expected a number"),
    ("alpha_pattern", [], "field 'alpha_pattern' is a list of 0, expected an object"),
    ("use_rslora", "yes", "field 'use_rslora' is the string 'yes', expected true or false"),
    ("use_rslora", 1, "field 'use_rslora' is the number 1, expected true or false"),
])
def test_config_fields_of_the_wrong_type(tmp_path, field, value, expected):
    folder = write_adapter(tmp_path / "a", {**GOOD_CONFIG, field: value})
    with pytest.raises(RankscopeError) as caught:
        rankscope.load(folder)
    message = str(caught.value)
    assert message.startswith(str(folder / "adapter_config.json")) and expected in message, message
    assert "the adapter's configuration" in message


def test_config_errors_through_the_cli(tmp_path):
    folder = write_adapter(tmp_path / "a", {**GOOD_CONFIG, "lora_alpha": "16"})
    assert_one_error_line(run_cli("analyze", folder, "--out", tmp_path / "never"), "adapter_config.json",
                          "'lora_alpha'", "expected a number")
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": NaN}')
    assert_one_error_line(run_cli("analyze", folder), "NaN is not a JSON number")
    assert not (tmp_path / "never").exists()


def test_null_patterns_mean_none_as_in_peft(tmp_path):
    folder = write_adapter(tmp_path / "a", {**GOOD_CONFIG, "rank_pattern": None, "alpha_pattern": None})
    assert [m.scale for m in rankscope.load(folder).modules] == [2.0]


def test_missing_r_uses_the_tensors_rank_and_says_so(tmp_path):
    folder = write_adapter(tmp_path / "a", {"peft_type": "LORA", "lora_alpha": 12}, r=4)
    checkpoint = rankscope.load(folder)
    assert [m.scale for m in checkpoint.modules] == [12 / 4]
    assert any('has no "r"' in note for note in checkpoint.notes)
    assert not any("no adapter_config.json" in note for note in checkpoint.notes)  # the old, false note

    folder = write_adapter(tmp_path / "b", {"peft_type": "LORA"}, r=4)  # neither: PEFT's defaults
    checkpoint = rankscope.load(folder)
    assert [m.scale for m in checkpoint.modules] == [8 / 4]
    assert any("PEFT's default 8" in note for note in checkpoint.notes)
    result = run_cli("analyze", folder)
    assert result.returncode == 0 and 'has no "r"' in result.stdout and "PEFT's default 8" in result.stdout


def test_no_config_at_all_keeps_scale_one_and_its_note(tmp_path):
    checkpoint = rankscope.load(write_adapter(tmp_path / "a", None))
    assert [m.scale for m in checkpoint.modules] == [1.0]
    assert "no adapter_config.json beside the weights: scale taken as 1" in checkpoint.notes


def test_kohya_alpha_tensor_must_be_one_number_and_metadata_alpha_a_number(tmp_path):
    A, B = pair()
    name = "lora_unet_down_blocks_0_attn1_to_q"
    parts = {f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B}
    save_file({**parts, f"{name}.alpha": np.zeros((0,), np.float32)}, tmp_path / "empty_alpha.safetensors")
    with pytest.raises(RankscopeError, match=rf"tensor '{name}.alpha' has shape \[0\], expected a single number"):
        rankscope.load(tmp_path / "empty_alpha.safetensors")
    save_file(parts, tmp_path / "text_alpha.safetensors", metadata={"ss_network_alpha": "abc"})
    with pytest.raises(RankscopeError, match="metadata ss_network_alpha is the string 'abc', expected a finite number"):
        rankscope.load(tmp_path / "text_alpha.safetensors")
    save_file(parts, tmp_path / "good_alpha.safetensors", metadata={"ss_network_alpha": "2"})
    assert [m.scale for m in rankscope.load(tmp_path / "good_alpha.safetensors").modules] == [2 / 4]


def test_mlx_scale_must_be_a_number(tmp_path):
    A, B = pair(8, 30, 20)
    save_file({"model.layers.3.self_attn.q_proj.lora_a": np.ascontiguousarray(A.T),
               "model.layers.3.self_attn.q_proj.lora_b": np.ascontiguousarray(B.T)}, tmp_path / "adapters.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": "20"}}))
    with pytest.raises(RankscopeError, match=r"field 'lora_parameters.scale' is the string '20', expected a number"):
        rankscope.load(tmp_path)


def test_beamlora_gate_temperature_must_be_positive(tmp_path):
    A, B = pair()
    tensors = {A_NAME: A, B_NAME: B, "base_model.model.l.0.q.lora_gate": np.zeros(4, np.float32)}
    folder = write_adapter(tmp_path / "a", {**GOOD_CONFIG, "beamlora_temperature": "0.05"}, tensors=tensors)
    with pytest.raises(RankscopeError, match="field 'beamlora_temperature' is the string '0.05', expected a positive number"):
        rankscope.load(folder)


# ----------------------------------------------------------------------------- ranks and per-rank vectors


def test_rank_zero_modules_are_skipped_at_load_time_with_a_note(tmp_path):
    A, B = pair()
    tensors = {A_NAME: A, B_NAME: B, "base_model.model.l.1.q.lora_A.weight": np.zeros((0, 6), np.float32),
               "base_model.model.l.1.q.lora_B.weight": np.zeros((5, 0), np.float32)}
    folder = write_adapter(tmp_path / "mixed", GOOD_CONFIG, tensors=tensors)
    checkpoint = rankscope.load(folder)
    assert [m.name for m in checkpoint.modules] == ["base_model.model.l.0.q"]
    assert sorted(checkpoint.skipped) == ["base_model.model.l.1.q.lora_A.weight", "base_model.model.l.1.q.lora_B.weight"]
    assert any("rank 0" in note and "base_model.model.l.1.q" in note for note in checkpoint.notes)
    expected = 2.0 * np.linalg.norm(B.astype(np.float64), axis=0) * np.linalg.norm(A.astype(np.float64), axis=1)
    np.testing.assert_allclose(analyze_module(checkpoint.modules[0])["importance"], expected, rtol=1e-12)
    # compare divided by the rank (ZeroDivisionError before): now it never sees a rank-0 module.
    other = write_adapter(tmp_path / "other", GOOD_CONFIG)
    result = run_cli("compare", folder, other)
    assert result.returncode == 0, result.stderr

    empty = write_adapter(tmp_path / "empty", GOOD_CONFIG, tensors={k: v for k, v in tensors.items() if ".l.1." in k})
    assert_one_error_line(run_cli("analyze", empty), "every LoRA module has rank 0", "r ≥ 1")


def test_adalora_E_and_beamlora_scores_must_hold_one_value_per_rank(tmp_path):
    A, B = pair()
    folder = write_adapter(tmp_path / "adalora", {**GOOD_CONFIG, "peft_type": "ADALORA"},
                           tensors={A_NAME: A, B_NAME: B, "base_model.model.l.0.q.lora_E.weight": np.ones((3, 1), np.float32)})
    with pytest.raises(RankscopeError, match=r"lora_E of module 'base_model.model.l.0.q' .* hold 3 values, expected one per rank \(4\)"):
        rankscope.load(folder)

    folder = write_adapter(tmp_path / "beam", GOOD_CONFIG)
    save_file({"base_model.model.l.0.q": np.ones(3, np.float32)}, folder / "beamlora_scores.safetensors")
    assert_one_error_line(run_cli("analyze", folder), "beamlora_scores.safetensors", "hold 3 values",
                          "expected one per rank (4)")
    save_file({"base_model.model.l.0.q": np.arange(4, dtype=np.float32)}, folder / "beamlora_scores.safetensors")
    np.testing.assert_array_equal(rankscope.load(folder).modules[0].scores, np.arange(4.0))


# ----------------------------------------------------------------------------- run folders


def write_run(root: Path, states: dict[str, bytes | None] | None = None, events: bytes | None = None) -> Path:
    for index, step in enumerate((10, 20)):
        folder = write_adapter(root / f"checkpoint-{step}", GOOD_CONFIG, tensors=dict(zip((A_NAME, B_NAME), pair(seed=index))))
        state = (states or {}).get(f"checkpoint-{step}", json.dumps({"global_step": step}).encode())
        if state is not None:
            (folder / "trainer_state.json").write_bytes(state)
    if events is not None:
        (root / "events.jsonl").write_bytes(events)
    return root


@pytest.mark.parametrize("state,expected", [
    (b'{"global_step": NaN}', "NaN is not a JSON number"),
    (b'{"global_step": Infinity}', "Infinity is not a JSON number"),
    (b'{"global_step": 10.5}', "field 'global_step' is the number 10.5, expected a non-negative integer"),
    (b'{"global_step": "10"}', "field 'global_step' is the string '10'"),
    (b'{"global_step": -3}', "expected a non-negative integer"),
    (b'{"global_step": 1', "is not valid JSON"),
    (b'[10]', "holds a JSON list, expected an object"),
    (b'\xff\xfe', "is not UTF-8 text"),
])
def test_trainer_state_is_validated_and_named_as_such(tmp_path, state, expected):
    root = write_run(tmp_path / "run", {"checkpoint-20": state})
    line = assert_one_error_line(run_cli("analyze", root), "checkpoint-20/trainer_state.json", expected)
    assert "the HF Trainer state" in line and "adapter's configuration" not in line


def test_trainer_state_without_a_step_falls_back_to_the_folder_name(tmp_path):
    root = write_run(tmp_path / "run", {"checkpoint-20": b'{"global_step": null}', "checkpoint-10": b"{}"})
    assert rankscope.load(root).steps == [10, 20]


@pytest.mark.parametrize("events,expected", [
    (b'[1, 2]\n', "events.jsonl line 1 is a list of 2, expected an object"),
    (b'{"step": 10}\n\xff\xfe\n', "events.jsonl line 2 is not UTF-8 text"),
    (b'{"step": 10}\nnot json\n', "events.jsonl line 2 is not valid JSON"),
    (b'{"step": "10", "module": "m"}\n', "line 1: field 'step' is the string '10', expected a non-negative integer"),
    (b'{"step": 10, "pruned": "2"}\n', "line 1: field 'pruned' is the string '2'"),
    (b'{"step": NaN}\n', "NaN is not a JSON number"),
])
def test_events_lines_must_be_event_objects(tmp_path, events, expected):
    root = write_run(tmp_path / "run", events=events)
    assert_one_error_line(run_cli("analyze", root, "--out", tmp_path / "never"), expected)
    assert not (tmp_path / "never").exists()


def test_hidden_temporaries_are_ignored_and_never_named(tmp_path):
    root = write_run(tmp_path / "run")
    left = root / ".step-000100.x1y2z3.tmp"  # what a crash inside an atomic write leaves
    left.mkdir()
    (left / "adapter_model.safetensors").write_bytes(b"\0\0\0")
    (root / ".checkpoint-30.abc.tmp").mkdir()
    assert rankscope.load(root).steps == [10, 20]

    only = tmp_path / "only"
    (only / ".step-000100.q9.tmp").mkdir(parents=True)
    (only / ".step-000100.q9.tmp" / "adapter_model.safetensors").write_bytes(b"\0\0\0")
    line = assert_one_error_line(run_cli("analyze", only), "holds nothing but hidden entries")
    assert ".step-000100" not in line and ".tmp" not in line


def test_symlink_loops_and_dangling_links_say_what_they_are(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    assert_one_error_line(run_cli("analyze", tmp_path / "loop"), "is a symbolic link loop")
    os.symlink("nowhere", tmp_path / "dangling")
    assert_one_error_line(run_cli("analyze", tmp_path / "dangling"), "is a symbolic link to nowhere, which does not exist")
    folder = write_adapter(tmp_path / "a", GOOD_CONFIG)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink("adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert_one_error_line(run_cli("analyze", folder), "adapter_model.safetensors is a symbolic link loop")


def test_a_fifo_or_a_folder_where_a_file_belongs_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")  # opening a FIFO would block until a writer came
    assert_one_error_line(run_cli("analyze", tmp_path / "pipe.safetensors"), "is not a regular file",
                          "expected a safetensors file")
    folder = write_adapter(tmp_path / "a", None)
    os.mkfifo(folder / "adapter_config.json")
    assert_one_error_line(run_cli("analyze", folder), "adapter_config.json is not a regular file",
                          "expected the adapter's configuration")
    folder = write_adapter(tmp_path / "b", None)
    (folder / "adapter_config.json").mkdir()
    assert_one_error_line(run_cli("analyze", folder), "adapter_config.json is not a regular file")


# ----------------------------------------------------------------------------- JSON documents read back


@pytest.fixture(scope="module")
def analysis_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "analysis.json"
    result = run_cli("analyze", REAL / "peft-roberta-series", "--json", path)
    assert result.returncode == 0, result.stderr
    return path


def _edit_document(path: Path, target: Path, edit) -> Path:
    document = json.loads(path.read_text())
    edit(document)
    target.write_text(json.dumps(document))
    return target


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d.pop("snapshots"), "field 'snapshots' is missing"),
    (lambda d: d.__setitem__("snapshots", []), "field 'snapshots' is a list of 0, expected a non-empty list"),
    (lambda d: d["snapshots"][-1]["modules"][0].__setitem__("rank", "2"), "field 'snapshots[4].modules[0].rank' is the string '2'"),
    (lambda d: d["snapshots"][-1]["modules"][0].__setitem__("rank", 0), "expected a positive integer"),
    (lambda d: d["snapshots"][-1]["modules"][0].__setitem__("importance", [1.0]), "expected one value per rank (2)"),
    (lambda d: d["snapshots"][-1]["modules"][0].pop("effective_rank"), "modules[0].effective_rank' is missing"),
    (lambda d: d["snapshots"][-1]["modules"][3].pop("name"), "modules[3].name' is missing"),
    (lambda d: d["snapshots"][0].__setitem__("step", "500"), "field 'snapshots[0].step' is the string '500'"),
    (lambda d: d["snapshots"][-1]["summary"]["top10_share"].__setitem__("median", "x"), "summary.top10_share.median"),
    (lambda d: d.__setitem__("events", [{"step": "a"}]), "field 'events[0].step' is the string 'a'"),
])
def test_compare_and_recommend_validate_an_analysis_json(tmp_path, analysis_json, edit, expected):
    bad = _edit_document(analysis_json, tmp_path / "bad.json", edit)
    assert_one_error_line(run_cli("recommend", bad), "bad.json", expected, "analysis-v1")
    assert_one_error_line(run_cli("compare", analysis_json, bad), "bad.json", expected)


@pytest.mark.parametrize("sweep,expected", [
    ({"points": 5}, "field 'points' is the number 5, expected a list"),
    ({"points": [{"order": "most", "fraction": "0.1", "value": 0.8}]}, "field 'points[0].fraction' is the string '0.1'"),
    ({"points": [{"fraction": 0.1, "value": 0.8}]}, "field 'points[0].order' is missing"),
    ({"points": [], "baseline": "0.9"}, "field 'baseline' is the string '0.9', expected a number or null"),
    ({"points": [], "metric": 3}, "field 'metric' is the number 3, expected a string"),
    ({"points": [], "higher_is_better": "yes"}, "field 'higher_is_better' is the string 'yes'"),
])
def test_a_malformed_sweep_beside_a_run(tmp_path, analysis_json, sweep, expected):
    run = write_adapter(tmp_path / "run", GOOD_CONFIG)
    (run / "sweep.json").write_text(json.dumps({"schema": "rankscope/sweep-v1", "metric": "accuracy", **sweep}))
    assert_one_error_line(run_cli("compare", run, analysis_json), "sweep.json", expected, "sweep-v1")


@pytest.mark.parametrize("config,expected", [
    ({"held_out": "1000"}, "field 'held_out' is the string '1000', expected a positive integer"),
    ({"held_out": 0.2}, "field 'held_out' is the number 0.2"),
    ({"seed": -1}, "field 'seed' is the number -1, expected a non-negative integer"),
    ({"seed": "0"}, "field 'seed' is the string '0'"),
    ({"max_length": None}, "field 'max_length' is null"),
])
def test_a_beamlora_run_config_is_validated(tmp_path, config, expected):
    from rankscope.tasks.runconfig import read_run_config

    (tmp_path / "config.json").write_text(json.dumps({"method": "lora", "model": "minilm", "data": "rotten-tomatoes",
                                                      "seed": 0, "held_out": 1000, "max_length": 64, **config}))
    with pytest.raises(RankscopeError) as caught:
        read_run_config(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "config.json")) and expected in str(caught.value)
    (tmp_path / "config.json").write_text('{"method": "lora", "held_out": NaN}')
    with pytest.raises(RankscopeError, match="field 'held_out' is the number nan"):
        read_run_config(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert read_run_config(tmp_path) is None  # not a run config at all: as before, a folder of another tool
