"""The real checkpoints in ../shared/fixtures/real, made by other people's tools, read in place."""

from __future__ import annotations

import json

import numpy as np
import pytest

import rankscope
from rankscope.io.tensors import open_tensor_file


def test_roberta_trainer_series(real_fixtures):
    series = rankscope.load(real_fixtures / "peft-roberta-series")
    assert isinstance(series, rankscope.Series) and series.layout == "hf-trainer"
    assert series.steps == [500, 1000, 1500, 2000, 2400]
    for checkpoint in series:
        state = json.loads((checkpoint.path.parent / "trainer_state.json").read_text())
        assert checkpoint.step == state["global_step"]
        assert len(checkpoint.modules) == 12 and {m.rank for m in checkpoint.modules} == {2}
        assert all(m.scale == 4 / 2 and m.name.endswith("attention.self.query") for m in checkpoint.modules)
        # The classifier head from modules_to_save: four tensors, skipped and counted.
        assert sorted(checkpoint.skipped) == sorted(
            f"base_model.model.classifier.{p}.{t}" for p in ("dense", "out_proj") for t in ("weight", "bias"))


def test_gpt2_conv1d(real_fixtures):
    checkpoint = rankscope.load(real_fixtures / "peft-gpt2-conv1d")
    assert len(checkpoint.modules) == 12
    for module in checkpoint.modules:
        assert (module.rank, module.in_features, module.out_features, module.scale) == (8, 768, 2304, 1.0)
    assert checkpoint.skipped == ["base_model.model.score.weight"]


def test_mlx_series_is_transposed(real_fixtures):
    series = rankscope.load(real_fixtures / "mlx-gemma-series")
    assert series.layout == "mlx-series" and series.steps == [100, 200, 300, 400, 500, 600]
    assert series.final.weights.name == "adapters.safetensors"
    raw = open_tensor_file(real_fixtures / "mlx-gemma-series" / "0000600_adapters.safetensors")
    checkpoint = series.at_step(600)
    assert len(checkpoint.modules) == 8 and {m.rank for m in checkpoint.modules} == {8}
    assert {m.layer_index for m in checkpoint.modules} == {14, 15, 16, 17}
    for module in checkpoint.modules:
        assert module.scale == 10.0  # lora_parameters.scale of the old-style config
        lora_a = raw[f"{module.name}.lora_a"]
        np.testing.assert_array_equal(module.A, lora_a.T)  # (in, r) stored, (r, in) read
        assert module.A.shape == (8, 2048)
    v = checkpoint["model.layers.14.self_attn.v_proj"]
    assert (v.in_features, v.out_features) == (2048, 256)


def test_diffusers_legacy_sd15(real_fixtures):
    checkpoint = rankscope.load(real_fixtures / "diffusers-legacy-sd15")
    assert checkpoint.format == "diffusers-legacy"
    assert len(checkpoint.modules) == 128 and {m.rank for m in checkpoint.modules} == {4}
    assert all(m.scale == 1.0 for m in checkpoint.modules) and not checkpoint.skipped
    assert {m.kind.rsplit(".", 1)[-1] for m in checkpoint.modules} == {"to_q", "to_k", "to_v", "to_out"}


@pytest.mark.parametrize("name,expected", [
    ("stub-2-bytes.safetensors", "is 2 bytes: too small to be a safetensors file"),
    ("git-lfs-pointer.safetensors", "is a Git LFS pointer file"),
])
def test_bad_fixtures_give_their_error(real_fixtures, name, expected):
    with pytest.raises(rankscope.RankscopeError, match=expected):
        rankscope.load(real_fixtures / "bad" / name)


def test_whole_real_series_analyses(real_fixtures):
    document = rankscope.analyze(real_fixtures / "mlx-gemma-series")
    assert [s["step"] for s in document["snapshots"]] == [100, 200, 300, 400, 500, 600]
    for snapshot in document["snapshots"]:
        for module in snapshot["modules"]:
            assert len(module["importance"]) == 8 and len(module["deciles"]) == 11
            assert module["deciles"][-1] == 1.0
