"""notebooks/rank_dynamics.ipynb runs top to bottom (nbclient); any cell error fails the test."""

from __future__ import annotations

import os

import nbformat
from helpers.cli import REPO
from nbclient import NotebookClient


def test_rank_dynamics_notebook_runs_top_to_bottom(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKSCOPE_NOTEBOOK_STEPS", "30")  # short: the walk-through, not the learning, is tested
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(REPO / "notebooks" / "rank_dynamics.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "held-out accuracy" in text and "p_init" in text and "BeamLoRA" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # dynamics and comparison plots shown
