"""DataFrames of the documents (#21): one row per module and snapshot, per run, per point, per adapter."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
from helpers.cli import REPO, run_cli

import rankscope
from rankscope.maths.compare import compare


def test_an_analysis_is_one_row_per_module_and_snapshot(real_fixtures):
    document = rankscope.analyze(real_fixtures / "peft-roberta-series")
    frame = rankscope.to_frame(document)
    assert len(frame) == sum(len(s["modules"]) for s in document["snapshots"]) == 5 * 12
    assert sorted(frame["step"].unique()) == [s["step"] for s in document["snapshots"]]
    for snapshot in (document["snapshots"][0], document["snapshots"][-1]):
        rows = frame[frame["step"] == snapshot["step"]].set_index("name")
        for m in snapshot["modules"]:
            row = rows.loc[m["name"]]
            assert (row["layer"], row["kind"], row["rank"]) == (m["layer"], m["kind"], m["rank"])
            assert row["k95"] == m["energy_rank"]["0.95"] and row["k95_over_r"] == m["energy_rank"]["0.95"] / m["rank"]
            assert row["top10_share"] == m["top10_share"] and row["stable_rank"] == m["stable_rank"]
            assert row["effective_rank_ratio"] == m["effective_rank"] / m["rank"]
    # the medians a user computes from the frame are the summary's
    last = frame[frame["step"] == document["snapshots"][-1]["step"]]
    assert np.isclose(last["top10_share"].median(), document["snapshots"][-1]["summary"]["top10_share"]["median"])


def test_a_comparison_and_a_sweep(real_fixtures):
    documents = [rankscope.analyze(real_fixtures / name) for name in ("peft-roberta-series", "mlx-gemma-series")]
    result = compare(documents, ["roberta", "gemma"])
    frame = rankscope.to_frame(result)
    assert list(frame["label"]) == ["roberta", "gemma"]
    assert list(frame["spectral_effective_rank_ratio"]) == [r["spectral_effective_rank_ratio"]["median"]
                                                            for r in result["runs"]]
    sweep = {"schema": "rankscope/sweep-v1", "points": [
        {"order": "least", "fraction": 0.5, "seed": None, "value": 0.8, "params_kept": 0.5, "energy": None}]}
    assert rankscope.to_frame(sweep).iloc[0]["value"] == 0.8


def test_a_survey_of_several_adapters_is_one_row_each_and_an_error_is_a_row(real_fixtures, tmp_path):
    paths = [real_fixtures / "peft-gpt2-conv1d", real_fixtures / "bad" / "stub-2-bytes.safetensors",
             real_fixtures / "mlx-gemma-series"]
    done = run_cli("analyze", *paths, "--table", "-")
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(io.StringIO(done.stdout))
    assert list(frame["path"]) == [str(p) for p in paths]
    assert frame["modules"].isna().tolist() == [False, True, False] and "2 bytes" in frame["error"][1]
    document = rankscope.analyze(paths[0])
    assert frame["k95_over_r"][0] == document["snapshots"][-1]["summary"]["energy_rank_ratio"]["median"]
    assert run_cli("analyze", *paths, "--table", tmp_path / "survey.csv").returncode == 0
    assert pd.read_csv(tmp_path / "survey.csv")["verdict"][2] == json.loads(run_cli(
        "analyze", paths[2], "--json", "-").stdout)["snapshots"][-1]["summary"]["verdict"]["sentence"]
    assert "expected one PATH, or --table" in run_cli("analyze", *paths).stderr


def test_analyze_without_a_table_does_not_import_pandas(real_fixtures):
    code = ("import sys\nfrom rankscope.cli import main\ntry:\n    main(['analyze', sys.argv[1], '--json', '/dev/null'])\n"
            "except SystemExit:\n    pass\nprint('pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(real_fixtures / "peft-gpt2-conv1d")], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stderr
