"""Every format, written by the test, loaded by rankscope, checked against float64 built the slow way.

The independent computation: build each rank's d×k update ``scale · c_i · b_i a_iᵀ`` in float64
and take its Frobenius norm; for PEFT adapters also check that the ranks add up to PEFT's own
``get_delta_weight`` (so scale and orientation match what PEFT applies), and that the spectrum
equals the SVD of that full matrix.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import rankscope
from rankscope.io.loading import step_from_name
from rankscope.maths.analysis import analyze_module

RTOL = 1e-9


def per_rank_frobenius(A: np.ndarray, B: np.ndarray, scale: float, c: np.ndarray | None = None) -> np.ndarray:
    """The slow obvious way: the full d×k matrix of each rank, then its Frobenius norm."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    c = np.ones(A.shape[0]) if c is None else np.asarray(c, np.float64)
    return np.array([np.linalg.norm(scale * c[i] * np.outer(B[:, i], A[i]), "fro") for i in range(A.shape[0])])


def full_spectrum(delta: np.ndarray, r: int) -> np.ndarray:
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    return np.pad(s, (0, max(0, r - s.size)))[:r]


def slow_energy_rank(singular_values: np.ndarray, share: float) -> int:
    """Smallest k with σ_1² + … + σ_k² ≥ share · Σσ², by walking k up from 0."""
    energy = np.asarray(singular_values, np.float64) ** 2
    if energy.sum() == 0:
        return 0
    for k in range(1, energy.size + 1):
        if energy[:k].sum() >= share * energy.sum() * (1 - 1e-12):
            return k
    return energy.size


def check_spectral_fields(entry: dict, delta: np.ndarray, spectrum_of: str = "scale·B·A") -> None:
    """energy_rank, stable_rank and spectral_effective_rank against a dense float64 SVD of the whole update."""
    s = np.linalg.svd(np.asarray(delta, np.float64), compute_uv=False)
    assert entry["energy_rank"] == {key: slow_energy_rank(s, float(key)) for key in ("0.9", "0.95", "0.99")}
    assert entry["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-6)
    p = s[s > 1e-12 * s[0]] / s.sum()
    assert entry["spectral_effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert entry["spectrum_of"].startswith(spectrum_of)


def tiny_bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        vocab_size=64, max_position_embeddings=32, num_labels=3, **overrides)
    return BertForSequenceClassification(config)


def randomise_lora(model, seed: int = 1) -> None:
    """Give every LoRA factor random values (B starts at zero) with deliberately unequal ranks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * torch.linspace(0.1, 2.0, p.numel()).reshape(p.shape))


def peft_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def check_against_peft(model, checkpoint, coefficient_of=None) -> None:
    """Importances and spectra of every loaded module against PEFT's own delta weights, in float64."""
    layers = peft_layers(model)
    assert len(checkpoint.modules) == len(layers)
    for module in checkpoint.modules:
        layer = layers[module.name]
        A, B = module.A, module.B
        c = coefficient_of(layer) if coefficient_of else None
        expected = per_rank_frobenius(A, B, module.scale, c)
        entry = analyze_module(module)
        np.testing.assert_allclose(entry["importance"], expected, rtol=RTOL)
        with torch.no_grad():
            delta = layer.get_delta_weight("default").double()
        delta = delta.reshape(delta.shape[0], -1).numpy()
        # The ranks add up to exactly what PEFT applies: scale and orientation are right.
        rebuilt = module.scale * np.asarray(B, np.float64) @ np.diag(np.ones(module.rank) if c is None else c) @ np.asarray(A, np.float64)
        if rebuilt.shape != delta.shape:
            rebuilt = rebuilt.T  # GPT-2 Conv1D and embeddings store ΔW transposed
        np.testing.assert_allclose(rebuilt, delta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(entry["spectrum"], full_spectrum(delta, module.rank), rtol=1e-5, atol=1e-7)
        meaning = {"conv": "scale·B·A with A flattened"}.get(module.layer_type, "scale·B·A")
        # The float64 product (checked against PEFT's float32 delta just above): no float32 noise directions.
        check_spectral_fields(entry, rebuilt, "scale·B·diag(E)·A" if module.E is not None else meaning)


def test_peft_adapter_from_real_peft_matches_get_delta_weight(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=6, lora_alpha=12, target_modules=["query", "value", "dense"],
                                                   modules_to_save=["classifier"]))
    randomise_lora(model)
    model.save_pretrained(tmp_path)
    checkpoint = rankscope.load(tmp_path)
    assert checkpoint.format == "peft"
    assert {m.rank for m in checkpoint.modules} == {6}
    assert all(m.scale == 2.0 for m in checkpoint.modules)
    # The classifier head (modules_to_save) is skipped and counted, never paired.
    assert checkpoint.skipped and all("classifier" in k for k in checkpoint.skipped)
    check_against_peft(model, checkpoint)


def test_rank_pattern_alpha_pattern_and_rslora(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                        rank_pattern={"layer.1.attention.self.query": 8}, alpha_pattern={"value": 3})
    model = get_peft_model(tiny_bert(), config)
    randomise_lora(model)
    model.save_pretrained(tmp_path / "patterns")
    checkpoint = rankscope.load(tmp_path / "patterns")
    ranks = {m.name.split("encoder.")[1]: (m.rank, m.scale) for m in checkpoint.modules}
    assert ranks["layer.1.attention.self.query"] == (8, 1.0)
    assert ranks["layer.0.attention.self.query"] == (4, 2.0)
    assert ranks["layer.0.attention.self.value"] == (4, 0.75)
    check_against_peft(model, checkpoint)

    model = get_peft_model(tiny_bert(), LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=["key"]))
    randomise_lora(model)
    model.save_pretrained(tmp_path / "rslora")
    checkpoint = rankscope.load(tmp_path / "rslora")
    assert all(math.isclose(m.scale, 6 / 3) for m in checkpoint.modules)
    check_against_peft(model, checkpoint)


