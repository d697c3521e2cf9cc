"""Sweeps and resize --validate on a chosen device and precision (issue 20, point 7).

The base model loads in the asked dtype; a sweep in bf16 or fp32 puts every LoRA weight back bit for
bit (torch.equal); bad --device / --precision / --batch-size are one Error: line before any load.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers.cli import assert_one_error_line, run_cli
from helpers.tiny_causal import tiny_causal_folder, tiny_model, tiny_tokenizer
from peft import LoraConfig, get_peft_model

import rankscope
from rankscope import RankscopeError
from rankscope.adapters.sweep import sweep
from rankscope.cli import main
from rankscope.io.loading import resolve_adapter
from rankscope.tasks.arithmetic import generate
from rankscope.tasks.evaluate import build_evaluation
from rankscope.tasks.placement import resolve_placement

FRACTIONS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder, a LoRA adapter on it with non-zero B, and a text file to score."""
    root = tmp_path_factory.mktemp("placement")
    base = tiny_causal_folder(root / "base")
    model = get_peft_model(tiny_model(tiny_tokenizer()), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                    lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(root / "adapter")
    train, _ = generate(6, 0)
    texts = root / "texts.txt"
    texts.write_text("\n\n".join(p.question + " " + p.answer for p in train))
    return base, root / "adapter", texts


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_bit_for_bit(model, before: dict[str, torch.Tensor]) -> None:
    after = lora_state(model)
    assert after.keys() == before.keys() and before
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sweep_restores_every_lora_weight_bit_for_bit_in_each_precision(tiny, precision):
    base, adapter, texts = tiny
    placement = resolve_placement("cpu", precision, 3)
    checkpoint = resolve_adapter(adapter)
    task = build_evaluation(checkpoint, str(base), str(texts), "loss", 6, None, placement)
    model = task.model
    base_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {placement.dtype}  # the base model was loaded in the asked dtype
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT keeps it fp32
    before = lora_state(model)
    result = sweep(model, checkpoint, task.evaluate, fractions=FRACTIONS, seeds=1, energies=(0.9,), progress=False,
                   metric=task.metric, higher_is_better=False)
    assert_bit_for_bit(model, before)
    assert result.restored_value == result.baseline and not result.notes
    # Everything pruned differs from the baseline: the sweep really edited the weights it restored.
    assert result.value("least", 1.0) != result.baseline
    if precision == "bf16":
        # And with the LoRA weights themselves in bf16 (spectral writes included): still bit for bit.
        model.to(torch.bfloat16)
        before = lora_state(model)
        assert {v.dtype for v in before.values()} == {torch.bfloat16}
        result = sweep(model, checkpoint, task.evaluate, fractions=FRACTIONS, seeds=1, energies=(0.9,), progress=False)
        assert_bit_for_bit(model, before)
        assert result.restored_value == result.baseline


def test_python_api_takes_the_same_options_and_bf16_changes_the_numbers_a_little(tiny):
    base, adapter, texts = tiny
    common = dict(data=str(texts), metric="loss", examples=6, fractions=(0.0, 1.0), orders=("least",),
                  spectral=False, energies=(), progress=False, device="cpu", batch_size=3)
    fp32 = rankscope.sweep(str(base), adapter, precision="fp32", **common)
    bf16 = rankscope.sweep(str(base), adapter, precision="bf16", **common)
    assert fp32.metric == "loss" and not fp32.higher_is_better
    # bf16 rounds the base weights: the loss moves, but by far less than the loss itself.
    assert bf16.baseline != fp32.baseline
    assert math.isclose(bf16.baseline, fp32.baseline, rel_tol=0.05)
    assert bf16.restored_value == bf16.baseline
    loaded = build_evaluation(resolve_adapter(adapter), str(base), str(texts), "loss", 6, None,
                              resolve_placement("cpu", "fp32", 3))
    assert fp32.baseline == loaded.evaluate(loaded.model)  # the same evaluation as the command's
    with pytest.raises(RankscopeError, match="apply when rankscope loads the base model"):
        rankscope.sweep(loaded.model, adapter, loaded.evaluate, device="cpu")
    with pytest.raises(RankscopeError, match="--batch-size 0"):
        rankscope.sweep(str(base), adapter, data=str(texts), batch_size=0)


def test_placement_choices_and_refusals():
    assert resolve_placement("auto", "fp32").device == ("cuda" if torch.cuda.is_available() else
                                                         "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_placement("CPU", "BF16", 8).dtype == torch.bfloat16
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(RankscopeError, match="expected a whole number of examples"):
            resolve_placement("cpu", "fp32", bad)
    with pytest.raises(RankscopeError, match="fp16 on the CPU"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(RankscopeError, match="--device 'tpu'"):
        resolve_placement("tpu", "fp32")



def _in_process_error(capfd, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


def test_cli_refuses_bad_placements_before_anything_loads(tmp_path, capfd):
    # The adapter does not exist: the placement error coming first shows it is checked before any read or load.
    missing = tmp_path / "no-adapter"
    sweep_args = ("sweep", missing, "--model", "smollm2", "--out", tmp_path / "out")
    if not torch.cuda.is_available():  # a fresh interpreter, as a user runs it
        assert_one_error_line(run_cli(*sweep_args, "--device", "cuda", "--precision", "bf16"), "--device cuda", "no CUDA")
    assert "fp16 on the CPU" in _in_process_error(capfd, *sweep_args, "--device", "cpu", "--precision", "fp16")
    assert "--batch-size 0" in _in_process_error(capfd, *sweep_args, "--batch-size", "0")
    if not torch.backends.mps.is_available():
        assert "--device mps" in _in_process_error(capfd, "resize", missing, "--out", tmp_path / "small", "--rank", "2",
                                                   "--validate", "--model", "smollm2", "--device", "mps")
    assert not (tmp_path / "out").exists() and not (tmp_path / "small").exists()


def test_cli_sweep_in_bf16_names_its_placement(tiny, tmp_path, capfd):
    base, adapter, texts = tiny
    args = ["sweep", adapter, "--model", base, "--data", texts, "--metric", "loss", "--examples", "6", "--fractions",
            "0,1", "--order", "least", "--no-spectral", "--energies", "", "--device", "cpu", "--precision", "bf16",
            "--batch-size", "3", "--out", tmp_path / "sweep", "--json", "-"]
    main([str(a) for a in args])  # in this process: the subprocess runs above already cover the entry point
    out, err = capfd.readouterr()
    assert "(cpu, bf16, batch 3)" in err.splitlines()[0], err
    api = rankscope.sweep(str(base), adapter, data=str(texts), metric="loss", examples=6, fractions=(0.0, 1.0),
                          orders=("least",), spectral=False, energies=(), progress=False, device="cpu",
                          precision="bf16", batch_size=3)
    document = json.loads(out)
    assert document["baseline"] == api.baseline == document["restored_value"]
