"""Issue #19 (2, 5, 6): scales from wherever a format keeps them, and the key families of image models.

Files come from the real tools where they run in seconds (diffusers' own writers on a tiny UNet), from
the real fixtures in ../shared/fixtures/real (read in place), and otherwise from small synthetic files
whose key names copy the tools' (kohya sd-scripts Flux / SD3 / SDXL, ComfyUI / ai-toolkit
``diffusion_model.``, diffusers Flux ``transformer.``; see diffusers' loaders/lora_conversion_utils.py).
Every number is checked against a dense float64 computation from the raw tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import run_cli
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import rankscope
from rankscope.adapters.resize import resize
from rankscope.errors import RankscopeError


def _pair(rng: np.random.Generator, r: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(r, n_in)).astype(np.float32), rng.normal(size=(n_out, r)).astype(np.float32)


def _truncated(delta: np.ndarray, k: int) -> np.ndarray:
    """The best rank-k approximation of a dense float64 update (Eckart–Young), the slow obvious way."""
    U, s, Vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return (U[:, :k] * s[:k]) @ Vt[:k]


def get_pattern_key(patterns: dict, name: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key), written out: the first key matching '(.*\\.)?(key)$'."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _peft_scale(config: dict, name: str, rank: int) -> float:
    """PEFT's own rule for a module's scale (not rankscope's matcher)."""
    r = config.get("rank_pattern", {}).get(get_pattern_key(config.get("rank_pattern", {}), name), config["r"])
    assert r == rank, (name, r, rank)
    alphas = config.get("alpha_pattern", {})
    return alphas.get(get_pattern_key(alphas, name), config["lora_alpha"]) / r


# ----------------------------------------------------------------------------- lora_adapter_metadata


def test_resized_diffusers_metadata_file_describes_itself(real_fixtures, tmp_path):
    source = real_fixtures / "diffusers-peft-metadata-sd15" / "pytorch_lora_weights.safetensors"
    raw = load_file(source)
    result = resize(source.parent, tmp_path / "out", energy=0.9)
    out = tmp_path / "out" / source.name
    with safe_open(out, "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    resized = rankscope.load(out)
    assert resized.format == "diffusers-peft" and len(resized.modules) == 96
    ranks = {row.name: row.rank_after for row in result.modules}
    assert len(set(ranks.values())) > 1  # per-module ranks: the metadata needs rank_pattern to describe them
    for module in resized.modules:
        assert module.rank == ranks[module.name] and module.scale == 4.0
        assert module.scale_source.startswith("lora_adapter_metadata")
        assert _peft_scale(meta, module.name, module.rank) == 4.0  # what PEFT (and so diffusers) will apply
    # dense float64 SVDs of 1280×1280 updates take a second each here: check a few modules of each width
    for module in [m for m in resized.modules if m.name.startswith("down_blocks.0.")][:3] + [resized.modules[-1]]:
        original = 4.0 * raw[f"{module.name}.lora_B.weight"].astype(np.float64) @ raw[f"{module.name}.lora_A.weight"]
        np.testing.assert_allclose(module.scale * module.B.astype(np.float64) @ module.A,
                                   _truncated(original, module.rank), atol=1e-5 * np.abs(original).max())


def _metadata_file(path: Path, tensors: dict, metadata: dict) -> Path:
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def test_metadata_per_component_with_patterns(tmp_path):
    rng = np.random.default_rng(0)
    tensors, pairs = {}, {}
    for name in ("unet.mid.to_q", "unet.mid.to_k", "text_encoder.layers.0.q_proj", "text_encoder_2.layers.0.q_proj"):
        A, B = _pair(rng, 4 if "to_k" not in name else 2, 6, 5)
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = A, B
        pairs[name] = (A, B)
    nested = {"unet": {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_k": 6}},
              "text_encoder": {"r": 4, "lora_alpha": 2},
              "text_encoder_2": {"r": 4, "lora_alpha": 4, "use_rslora": True}}
    packed = {f"{c}.{k}": v for c, config in nested.items() for k, v in config.items()}  # save_lora_weights' layout
    expected = {"unet.mid.to_q": (2.0, "lora_adapter_metadata"), "unet.mid.to_k": (3.0, "lora_adapter_metadata alpha_pattern"),
                "text_encoder.layers.0.q_proj": (0.5, "lora_adapter_metadata"),
                "text_encoder_2.layers.0.q_proj": (2.0, "lora_adapter_metadata")}  # rsLoRA: 4 / sqrt(4)
    for layout, metadata in (("nested", nested), ("packed", packed)):
        checkpoint = rankscope.load(_metadata_file(tmp_path / f"{layout}.safetensors", tensors, metadata))
        assert checkpoint.format == "diffusers-peft"
        assert {m.name: (m.scale, m.scale_source) for m in checkpoint.modules} == expected, layout
        # resize keeps each scale at the new rank, in the layout it found
        result = resize(checkpoint.path, tmp_path / f"{layout}-out", rank=1)
        out = rankscope.load(tmp_path / f"{layout}-out" / checkpoint.path.name)
        assert {m.name: m.scale for m in out.modules} == {k: v[0] for k, v in expected.items()}
        assert {m.rank for m in out.modules} == {1} and result.format == "diffusers-peft"
        with safe_open(out.path, "np") as f:
            written = json.loads(f.metadata()["lora_adapter_metadata"])
        assert ("unet" in written) == (layout == "nested") and ("unet.r" in written) == (layout == "packed")
        for name, (A, B) in pairs.items():
            module = out[name]
            np.testing.assert_allclose(module.scale * module.B.astype(np.float64) @ module.A,
                                       _truncated(expected[name][0] * B.astype(np.float64) @ A, 1), rtol=1e-4, atol=1e-5)


def test_diffusers_writes_metadata_we_read_and_loads_our_resize(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    def tiny_unet() -> UNet2DConditionModel:
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4)

    unet = tiny_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    unet.add_adapter(config)
    # the pipelines' writer (packed "unet.r" metadata, "unet." keys) and the model's own (flat, no prefix)
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path / "pipe", unet_lora_layers=get_peft_model_state_dict(unet),
                                                     unet_lora_adapter_metadata=config.to_dict())
    unet.save_lora_adapter(tmp_path / "model")
    deltas = {name: layer.get_delta_weight("default").detach().double().numpy()
              for name, layer in unet.named_modules() if isinstance(layer, LoraLayer)}
    for folder, prefix in (("pipe", "unet."), ("model", "")):
        checkpoint = rankscope.load(tmp_path / folder)
        assert checkpoint.format == "diffusers-peft" and len(checkpoint.modules) == len(deltas) == 24
        for module in checkpoint.modules:
            assert (module.scale, module.scale_source) == (2.0, "lora_adapter_metadata")
            np.testing.assert_allclose(module.scale * module.B.astype(np.float64) @ module.A,
                                       deltas[module.name.removeprefix(prefix)], rtol=1e-5, atol=1e-6)
    result = resize(tmp_path / "pipe", tmp_path / "resized", rank=2)
    assert {row.rank_after for row in result.modules} == {2}
    # diffusers' own loader reads our metadata (r, lora_alpha, patterns) and applies the truncated updates
    again = tiny_unet()
    again.load_lora_adapter(str(tmp_path / "resized"), weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                            adapter_name="x")
    loaded = {name: layer for name, layer in again.named_modules() if isinstance(layer, LoraLayer)}
    assert set(loaded) == set(deltas)
    for name, layer in loaded.items():
        assert layer.r["x"] == 2 and layer.scaling["x"] == 2.0
        np.testing.assert_allclose(layer.get_delta_weight("x").detach().double().numpy(), _truncated(deltas[name], 2),
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- image-model key families

D = 6  # hidden size of the synthetic Flux / SD3 blocks


def _family_file(path: Path, modules: dict[str, tuple[int, int, int]], down: str, up: str, alpha: float | None,
                 metadata: dict[str, str] | None = None, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A file with the given key names: {module: (r, in, out)} -> tensors `<module><down>`, `<module><up>` (+ alpha)."""
    rng = np.random.default_rng(seed)
    tensors, pairs = {}, {}
    for name, (r, n_in, n_out) in modules.items():
        A, B = _pair(rng, r, n_in, n_out)
        tensors[name + down], tensors[name + up] = A, B
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
        pairs[name] = (A, B)
    save_file(tensors, path, metadata=metadata)
    return pairs


@pytest.mark.parametrize("family,modules,down,up,alpha,metadata,fmt,scale,source", [
    # kohya sd-scripts Flux: fused qkv of the double blocks (out = 3·D, one module), single blocks' linear1
    ("kohya-flux", {"lora_unet_double_blocks_0_img_attn_qkv": (4, D, 3 * D), "lora_unet_single_blocks_0_linear1": (4, D, 7 * D),
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (4, D, D)},
     ".lora_down.weight", ".lora_up.weight", 2.0, None, "kohya", 0.5, "alpha tensor"),
    # kohya SD3 (joint blocks) with the network's alpha only in the metadata
    ("kohya-sd3", {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4, D, 3 * D),
                   "lora_unet_joint_blocks_0_context_block_attn_proj": (4, D, D)},
     ".lora_down.weight", ".lora_up.weight", None, {"ss_network_dim": "4", "ss_network_alpha": "8"}, "kohya", 2.0,
     "ss_network_alpha"),
    # kohya SDXL: two text encoders, lora_te1_ and lora_te2_
    ("kohya-sdxl", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (2, D, 4 * D),
                    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (2, D, D),
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (2, D, D)},
     ".lora_down.weight", ".lora_up.weight", 1.0, None, "kohya", 0.5, "alpha tensor"),
    # ComfyUI / ai-toolkit: diffusion_model. paths, kohya part names, fused qkv
    ("comfyui-down", {"diffusion_model.double_blocks.0.img_attn.qkv": (4, D, 3 * D),
                      "diffusion_model.single_blocks.0.linear1": (4, D, 7 * D)},
     ".lora_down.weight", ".lora_up.weight", 8.0, None, "comfyui", 2.0, "alpha tensor"),
    # ai-toolkit: diffusion_model. paths with PEFT part names and no alpha
    ("comfyui-peft", {"diffusion_model.double_blocks.0.img_attn.qkv": (4, D, 3 * D),
                      "diffusion_model.double_blocks.0.txt_mlp.0": (4, D, 4 * D)},
     ".lora_A.weight", ".lora_B.weight", None, None, "comfyui", 1.0, "assumed 1: no alpha stored"),
    # diffusers Flux: transformer. prefix, the pipelines' packed metadata
    ("diffusers-flux", {"transformer.transformer_blocks.0.attn.to_q": (4, D, D),
                        "transformer.single_transformer_blocks.0.proj_mlp": (4, D, 4 * D)},
     ".lora_A.weight", ".lora_B.weight", None,
     {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 12})}, "diffusers-peft", 3.0,
     "lora_adapter_metadata"),
])
def test_image_model_key_families(tmp_path, family, modules, down, up, alpha, metadata, fmt, scale, source):
    path = tmp_path / f"{family}.safetensors"
    pairs = _family_file(path, modules, down, up, alpha, metadata)
    checkpoint = rankscope.load(path)
    assert checkpoint.format == fmt and not checkpoint.skipped
    assert {m.name for m in checkpoint.modules} == set(modules)
    for module in checkpoint.modules:
        A, B = pairs[module.name]
        assert (module.rank, module.in_features, module.out_features) == modules[module.name]  # fused qkv: one module
        assert (module.scale, module.scale_source) == (scale, source)
        np.testing.assert_allclose(module.scale * module.B.astype(np.float64) @ module.A, scale * B.astype(np.float64) @ A)
    # resize writes what a loader needs for the same scale at the new rank (alpha tensors, ss_network_* metadata)
    resize(path, tmp_path / "out", rank=1)
    out = rankscope.load(tmp_path / "out" / path.name)
    assert out.format == fmt and {m.rank for m in out.modules} == {1}
    assert {m.scale for m in out.modules} == {scale}
    for module in out.modules:
        A, B = pairs[module.name]
        np.testing.assert_allclose(module.scale * module.B.astype(np.float64) @ module.A,
                                   _truncated(scale * B.astype(np.float64) @ A, 1), rtol=1e-4, atol=1e-5)
    if fmt == "kohya" and metadata:
        with safe_open(tmp_path / "out" / path.name, "np") as f:
            assert f.metadata()["ss_network_dim"] == "1" and float(f.metadata()["ss_network_alpha"]) == 2.0


def test_enable_lora_resize_keeps_one_r(real_fixtures, tmp_path):
    source = rankscope.load(real_fixtures / "peft-bloom-enable-lora")
    result = resize(real_fixtures / "peft-bloom-enable-lora", tmp_path / "out", energy=0.9)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    K = config["r"]
    assert config["enable_lora"] == [True, False, True] and config["lora_alpha"] == 2.0 * K
    assert {row.rank_after for row in result.modules} == {K} and K < 8
    import torch

    state = torch.load(tmp_path / "out" / "adapter_model.bin", map_location="cpu", weights_only=True)
    name = "base_model.model.transformer.h.3.self_attention.query_key_value"
    assert tuple(state[f"{name}.lora_A.weight"].shape) == (2 * K, 1024)
    assert tuple(state[f"{name}.lora_B.weight"].shape) == (2048, K, 1)  # still PEFT 0.2's grouped conv
    out = rankscope.load(tmp_path / "out")
    for label, rows in (("q", slice(0, 1024)), ("v", slice(2048, 3072))):  # the thirds PEFT's zero_pad fills
        before, after = source[f"{name}[{label}]"], out[f"{name}[{label}]"]
        assert not before.B[np.r_[0:rows.start, rows.stop:3072]].any() and not after.B[np.r_[0:rows.start, rows.stop:3072]].any()
        original = before.scale * before.B[rows].astype(np.float64) @ before.A
        k = next(r for r in result.modules if r.name == before.name)
        assert after.scale == 2.0 and k.rank_after == K
        # its own energy rank may be below K: the extra slots are zero, the update its truncated SVD
        energy = np.cumsum(np.linalg.svd(original, compute_uv=False) ** 2)
        own = int(np.searchsorted(energy / energy[-1], 0.9 - 1e-12) + 1)
        np.testing.assert_allclose(after.scale * after.B[rows].astype(np.float64) @ after.A, _truncated(original, own),
                                   atol=1e-5 * np.abs(original).max())


# ----------------------------------------------------------------------------- analyze names format and scale source


def test_analyze_names_format_and_scale_source(real_fixtures, tmp_path):
    folder = real_fixtures / "diffusers-peft-metadata-sd15"
    done = run_cli("analyze", folder, "--json", tmp_path / "a.json")
    assert done.returncode == 0, done.stderr
    assert "(diffusers-peft)" in done.stdout and "scale 4 (lora_adapter_metadata)" in done.stdout
    snapshot = json.loads((tmp_path / "a.json").read_text())["snapshots"][-1]
    assert snapshot["format"] == "diffusers-peft" and snapshot["summary"]["scale_sources"] == ["lora_adapter_metadata"]
    assert {m["scale_source"] for m in snapshot["modules"]} == {"lora_adapter_metadata"}


# ----------------------------------------------------------------------------- bad input


def _copy(real_fixtures: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(real_fixtures / name, tmp_path / name))


def _resave(path: Path, metadata: dict[str, str] | None, drop: str | None = None) -> None:
    tensors = {k: v for k, v in load_file(path).items() if k != drop}
    save_file(tensors, path, metadata=metadata)


@pytest.mark.parametrize("case,expected", [
    ("metadata-not-json", "lora_adapter_metadata.*not valid JSON|lora_adapter_metadata.*JSON"),
    ("alpha-not-a-number", "lora_alpha"),
    ("w_a-alone", "w_a_005 has no w_b_005"),
    ("enable-lora-groups", "do not match enable_lora"),
])
def test_bad_family_input_is_one_error_line(real_fixtures, tmp_path, case, expected):
    if case.startswith(("metadata", "alpha")):
        folder = _copy(real_fixtures, "diffusers-peft-metadata-sd15", tmp_path)
        raw = "{'r': 4" if case == "metadata-not-json" else json.dumps({"r": 4, "lora_alpha": "sixteen"})
        _resave(folder / "pytorch_lora_weights.safetensors", {"lora_adapter_metadata": raw})
    elif case == "w_a-alone":
        folder = _copy(real_fixtures, "lora-vit-sam", tmp_path)
        _resave(folder / "lora_rank4.safetensors", None, drop="w_b_005")
    else:
        folder = _copy(real_fixtures, "peft-bloom-enable-lora", tmp_path)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | {"enable_lora": [True, True, True]}))
    with pytest.raises(RankscopeError, match=expected) as error:
        rankscope.load(folder)
    assert "\n" not in str(error.value)
    with pytest.raises(RankscopeError, match=expected):
        resize(folder, tmp_path / "out", rank=1)
    assert not (tmp_path / "out").exists()
    if case == "metadata-not-json":  # the CLI's one line and exit status (a safetensors file: no torch to start)
        done = run_cli("resize", folder, "--out", tmp_path / "out", "--rank", "1")
        assert done.returncode == 2 and done.stderr.startswith("Error: ") and done.stderr.count("\n") == 1, done.stderr
        assert not (tmp_path / "out").exists() and not done.stdout


def test_unplaced_file_lists_its_keys(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"w_c_000": np.zeros((2, 3), np.float32), "unet|1|down": np.zeros((1, 3), np.float32)}, path)
    done = run_cli("analyze", path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unet|1|down" in done.stderr and "w_c_000" in done.stderr and "w_a_NNN" in done.stderr


# ----------------------------------------------------------------------------- older layouts: resize writes them back


def test_lora_diffusion_resize_rewrites_its_rank_metadata(tmp_path):
    # cloneofsimo's save_safeloras_with_embeds layout (lora_diffusion/lora.py): `<name>:<i>:up` / `:down`, metadata
    # `<name>:<i>:rank`, the target modules as JSON under `<name>`, and each token embedding flagged "<embed>"
    rng = np.random.default_rng(1)
    A0, B0 = _pair(rng, 4, 6, 5)
    A1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)  # LoraInjectedConv2d: down is a conv kernel, up 1×1
    B1 = rng.normal(size=(7, 4, 1, 1)).astype(np.float32)
    path = tmp_path / "lora.safetensors"
    save_file({"unet:0:down": A0, "unet:0:up": B0, "unet:1:down": A1, "unet:1:up": B1, "<s1>": np.ones(6, np.float32)},
              path, metadata={"unet:0:rank": "4", "unet:1:rank": "4", "unet": '["CrossAttention"]', "<s1>": "<embed>"})
    checkpoint = rankscope.load(path)
    assert checkpoint.format == "lora-diffusion" and checkpoint.skipped == ["<s1>"]
    assert {(m.name, m.rank, m.in_features, m.out_features) for m in checkpoint.modules} == {("unet:0", 4, 6, 5),
                                                                                              ("unet:1", 4, 27, 7)}
    resize(path, tmp_path / "out", rank=2)
    with safe_open(tmp_path / "out" / path.name, "np") as f:
        assert f.metadata()["unet:0:rank"] == "2" and f.metadata()["unet:1:rank"] == "2"
        assert f.get_tensor("unet:1:down").shape == (2, 3, 3, 3) and f.get_tensor("unet:1:up").shape == (7, 2, 1, 1)
    out = rankscope.load(tmp_path / "out")
    for name, (A, B) in {"unet:0": (A0, B0), "unet:1": (A1.reshape(4, -1), B1.reshape(7, 4))}.items():
        np.testing.assert_allclose(out[name].B.astype(np.float64) @ out[name].A, _truncated(B.astype(np.float64) @ A, 2),
                                   rtol=1e-4, atol=1e-5)
    # a rank in the metadata that is not its tensor's is refused, not guessed around
    save_file({"unet:0:down": A0, "unet:0:up": B0}, tmp_path / "bad.safetensors", metadata={"unet:0:rank": "3"})
    with pytest.raises(RankscopeError, match="metadata unet:0:rank"):
        rankscope.load(tmp_path / "bad.safetensors")


def test_lora_vit_resize_keeps_its_index_names(real_fixtures, tmp_path):
    path = real_fixtures / "lora-vit-sam" / "lora_rank4.safetensors"
    raw = load_file(path)
    resize(path, tmp_path / "out", rank=2)
    written = load_file(tmp_path / "out" / path.name)
    assert sorted(written) == sorted(raw) and written["w_a_011"].shape == (2, 768) and written["w_b_011"].shape == (768, 2)
    original = raw["w_b_011"].astype(np.float64) @ raw["w_a_011"]
    np.testing.assert_allclose(written["w_b_011"].astype(np.float64) @ written["w_a_011"], _truncated(original, 2),
                               atol=1e-5 * np.abs(original).max())


def test_forced_family_without_its_pairs_lists_the_keys(tmp_path):
    path = tmp_path / "peft.safetensors"
    save_file({"q.lora_A.weight": np.zeros((2, 3), np.float32), "q.lora_B.weight": np.zeros((3, 2), np.float32)}, path)
    for fmt in ("lora-vit", "lora-diffusion", "comfyui"):
        if fmt == "comfyui":  # comfyui also reads PEFT part names: a lone A has no pair
            save_file({"diffusion_model.x.lora_A.weight": np.zeros((2, 3), np.float32)}, path)
        with pytest.raises(RankscopeError, match=r"holds \d+ tensors \(.*lora_A\.weight.*\) but no") as error:
            rankscope.load(path, format=fmt)
        assert "\n" not in str(error.value)


def test_suggest_speaks_each_family(real_fixtures):
    from rankscope.maths.suggest import suggest
    from rankscope.views.text import suggest_lines

    result = suggest(real_fixtures / "peft-bloom-enable-lora", energy=0.9)
    r = max(row["suggested"] for row in result["modules"])
    assert f"  PEFT 0.2       r={r}, lora_alpha={2 * r}" in suggest_lines(result)[-1]  # one r: PEFT 0.2 has no patterns
    result = suggest(real_fixtures / "lora-vit-sam", energy=0.9)
    assert suggest_lines(result)[-1].startswith("  ranks          w_000: ")


def test_kohya_flux_as_diffusers_own_converter_reads_it(tmp_path):
    """diffusers' _convert_kohya_flux_lora_to_diffusers (the code behind its load_lora_weights for kohya Flux files)
    splits the fused qkv into to_q / to_k / to_v and folds alpha / r into the factors: our one fused module's update
    must be theirs stacked, and the converted file (diffusers Flux keys) must read back as the same updates."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    modules = {"lora_unet_double_blocks_0_img_attn_qkv": 3 * D, "lora_unet_double_blocks_0_img_attn_proj": D,
               "lora_unet_double_blocks_0_txt_mlp_0": 4 * D}
    _family_file(tmp_path / "flux.safetensors", {n: (4, D, out) for n, out in modules.items()},
                 ".lora_down.weight", ".lora_up.weight", alpha=2.0)
    ours = rankscope.load(tmp_path / "flux.safetensors")
    assert ours.format == "kohya" and len(ours.modules) == 3
    state = {k: torch.from_numpy(v) for k, v in load_file(tmp_path / "flux.safetensors").items()}
    converted = {k: v.numpy() for k, v in _convert_kohya_flux_lora_to_diffusers(state).items()}

    def theirs(name: str) -> np.ndarray:
        return converted[f"transformer.transformer_blocks.0.{name}.lora_B.weight"].astype(np.float64) @ \
            converted[f"transformer.transformer_blocks.0.{name}.lora_A.weight"]

    def delta(module) -> np.ndarray:
        return module.scale * module.B.astype(np.float64) @ module.A

    qkv = np.vstack([theirs(f"attn.to_{p}") for p in "qkv"])
    np.testing.assert_allclose(delta(ours["lora_unet_double_blocks_0_img_attn_qkv"]), qkv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta(ours["lora_unet_double_blocks_0_img_attn_proj"]), theirs("attn.to_out.0"), rtol=1e-5)
    np.testing.assert_allclose(delta(ours["lora_unet_double_blocks_0_txt_mlp_0"]), theirs("ff_context.net.0.proj"),
                               rtol=1e-5)
    save_file(converted, tmp_path / "diffusers.safetensors")
    back = rankscope.load(tmp_path / "diffusers.safetensors")
    assert back.format == "diffusers-peft" and {m.scale for m in back.modules} == {1.0}  # alpha folded in by diffusers
    np.testing.assert_allclose(delta(back["transformer.transformer_blocks.0.attn.to_k"]), qkv[D:2 * D], rtol=1e-5)