@pytest.mark.parametrize("dtype,stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_adapters_are_read_exactly(tmp_path, dtype, stored):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=5, lora_alpha=5, target_modules=["query"]))
    randomise_lora(model)
    model = model.to(dtype)
    model.save_pretrained(tmp_path)
    checkpoint = rankscope.load(tmp_path)
    layers = peft_layers(model)
    for module in checkpoint.modules:
        assert module.stored_dtype == stored
        layer = layers[module.name]
        # The stored half values, widened exactly to float64 by torch, give the expected norms.
        A = layer.lora_A["default"].weight.detach().double().numpy()
        B = layer.lora_B["default"].weight.detach().double().numpy()
        np.testing.assert_array_equal(np.asarray(module.A, np.float64), A)
        np.testing.assert_allclose(analyze_module(module)["importance"], per_rank_frobenius(A, B, 1.0), rtol=RTOL)


def test_pickled_bin_adapter_loads_through_weights_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=3, lora_alpha=6, target_modules=["value"]))
    randomise_lora(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    checkpoint = rankscope.load(tmp_path)
    assert checkpoint.path.name == "adapter_model.bin"
    check_against_peft(model, checkpoint)


def test_gpt2_conv1d_embedding_and_dora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=24, n_layer=2, n_head=2, vocab_size=50, n_positions=16))
    model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True))
    randomise_lora(model)
    model.save_pretrained(tmp_path / "gpt2")
    checkpoint = rankscope.load(tmp_path / "gpt2")
    kinds = {m.name.rsplit(".", 1)[-1]: m.layer_type for m in checkpoint.modules}
    assert kinds == {"c_attn": "linear", "wte": "embedding"}
    c_attn = next(m for m in checkpoint.modules if m.name.endswith("c_attn"))
    assert (c_attn.in_features, c_attn.out_features) == (24, 72)
    check_against_peft(model, checkpoint)

    dora = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=4, target_modules=["query"], use_dora=True))
    randomise_lora(dora)
    dora.save_pretrained(tmp_path / "dora")
    checkpoint = rankscope.load(tmp_path / "dora")
    assert all(m.dora for m in checkpoint.modules)
    assert any("DoRA" in note for note in checkpoint.notes)
    for module in checkpoint.modules:  # importances and spectra are those of B A, as the note says
        entry = analyze_module(module)
        np.testing.assert_allclose(entry["importance"], per_rank_frobenius(module.A, module.B, 1.0), rtol=RTOL)
        delta = np.asarray(module.B, np.float64) @ np.asarray(module.A, np.float64)
        check_spectral_fields(entry, delta, "scale·B·A, the low-rank part only: DoRA")


