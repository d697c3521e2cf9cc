"""Shared test set-up: one torch thread per pytest worker, and where the real fixtures live."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two xdist workers on two cores: one thread each, or they fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# The dequantised SmolLM2 is cached inside the checkout (git-ignored), not in the user's home.
os.environ.setdefault("BEAMLORA_CACHE", str(REPO / ".cache" / "beamlora"))
REAL_FIXTURES = REPO.parent / "shared" / "fixtures" / "real"


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    # The real checkpoints live beside the repository (../shared), in CI as here; they are read in place.
    assert REAL_FIXTURES.is_dir(), f"real fixtures not found at {REAL_FIXTURES}"
    return REAL_FIXTURES


TINY_WIDTH = 32


def save_tiny_bert(folder: Path, dropout: bool = True) -> Path:
    """A 2-layer BERT of width 32 (random weights, seed 0) with MiniLM's tokenizer, saved into ``folder``;
    ``dropout=False`` for runs whose maths must not depend on how a batch is split."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankscope.tasks.models import model_path

    torch.manual_seed(0)
    off = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    BertForSequenceClassification(BertConfig(hidden_size=TINY_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=48, num_labels=2, **off)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_path("minilm")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT of width 32 (random weights) with MiniLM's tokenizer, saved as a local folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """200 short reviews whose label is the sentiment word they contain."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    fillers = ["the plot", "the cast", "this film", "the ending", "the score", "its pacing"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(200):
            good = i % 2 == 0
            word = rng.choice(["great", "wonderful", "superb"] if good else ["awful", "dull", "terrible"])
            writer.writerow([f"{rng.choice(fillers)} was {word} {i}", "pos" if good else "neg"])
    return path


HEAVY_MODULES = ("transformers", "peft", "torch", "matplotlib", "scipy")


@pytest.fixture
def analyze_in_a_fresh_process(tmp_path):
    """``(heavy modules imported, analysis.json)`` of ``rankscope analyze PATH --json`` run by the CLI's
    ``main`` in a new interpreter, after importing ``preload`` (module names) first."""

    def run(path, preload: tuple[str, ...] = ()) -> tuple[list[str], dict]:
        out = tmp_path / "fresh-analysis.json"
        code = ("import sys\n" + "".join(f"import {m}\n" for m in preload) + "from rankscope.cli import main\n"
                "try:\n    main(['analyze', sys.argv[1], '--json', sys.argv[2]])\nexcept SystemExit:\n    pass\n"
                f"print('heavy:' + ','.join(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))")
        result = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        heavy = result.stdout.strip().splitlines()[-1].removeprefix("heavy:")
        return [m for m in heavy.split(",") if m], json.loads(out.read_text())

    return run
