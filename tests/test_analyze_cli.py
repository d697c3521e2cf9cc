"""`rankscope analyze`: JSON shape, summary maths, plots, bad input, lazy imports."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers.adapters import write_peft
from helpers.cli import REPO, run_cli
from safetensors.numpy import save_file

from rankscope.constants import MANIFEST_FILE
from rankscope.maths import importance as imp


def graded_adapter(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    modules = {}
    for layer in range(3):
        for kind in ("self_attn.q_proj", "self_attn.v_proj"):
            A = rng.normal(size=(8, 16)).astype(np.float32)
            B = (rng.normal(size=(12, 8)) * np.geomspace(1, 0.01, 8)).astype(np.float32)  # strongly unequal ranks
            modules[f"model.layers.{layer}.{kind}"] = (A, B)
    return write_peft(tmp_path / "adapter", modules, r=8, alpha=16,
                      extra={"base_model.model.score.weight": np.ones((2, 12), np.float32)}), modules


def test_json_document_and_summary_numbers(tmp_path):
    folder, modules = graded_adapter(tmp_path)
    result = run_cli("analyze", folder, "--json", "-")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # stdout is pure JSON when --json -; the summary went to stderr
    assert "top-10% share" in result.stderr
    assert document["schema"] == "rankscope/analysis-v1" and document["format"] == "peft"
    (snapshot,) = document["snapshots"]
    assert snapshot["step"] is None and snapshot["skipped"] == 1
    assert [m["name"] for m in snapshot["modules"]] == [f"base_model.model.{n}" for n in modules]
    for entry, (A, B) in zip(snapshot["modules"], modules.values()):
        A64, B64 = A.astype(np.float64), B.astype(np.float64)
        expected = np.array([np.linalg.norm(2.0 * np.outer(B64[:, i], A64[i])) for i in range(8)])
        np.testing.assert_allclose(entry["importance"], expected, rtol=1e-9)
        normalised = np.sort(expected / expected.max())
        # Deciles the slow way: linear interpolation between order statistics.
        slow = [normalised[0] + 0 * q if q == 0 else np.interp(q * 7, np.arange(8), normalised) for q in np.linspace(0, 1, 11)]
        np.testing.assert_allclose(entry["deciles"], slow, rtol=1e-12)
        assert entry["top10_share"] == pytest.approx(expected.max() / expected.sum())
        p = expected / expected.sum()
        assert entry["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
        assert (entry["rank"], entry["scale"], entry["kind"]) == (8, 2.0, entry["name"].split(".", 5)[-1])
    summary = snapshot["summary"]
    shares = [m["top10_share"] for m in snapshot["modules"]]
    assert summary["top10_share"]["median"] == pytest.approx(np.median(shares))
    assert set(summary["by_kind"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert set(summary["by_layer"]) == {f"base_model.model.model.layers.{i}" for i in range(3)}


def test_spread_measures_on_known_vectors():
    uniform, single = np.ones(10), np.array([0, 0, 0, 5.0])
    assert imp.effective_rank(uniform) == pytest.approx(10)
    assert imp.effective_rank(single) == pytest.approx(1)
    assert imp.gini(uniform) == pytest.approx(0)
    assert imp.gini(single) == pytest.approx(3 / 4)
    assert imp.top_share(np.arange(1, 17.0)) == pytest.approx((16 + 15) / 136)  # top ceil(1.6) = 2 of 16
    np.testing.assert_array_equal(imp.deciles(np.zeros(4)), np.zeros(11))


def test_out_writes_plots_and_json(tmp_path):
    folder, _ = graded_adapter(tmp_path)
    result = run_cli("analyze", folder, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    for name in ("deciles.png", "heatmap.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    document = json.loads((tmp_path / "report" / "analysis.json").read_text())
    assert len(document["snapshots"][0]["modules"]) == 6
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".") and p.name != MANIFEST_FILE]  # no temporaries left


def test_nan_in_one_module_is_reported_and_the_rest_still_analysed(tmp_path):
    rng = np.random.default_rng(1)
    good = (rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32))
    bad_A = good[0].copy()
    bad_A[1, 2] = np.nan
    folder = write_peft(tmp_path / "nan", {"m.0.q": good, "m.1.q": (bad_A, good[1])}, r=4, alpha=4)
    result = run_cli("analyze", folder, "--json", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    assert "m.1.q hold NaN or Inf" in result.stdout
    modules = json.loads((tmp_path / "out.json").read_text())["snapshots"][0]["modules"]
    assert modules[0]["importance"] is not None and modules[1]["importance"] is None
    assert "NaN" in modules[1]["error"]


def _truncated(tmp_path: Path) -> Path:
    folder, _ = graded_adapter(tmp_path / "t")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return folder


def _corrupt_header(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    return path


def _unchained(tmp_path: Path) -> Path:
    rng = np.random.default_rng(2)
    return write_peft(tmp_path / "unchained", {"m.0.q": (rng.normal(size=(4, 6)).astype(np.float32),
                                                         rng.normal(size=(5, 3)).astype(np.float32))}, r=4, alpha=4)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(tmp_path: Path) -> Path:
    payload = _RunsCode()
    payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil" / "adapter_model.bin"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"x.lora_A.weight": payload}))
    return path.parent


def _no_pairs(tmp_path: Path) -> Path:
    save_file({"classifier.weight": np.ones((2, 3), np.float32)}, tmp_path / "head.safetensors")
    return tmp_path / "head.safetensors"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize("make,expected", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (_empty, "is an empty folder"),
    (lambda tmp: Path(os.environ.get("RS_FIXTURES", REPO.parent / "shared/fixtures/real")) / "bad/stub-2-bytes.safetensors", "is 2 bytes"),
    (lambda tmp: REPO.parent / "shared/fixtures/real/bad/git-lfs-pointer.safetensors", "Git LFS pointer"),
    (_truncated, "is truncated"),
    (_corrupt_header, "header is not JSON"),
    (_unchained, "which do not chain"),
    (_evil_pickle, "refusing to load it"),
    (_no_pairs, "no LoRA pairs"),
])
def test_bad_input_is_one_error_line(tmp_path, make, expected):
    target = make(tmp_path)
    result = run_cli("analyze", target, "--out", tmp_path / "never")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "never").exists()  # no half-written output
    assert not (tmp_path / "pwned").exists()  # and no code from a pickle ever ran


@pytest.mark.parametrize("which", ["adapter", "run"])
def test_analyze_imports_neither_transformers_nor_peft(tmp_path, which, analyze_in_a_fresh_process):
    folder = graded_adapter(tmp_path)[0] if which == "adapter" else REPO.parent / "shared/fixtures/real/peft-roberta-series"
    heavy, document = analyze_in_a_fresh_process(folder)
    assert heavy == [] and document["snapshots"]  # nothing heavy was imported, not even torch