def test_conv_lora_is_flattened(tmp_path):
    from peft import LoraConfig, get_peft_model

    class TinyConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, kernel_size=3)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    model = get_peft_model(TinyConvNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]))
    randomise_lora(model)
    model.save_pretrained(tmp_path)
    checkpoint = rankscope.load(tmp_path)
    (module,) = checkpoint.modules
    assert module.layer_type == "conv" and (module.out_features, module.in_features) == (6, 27)
    check_against_peft(model, checkpoint)


def test_adalora_uses_E_and_ranknum(tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, target_modules=["query", "value"], total_step=10)
    model = get_peft_model(tiny_bert(), config)
    randomise_lora(model)
    model.save_pretrained(tmp_path)
    checkpoint = rankscope.load(tmp_path)
    assert len(checkpoint.modules) == 4 and all(m.E is not None for m in checkpoint.modules)
    check_against_peft(model, checkpoint, coefficient_of=lambda layer: layer.lora_E["default"].detach().double().numpy().reshape(-1))


def test_beamlora_gates_stored_beside_A_multiply_the_importance(tmp_path):
    """The authors' format keeps w unfolded as lora_gate: importance is scale·w_i·‖b_i‖‖a_i‖."""
    rng = np.random.default_rng(0)
    A, B, gate = rng.normal(size=(4, 10)), rng.normal(size=(7, 4)), rng.normal(size=4)
    name = "base_model.model.layer.0.q_proj"
    save_numpy({f"{name}.lora_A.weight": A, f"{name}.lora_B.weight": B, f"{name}.lora_gate": gate}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_beamlora": True}))
    (module,) = rankscope.load(tmp_path).modules
    w = 4 * np.exp(gate / 0.05) / np.exp(gate / 0.05).sum()
    entry = analyze_module(module)
    np.testing.assert_allclose(entry["importance"], per_rank_frobenius(A, B, 2.0, w), rtol=RTOL)
    check_spectral_fields(entry, 2.0 * B @ np.diag(w) @ A, "scale·B·diag(w)·A")


def _random_pair(rng, r, n_in, n_out):
    return rng.normal(size=(r, n_in)).astype(np.float32), rng.normal(size=(n_out, r)).astype(np.float32)


def test_kohya_with_alpha_conv_and_text_encoder(tmp_path):
    rng = np.random.default_rng(1)
    tensors, expected, deltas = {}, {}, {}
    for name, (r, n_in, n_out, alpha) in {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (4, 16, 16, 2.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 12, 12, 0.0),  # alpha 0 means r: scale 1
    }.items():
        A, B = _random_pair(rng, r, n_in, n_out)
        tensors.update({f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B, f"{name}.alpha": np.array(alpha, np.float32)})
        expected[name] = per_rank_frobenius(A, B, alpha / r if alpha else 1.0)
        deltas[name] = (alpha / r if alpha else 1.0) * B.astype(np.float64) @ A
    conv = "lora_unet_conv_in"
    down, up = rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    tensors.update({f"{conv}.lora_down.weight": down, f"{conv}.lora_up.weight": up})  # no alpha: scale 1
    expected[conv] = per_rank_frobenius(down.reshape(4, -1), up.reshape(5, 4), 1.0)
    deltas[conv] = up.reshape(5, 4).astype(np.float64) @ down.reshape(4, -1)
    save_numpy(tensors, tmp_path / "my_lora.safetensors", metadata={"ss_network_dim": "4"})
    checkpoint = rankscope.load(tmp_path / "my_lora.safetensors")
    assert checkpoint.format == "kohya"
    assert {m.name for m in checkpoint.modules} == set(expected)
    for module in checkpoint.modules:
        entry = analyze_module(module)
        np.testing.assert_allclose(entry["importance"], expected[module.name], rtol=RTOL)
        check_spectral_fields(entry, deltas[module.name], "scale·B·A with A flattened" if module.name == conv else "scale·B·A")


def test_diffusers_peft_backend_and_legacy(tmp_path):
    rng = np.random.default_rng(2)
    A, B = _random_pair(rng, 4, 20, 24)
    A2, B2 = _random_pair(rng, 4, 8, 8)
    save_numpy({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": A,
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": B,
                "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": A2,
                "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": B2},
               tmp_path / "pytorch_lora_weights.safetensors")
    checkpoint = rankscope.load(tmp_path)
    assert checkpoint.format == "diffusers-peft" and len(checkpoint.modules) == 2
    entry = analyze_module(checkpoint.modules[1])
    np.testing.assert_allclose(entry["importance"], per_rank_frobenius(A, B, 1.0), rtol=RTOL)
    check_spectral_fields(entry, B.astype(np.float64) @ A)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_numpy({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": A2,
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": B2,
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": A,
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": B},
               legacy / "pytorch_lora_weights.safetensors")
    checkpoint = rankscope.load(legacy)
    assert checkpoint.format == "diffusers-legacy"
    by_name = {m.name: m for m in checkpoint.modules}
    module = by_name["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"]
    entry = analyze_module(module)
    np.testing.assert_allclose(entry["importance"], per_rank_frobenius(A, B, 1.0), rtol=RTOL)
    check_spectral_fields(entry, B.astype(np.float64) @ A)


def test_mlx_is_transposed_and_scaled_by_its_config(tmp_path):
    rng = np.random.default_rng(3)
    A, B = _random_pair(rng, 8, 30, 20)
    save_numpy({"model.layers.3.self_attn.q_proj.lora_a": np.ascontiguousarray(A.T),
                "model.layers.3.self_attn.q_proj.lora_b": np.ascontiguousarray(B.T)}, tmp_path / "adapters.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 20.0}}))
    (module,) = rankscope.load(tmp_path).modules
    assert (module.rank, module.in_features, module.out_features, module.scale) == (8, 30, 20, 20.0)
    np.testing.assert_allclose(analyze_module(module)["importance"], per_rank_frobenius(A, B, 20.0), rtol=RTOL)
    np.testing.assert_allclose(analyze_module(module)["spectrum"], full_spectrum(20.0 * B.astype(np.float64) @ A, 8), rtol=1e-9)
    check_spectral_fields(analyze_module(module), 20.0 * B.astype(np.float64) @ A)


def test_torchtune_adapter(tmp_path):
    rng = np.random.default_rng(4)
    tensors, expected = {}, {}
    for name in ("layers.0.attn.q_proj", "layers.0.mlp.w1", "layers.1.attn.v_proj"):
        A, B = _random_pair(rng, 8, 16, 24)
        tensors.update({f"{name}.lora_a.weight": torch.from_numpy(A).bfloat16(), f"{name}.lora_b.weight": torch.from_numpy(B).bfloat16()})
        A64, B64 = torch.from_numpy(A).bfloat16().double().numpy(), torch.from_numpy(B).bfloat16().double().numpy()
        expected[name] = (per_rank_frobenius(A64, B64, 16 / 8), 2.0 * B64 @ A64)
    torch.save(tensors, tmp_path / "adapter_model.pt")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "w1"], "peft_type": "LORA"}))
    checkpoint = rankscope.load(tmp_path)
    assert checkpoint.format == "torchtune" and len(checkpoint.modules) == 3
    for module in checkpoint.modules:
        assert module.stored_dtype == "BF16"
        entry = analyze_module(module)
        np.testing.assert_allclose(entry["importance"], expected[module.name][0], rtol=RTOL)
        check_spectral_fields(entry, expected[module.name][1])
    assert {m.kind for m in checkpoint.modules} == {"attn.q_proj", "mlp.w1", "attn.v_proj"}


