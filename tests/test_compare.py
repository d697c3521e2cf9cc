"""`rankscope.compare`: per-run spread, Mann-Whitney tests, verdict, sweep overlay, plots, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.adapters import MODULES, R, adapter_arrays, independent_medians, write_adapter

from rankscope.errors import RankscopeError
from rankscope.io.documents import to_json
from rankscope.maths.compare import compare, load_run_for_compare
from rankscope.views.compare_plot import plot_compare
from rankscope.views.text import compare_lines

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_doc(fall: float) -> dict:
    """A sweep whose "most" curve falls at ``fall`` per unit fraction; random has three seeds."""
    points = []
    for f in [round(0.1 * i, 1) for i in range(11)]:
        points.append({"order": "most", "fraction": f, "seed": None, "value": max(0.5, 0.9 - fall * f)})
        points.append({"order": "least", "fraction": f, "seed": None, "value": 0.9 - 0.4 * f ** 3})
        for seed in range(3):
            points.append({"order": "random", "fraction": f, "seed": seed, "value": 0.9 - 0.3 * f + 0.01 * seed})
    return {"schema": "rankscope/sweep-v1", "metric": "accuracy", "baseline": 0.9, "higher_is_better": True,
            "points": points}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    even, steep = adapter_arrays(1.0, 0), adapter_arrays(0.6, 1)
    even_dir, steep_dir = write_adapter(root / "even", even), write_adapter(root / "steep", steep)
    # One sweep beside the checkpoint, the other in a sweep/ subfolder: both places are searched.
    (even_dir / "sweep.json").write_text(json.dumps(sweep_doc(2.0)))
    (steep_dir / "sweep").mkdir()
    (steep_dir / "sweep" / "sweep.json").write_text(json.dumps(sweep_doc(0.8)))
    return {"root": root, "even": (even_dir, even), "steep": (steep_dir, steep),
            "loaded": {name: load_run_for_compare(root / name) for name in ("even", "steep")}}


def test_even_run_wins_with_small_p_and_medians_match_raw_arrays(two_runs):
    (even_doc, _), (steep_doc, _) = two_runs["loaded"]["even"], two_runs["loaded"]["steep"]
    result = compare([even_doc, steep_doc], labels=["even", "steep"])
    assert result["schema"] == "rankscope/compare-v1"
    assert [r["label"] for r in result["runs"]] == ["even", "steep"]
    for run, name in zip(result["runs"], ("even", "steep")):
        ratio, share = independent_medians(two_runs[name][1])
        assert run["modules"] == MODULES and run["ranks"] == [R]
        assert run["effective_rank_ratio"]["median"] == pytest.approx(ratio, rel=1e-12)
        assert run["top10_share"]["median"] == pytest.approx(share, rel=1e-12)
        assert run["effective_rank_ratio"]["iqr"] >= 0 and len(run["deciles"]["median"]) == 11
    (test,) = result["tests"]
    for metric in ("effective_rank_ratio", "top10_share"):
        assert test[metric]["more_even"] == "even" and test[metric]["p_value"] < 0.01
        assert test[metric]["n_a"] == test[metric]["n_b"] == MODULES and test[metric]["significant"]
    assert test["effective_rank_ratio"]["statistic"] == MODULES * MODULES  # complete separation
    verdict = result["verdict"]
    assert verdict["most_even"] == "even" and not verdict["tie"] and verdict["significant"]
    assert "even" in verdict["sentence"] and "p = " in verdict["sentence"]
    json.loads(to_json(result))  # JSON-ready


def test_swapping_inputs_swaps_the_result(two_runs):
    (even_doc, _), (steep_doc, _) = two_runs["loaded"]["even"], two_runs["loaded"]["steep"]
    forward = compare([even_doc, steep_doc], labels=["even", "steep"])
    backward = compare([steep_doc, even_doc], labels=["steep", "even"])
    assert forward["runs"] == backward["runs"][::-1]
    f, b = forward["tests"][0]["effective_rank_ratio"], backward["tests"][0]["effective_rank_ratio"]
    assert (backward["tests"][0]["a"], backward["tests"][0]["b"]) == ("steep", "even")
    assert b["statistic"] == pytest.approx(f["n_a"] * f["n_b"] - f["statistic"])  # U of the other side
    assert b["p_value"] == pytest.approx(f["p_value"]) and b["more_even"] == f["more_even"] == "even"
    assert backward["verdict"]["most_even"] == forward["verdict"]["most_even"] == "even"


def test_identical_runs_tie(two_runs):
    even_doc, _ = two_runs["loaded"]["even"]
    result = compare([even_doc, even_doc], labels=["one", "two"])
    test = result["tests"][0]
    for metric in ("effective_rank_ratio", "top10_share"):
        assert test[metric]["p_value"] >= 0.05 and test[metric]["more_even"] is None
    verdict = result["verdict"]
    assert verdict["tie"] and verdict["most_even"] is None and not verdict["significant"]
    assert "same median" in verdict["per_rank_sentence"] and verdict["spectral"]["tie"]


def test_sweep_overlay_and_lines(two_runs):
    (even_doc, even_sweep), (steep_doc, steep_sweep) = two_runs["loaded"]["even"], two_runs["loaded"]["steep"]
    assert even_sweep is not None and steep_sweep is not None
    result = compare([even_doc, steep_doc], labels=["even", "steep"], sweeps=[even_sweep, steep_sweep])
    overlay = result["sweeps"]
    assert overlay["metric"] == "accuracy" and [r["label"] for r in overlay["runs"]] == ["even", "steep"]
    even_curves = overlay["runs"][0]
    assert set(even_curves["curves"]) == {"most", "least", "random"} and set(even_curves["drops"]) == {"most", "least"}
    random = even_curves["curves"]["random"]
    assert random["n"][3] == 3 and random["mean"][3] == pytest.approx(0.9 - 0.3 * 0.3 + 0.01)  # mean over seeds
    most = even_curves["drops"]["most"]
    assert most["drop"][most["fraction"].index(0.1)] == pytest.approx(0.2)
    steep_most = overlay["runs"][1]["drops"]["most"]
    assert steep_most["drop"][2] == pytest.approx(0.8 * 0.2)
    lines = compare_lines(result)
    assert sum(line.lstrip().startswith("run ") for line in lines) == 2
    # Two per-rank and three spectral measures for the one pair.
    assert sum(line.lstrip().startswith("test ") for line in lines) == 5
    assert sum(line.lstrip().startswith("sweep ") for line in lines) == 2
    assert lines[-1].lstrip().startswith("verdict") and "p = " in lines[-1]
    # One run with a sweep is no overlay.
    assert compare([even_doc, steep_doc], sweeps=[even_sweep, None])["sweeps"] is None


def test_plots_are_png(two_runs, tmp_path):
    (even_doc, even_sweep), (steep_doc, steep_sweep) = two_runs["loaded"]["even"], two_runs["loaded"]["steep"]
    result = compare([even_doc, steep_doc], labels=["even", "steep"], sweeps=[even_sweep, steep_sweep])
    paths = plot_compare(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["compare_deciles.png", "compare_energy.png", "compare_spread.png",
                                        "compare_sweeps.png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    no_sweeps = plot_compare(compare([even_doc, steep_doc]), tmp_path / "bare")
    assert [p.name for p in no_sweeps] == ["compare_deciles.png", "compare_energy.png", "compare_spread.png"]


def test_analysis_json_input_and_bad_input(two_runs, tmp_path):
    even_doc, _ = two_runs["loaded"]["even"]
    saved = tmp_path / "even.json"
    saved.write_text(to_json(even_doc))
    document, sweep = load_run_for_compare(saved)
    assert document["schema"] == "rankscope/analysis-v1" and sweep is None  # no sweep.json beside it
    with pytest.raises(RankscopeError, match="at least two"):
        compare([document])
    with pytest.raises(RankscopeError, match="labels"):
        compare([document, document], labels=["same", "same"])
    with pytest.raises(RankscopeError, match="not a rankscope analysis"):
        compare([document, {"schema": "something-else"}])


def test_real_roberta_checkpoints_compare(tmp_path):
    series = REAL / "peft-roberta-series"
    loaded = [load_run_for_compare(series / name) for name in ("checkpoint-500", "checkpoint-2400")]
    result = compare([d for d, _ in loaded], sweeps=[s for _, s in loaded])
    assert [r["label"] for r in result["runs"]] == ["checkpoint-500", "checkpoint-2400"]
    assert all(r["modules"] == 12 and r["ranks"] == [2] for r in result["runs"])
    assert 0 <= result["tests"][0]["effective_rank_ratio"]["p_value"] <= 1
    assert result["sweeps"] is None and compare_lines(result)[-1].lstrip().startswith("verdict")
    assert len(plot_compare(result, tmp_path)) == 3  # deciles, energy, spread
