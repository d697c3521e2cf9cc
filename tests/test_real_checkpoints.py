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


def _sigma(delta: np.ndarray, rank: int) -> np.ndarray:
    """The top ``rank`` singular values of a dense float64 update: the slow obvious reference."""
    return np.linalg.svd(np.asarray(delta, dtype=np.float64), compute_uv=False)[:rank]


def _spectrum(document: dict, name: str) -> np.ndarray:
    return np.array(next(m for m in document["snapshots"][-1]["modules"] if m["name"] == name)["spectrum"])


def test_diffusers_metadata_sd15_scale_from_metadata(real_fixtures):
    from safetensors.numpy import load_file

    folder = real_fixtures / "diffusers-peft-metadata-sd15"
    checkpoint = rankscope.load(folder)
    assert checkpoint.format == "diffusers-peft"
    assert len(checkpoint.modules) == 96 and {m.rank for m in checkpoint.modules} == {4}
    # r 4 and lora_alpha 16 live only in the safetensors metadata: scale 4, not the 1 of a file without alphas
    assert {(m.scale, m.scale_source) for m in checkpoint.modules} == {(4.0, "lora_adapter_metadata")}
    raw = load_file(folder / "pytorch_lora_weights.safetensors")
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q"
    reference = _sigma(16 / 4 * raw[f"{name}.lora_B.weight"].astype(np.float64) @ raw[f"{name}.lora_A.weight"], 4)
    np.testing.assert_allclose(_spectrum(rankscope.analyze(folder), name), reference, rtol=1e-6)


def test_bloom_enable_lora_is_split_into_its_sub_adapters(real_fixtures):
    import torch

    folder = real_fixtures / "peft-bloom-enable-lora"
    checkpoint = rankscope.load(folder)
    assert checkpoint.format == "peft-enable-lora"
    assert len(checkpoint.modules) == 48 and {m.rank for m in checkpoint.modules} == {8}  # 24 fused layers × (q, v)
    assert {m.name.rsplit("[", 1)[1] for m in checkpoint.modules} == {"q]", "v]"}
    assert {(m.scale, m.in_features, m.out_features) for m in checkpoint.modules} == {(16 / 8, 1024, 3072)}
    state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    fused = "base_model.model.transformer.h.5.self_attention.query_key_value"
    A = state[f"{fused}.lora_A.weight"].double().numpy()  # (16, 1024): q's 8 rows, then v's
    B = state[f"{fused}.lora_B.weight"].double().numpy()  # (2048, 8, 1): groups of 1024 output rows
    q = 2.0 * B[:1024, :, 0] @ A[:8]  # group 0 -> the first third of the fused output (PEFT's zero_pad)
    v = 2.0 * B[1024:, :, 0] @ A[8:]  # group 1 -> the last third
    document = rankscope.analyze(folder)
    np.testing.assert_allclose(_spectrum(document, f"{fused}[q]"), _sigma(q, 8), rtol=1e-6)
    np.testing.assert_allclose(_spectrum(document, f"{fused}[v]"), _sigma(v, 8), rtol=1e-6)
    module = checkpoint[f"{fused}[v]"]
    B_read = module.B
    assert not B_read[:2048].any() and np.array_equal(B_read[2048:], B[1024:, :, 0].astype(np.float32))


def test_cloneofsimo_lora_diffusion(real_fixtures):
    from safetensors import safe_open

    path = real_fixtures / "lora-diffusion-cloneofsimo-sd15" / "lora_disney.safetensors"
    checkpoint = rankscope.load(path)
    assert checkpoint.format == "lora-diffusion"
    assert len(checkpoint.modules) == 192 and {m.rank for m in checkpoint.modules} == {1}
    assert sorted(checkpoint.skipped) == ["<s1>", "<s2>"]  # learned token embeddings, not LoRA pairs
    assert {(m.scale, m.scale_source) for m in checkpoint.modules} == {(1.0, "lora_diffusion's default scale 1")}
    with safe_open(path, "np") as f:
        up, down = f.get_tensor("unet:17:up").astype(np.float64), f.get_tensor("unet:17:down")
        assert f.metadata()["unet:17:rank"] == "1"
    np.testing.assert_allclose(_spectrum(rankscope.analyze(path), "unet:17"), _sigma(up.reshape(up.shape[0], -1)
                               @ down.reshape(down.shape[0], -1), 1), rtol=1e-6)


def test_lora_vit_sam_index_pairs(real_fixtures):
    from safetensors.numpy import load_file

    path = real_fixtures / "lora-vit-sam" / "lora_rank4.safetensors"
    checkpoint = rankscope.load(path)
    assert checkpoint.format == "lora-vit" and not checkpoint.skipped
    assert len(checkpoint.modules) == 24 and {m.rank for m in checkpoint.modules} == {4}
    assert {(m.scale, m.in_features, m.out_features) for m in checkpoint.modules} == {(1.0, 768, 768)}
    raw = load_file(path)
    assert raw["w_a_007"].shape == (4, 768) and raw["w_b_007"].shape == (768, 4)  # w_a = A (r, in), w_b = B (out, r)
    np.testing.assert_allclose(_spectrum(rankscope.analyze(path), "w_007"),
                               _sigma(raw["w_b_007"].astype(np.float64) @ raw["w_a_007"], 4), rtol=1e-6)