def test_series_steps_come_from_trainer_state_then_names(tmp_path):
    rng = np.random.default_rng(5)
    for folder, state_step in (("checkpoint-20", 20), ("checkpoint-5", None), ("checkpoint-100", 100)):
        path = tmp_path / "run" / folder
        path.mkdir(parents=True)
        A, B = _random_pair(rng, 2, 6, 6)
        save_numpy({"base_model.model.l.0.q.lora_A.weight": A, "base_model.model.l.0.q.lora_B.weight": B}, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
        if state_step is not None:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": state_step}))
    series = rankscope.load(tmp_path / "run")
    assert isinstance(series, rankscope.Series) and series.layout == "hf-trainer"
    assert series.steps == [5, 20, 100]
    document = rankscope.analyze(tmp_path / "run")
    assert [s["step"] for s in document["snapshots"]] == [5, 20, 100]
    assert step_from_name("0000100_adapters.safetensors") == 100
    assert step_from_name("step-000500") == 500
    assert step_from_name("checkpoint-500") == 500
    assert step_from_name("adapters.safetensors") is None


def test_format_override(tmp_path):
    rng = np.random.default_rng(6)
    A, B = _random_pair(rng, 3, 5, 5)
    # Keys any tool could write; --format decides how they are read.
    save_numpy({"blocks.0.proj.lora_a": np.ascontiguousarray(A.T), "blocks.0.proj.lora_b": np.ascontiguousarray(B.T)}, tmp_path / "x.safetensors")
    checkpoint = rankscope.load(tmp_path / "x.safetensors", format="mlx")
    assert checkpoint.format == "mlx"
    with pytest.raises(rankscope.RankscopeError, match="no complete LoRA pair for format peft"):
        rankscope.load(tmp_path / "x.safetensors", format="peft")


def test_raw_state_dict_with_adapter_names(tmp_path):
    """``torch.save(model.state_dict())`` of a PEFT model keeps adapter names in its keys."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=3, lora_alpha=3, target_modules=["query"]))
    randomise_lora(model)
    save_torch({k: v.contiguous() for k, v in model.state_dict().items() if "lora_" in k}, tmp_path / "raw.safetensors")
    checkpoint = rankscope.load(tmp_path / "raw.safetensors")
    assert sorted(m.name for m in checkpoint.modules) == sorted(peft_layers(model))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["query"]))
    save_torch({k: v.contiguous() for k, v in model.state_dict().items() if "lora_" in k}, tmp_path / "two.safetensors")
    names = {m.name for m in rankscope.load(tmp_path / "two.safetensors").modules}
    assert len(names) == 4 and {n.rsplit("[", 1)[-1] for n in names} == {"default]", "second]"}


def test_header_length_whose_first_byte_looks_like_a_pickle_opcode(tmp_path):
    """A real safetensors header of 0x..80 bytes starts with byte 0x80, the pickle protocol opcode:
    it must still be read as safetensors (SmolLM2 adapters hit this)."""
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q"]}))
    path = folder / "adapter_model.safetensors"
    for pad in range(512):
        save_numpy({"base_model.model.q.lora_A.weight": A, "base_model.model.q.lora_B.weight": B}, path,
                   metadata={"format": "pt", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    module = rankscope.load(folder).modules[0]
    np.testing.assert_array_equal(module.A, A)
    expected = 2.0 * np.linalg.norm(B.astype(np.float64), axis=0) * np.linalg.norm(A.astype(np.float64), axis=1)
    np.testing.assert_allclose(analyze_module(module)["importance"], expected, rtol=1e-12)
