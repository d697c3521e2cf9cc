"""`rankscope analyze` on runs (temporal view, report.html), `recommend` and `compare` from the command line."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from helpers.adapters import adapter_arrays, independent_medians, write_adapter
from helpers.cli import REPO, run_cli

REAL = REPO.parent / "shared" / "fixtures" / "real"


def beamlora_like_run(folder: Path, decays=(1.0, 0.95, 0.85, 0.8, 0.8)) -> Path:
    """step-N snapshots whose importances separate over time, and an events.jsonl like the trainer's."""
    for i, decay in enumerate(decays):
        write_adapter(folder / f"step-{(i + 1) * 100:06d}", adapter_arrays(decay, seed=i))
    events = [{"step": 200, "p": 0.96, "module": f"base_model.model.layers.{m}.q", "pruned": [7] if m % 2 else [],
               "sources": [0] if m % 2 else [], "importance": [1.0] * 8} for m in range(12)]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def embedded_images(report: Path) -> list[bytes]:
    html = report.read_text()
    # Reads offline: nothing fetched; the only script is the inline table sorter (#21), no external source.
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    assert html.count("<script") == 1 and "table.sortable" in html
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_analyze_run_adds_the_temporal_view_and_an_offline_report(tmp_path):
    run = beamlora_like_run(tmp_path / "run")
    done = run_cli("analyze", run, "--out", tmp_path / "out", "--json", "-")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    dyn = document["dynamics"]
    assert dyn["steps"] == [100, 200, 300, 400, 500]
    assert dyn["operations"][0]["step"] == 200 and dyn["operations"][0]["pruned_total"] == 6
    # Spread rises as the constructed importances separate, and matches a float64 computation.
    medians = [band["effective_rank_ratio"]["median"] for band in dyn["spread"]]
    for i, decay in enumerate((1.0, 0.95, 0.85, 0.8, 0.8)):
        assert abs(medians[i] - independent_medians(adapter_arrays(decay, seed=i))[0]) < 1e-9
    assert medians[0] > medians[-1]
    assert "recommend" in done.stderr and "stability" in done.stderr
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["deciles.png", "energy.png", "heatmap.png", "rank_heatmap.png", "spread_over_time.png",
                    "stability.png"]
    images = embedded_images(tmp_path / "out" / "report.html")
    assert sorted(images) == sorted((tmp_path / "out" / name).read_bytes() for name in pngs)
    assert "p_init" in (tmp_path / "out" / "report.html").read_text()


def test_recommend_json_comes_from_the_data(tmp_path):
    flat = beamlora_like_run(tmp_path / "flat", decays=(1.0, 1.0, 1.0, 1.0, 1.0))
    steep = beamlora_like_run(tmp_path / "steep", decays=(1.0, 0.7, 0.6, 0.6, 0.6))
    recs = []
    for run in (flat, steep):
        done = run_cli("recommend", run, "--total-steps", "3000", "--json", "-")
        assert done.returncode == 0, done.stderr
        rec = json.loads(done.stdout)
        assert {"p_init", "delta_t", "reasons"} <= rec.keys() and rec["reasons"] and rec["total_steps"] == 3000
        recs.append(rec)
    assert recs[1]["p_init"] > recs[0]["p_init"]  # more unequal importances: a higher p operates as few ranks
    done = run_cli("recommend", REAL / "mlx-gemma-series", "--out", tmp_path / "rec")
    assert done.returncode == 0, done.stderr
    assert "p_init" in done.stdout and (tmp_path / "rec" / "report.html").is_file()
    assert json.loads((tmp_path / "rec" / "recommend.json").read_text())["p_init"] > 0.9


def test_compare_cli_names_the_more_even_run(tmp_path):
    even = write_adapter(tmp_path / "even", adapter_arrays(1.0, seed=1))
    steep = write_adapter(tmp_path / "steep", adapter_arrays(0.6, seed=2))
    done = run_cli("compare", steep, even, "--labels", "LoRA,BeamLoRA", "--out", tmp_path / "cmp", "--json", "-")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verdict"]["most_even"] == "BeamLoRA"
    assert [run["label"] for run in result["runs"]] == ["LoRA", "BeamLoRA"]
    assert "BeamLoRA" in done.stderr.splitlines()[-1] or any("BeamLoRA" in l for l in done.stderr.splitlines())
    assert len(embedded_images(tmp_path / "cmp" / "report.html")) >= 2


def test_bad_requests_give_one_error_line(tmp_path):
    one = write_adapter(tmp_path / "one", adapter_arrays(1.0, seed=1))
    for args, expected in [
        (("compare", one), "expected at least two runs"),
        (("compare", one, one, "--labels", "a,b,c"), "one name per path"),
        (("recommend", tmp_path / "missing"), "does not exist"),
        (("sweep", one, "--out", tmp_path / "s", "--fractions", "0,x"), "expected comma-separated numbers"),
    ]:
        done = run_cli(*args)
        assert done.returncode != 0 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], done.stderr
    assert not (tmp_path / "s").exists()


def test_real_series_give_a_temporal_report(tmp_path):
    for name, steps in (("peft-roberta-series", [500, 1000, 1500, 2000, 2400]),
                        ("mlx-gemma-series", [100, 200, 300, 400, 500, 600])):
        out = tmp_path / name
        done = run_cli("analyze", REAL / name, "--out", out, "--json", out / "doc.json")
        assert done.returncode == 0, done.stderr
        dyn = json.loads((out / "doc.json").read_text())["dynamics"]
        assert dyn["steps"] == steps and len(dyn["stability"]) == len(steps) - 1
        assert "stability" in done.stdout and "recommend" in done.stdout
        assert len(embedded_images(out / "report.html")) == 6  # deciles, energy, heatmap, ranks, spread, stability
