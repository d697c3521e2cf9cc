"""LoHa, LoKr (PEFT's own and LyCORIS's) and LoCon with a Tucker core: spectra and resize against float64 dense SVDs.

Adapters are made by the real tools (PEFT's LoHaConfig / LoKrConfig layers, LyCORIS's create_lycoris), their
weights randomised (they start with one factor at zero), and ΔW is built the slow obvious way: PEFT's
``get_delta_weight`` in float64, or, for LyCORIS, the layer's own forward pass on one-hot inputs (what the layer
really applies) minus the base layer's.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers.cli import run_cli
from safetensors.numpy import load_file, save_file

from rankscope import analyze
from rankscope.adapters.resize import resize
from rankscope.errors import RankscopeError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(32, 24)
        self.v_proj = nn.Linear(24, 24)
        self.conv = nn.Conv2d(16, 32, 3)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def _randomise(parameters, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))


def _peft_adapter(tmp_path, kind: str):
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    targets = ["q_proj", "v_proj", "conv"]
    if kind == "loha":  # the conv with its Tucker cores (use_effective_conv2d); v_proj with its own rank and alpha
        config = LoHaConfig(r=3, alpha=5, target_modules=targets, use_effective_conv2d=True,
                            rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 7})
    else:  # q_proj: both halves factored (decompose_both); v_proj: w2 full (r ≥ half its size); conv: a 4-D w2
        config = LoKrConfig(r=2, alpha=3, target_modules=targets, decompose_both=True, decompose_factor=4,
                            rank_pattern={"v_proj": 4}, use_effective_conv2d=True)  # conv: a Tucker w2 (lokr_t2)
    model = get_peft_model(Tiny(), config)
    _randomise([p for n, p in model.named_parameters() if ("hada_" in n or "lokr_" in n)], seed=1)
    model.save_pretrained(tmp_path / kind)
    model = model.double()
    deltas = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "get_delta_weight") and name.endswith(tuple(targets)):
            delta = layer.get_delta_weight("default").detach().numpy()
            deltas[name] = delta.reshape(delta.shape[0], -1)
    return tmp_path / kind, deltas


def _svd(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(np.asarray(delta, dtype=np.float64))


def _check_spectra(document: dict, deltas: dict[str, np.ndarray]) -> None:
    modules = {m["name"]: m for m in document["snapshots"][-1]["modules"]}
    assert set(modules) == set(deltas)
    for name, delta in deltas.items():
        m = modules[name]
        dense = _svd(delta)[1]
        ours = np.asarray(m["spectrum"])
        assert ours.size == m["rank"] <= min(delta.shape)
        assert dense[ours.size:].max(initial=0) <= 1e-9 * dense[0]  # the rank bound holds: nothing left out
        # PEFT's get_delta_weight multiplies by torch.tensor(alpha / r), a float32 scale: 1e-7, not 1e-12
        np.testing.assert_allclose(ours, dense[: ours.size], rtol=1e-7, atol=1e-9 * dense[0])
        assert m["importance"] is None and m["top10_share"] is None and "undefined for" in m["per_rank_undefined"]
        assert "error" not in m


def _truncation(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = _svd(delta)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_spectra_and_resize_match_a_dense_svd_and_peft_loads_the_lora(tmp_path, kind):
    from peft import PeftModel

    folder, deltas = _peft_adapter(tmp_path, kind)
    core = "hada_t1" if kind == "loha" else "lokr_t2"  # the conv's Tucker core is there, and folded
    assert any(key.endswith(core) for key in load_file(folder / "adapter_model.safetensors"))
    document = analyze(folder, progress=False)
    assert document["format"] == f"peft-{kind}"
    _check_spectra(document, deltas)
    summary = document["snapshots"][-1]["summary"]
    assert summary["per_rank_undefined"] == 3 and summary["spectral_modules"] == 3

    k = 2
    result = resize(folder, tmp_path / "out", rank=k)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == k and sorted(config["target_modules"]) == [
        "conv", "q_proj", "v_proj"]
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not any("hada" in key or "lokr" in key for key in tensors)
    for row in result.modules:
        delta = deltas[row.name]
        A = tensors[f"{row.name}.lora_A.weight"].astype(np.float64)
        B = tensors[f"{row.name}.lora_B.weight"].astype(np.float64)
        bare = row.name.removeprefix("base_model.model.")
        alpha = config["alpha_pattern"].get(bare, config["lora_alpha"])
        r = config["rank_pattern"].get(bare, config["r"])
        ours = alpha / r * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1))
        best = _truncation(delta, k)
        assert np.abs(ours - best).max() <= 1e-5 * np.abs(delta).max()  # float32 storage of the factors
        s = _svd(delta)[1]
        assert row.error == pytest.approx(math.sqrt((s[k:] ** 2).sum() / (s ** 2).sum()), rel=1e-9)

    lora = PeftModel.from_pretrained(Tiny(), tmp_path / "out").double()  # PEFT's own loader accepts the shapes
    for name, layer in lora.named_modules():
        if name in deltas:
            applied = layer.get_delta_weight("default").detach().numpy()
            applied = applied.reshape(applied.shape[0], -1)
            assert np.abs(applied - _truncation(deltas[name], k)).max() <= 1e-5 * np.abs(deltas[name]).max()


def _one_hot_delta(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """ΔW of a patched layer from its forward pass: one-hot inputs through it, minus the base layer (float64)."""
    if weight.ndim == 2:
        x = torch.eye(weight.shape[1], dtype=torch.float64)
        out = layer(x) - F.linear(x, weight, bias)
        return out.T.detach().numpy()
    n = int(np.prod(weight.shape[1:]))
    x = torch.eye(n, dtype=torch.float64).reshape(n, *weight.shape[1:])  # a kh×kw input: one output pixel
    out = layer(x) - F.conv2d(x, weight, bias)
    return out.reshape(n, -1).T.detach().numpy()


def _lycoris_adapter(tmp_path, algo: str, **kwargs):
    from lycoris import LycorisNetwork, create_lycoris

    saved = {name: getattr(LycorisNetwork, name) for name in ("TARGET_REPLACE_NAME", "TARGET_REPLACE_MODULE")}
    try:
        LycorisNetwork.apply_preset({"target_name": ["q_proj", "v_proj", "conv"]})
        model = Tiny().double()
        base = {name: (m.weight.detach().clone(), m.bias.detach().clone()) for name, m in model.named_children()}
        network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=3.0, conv_dim=2, conv_alpha=1.0, algo=algo,
                                 **kwargs)
        network.apply_to()
        network = network.double()
        _randomise([p for p in network.parameters()], seed=2)
        path = tmp_path / f"{algo}.safetensors"
        network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya",
                                                        "ss_network_args": json.dumps({"algo": algo})})
        with torch.no_grad():
            for lora in network.loras:  # the float32 weights that were saved, in float64
                for p in lora.parameters():
                    p.copy_(p.float().double())
            deltas = {f"lycoris_{name}": _one_hot_delta(getattr(model, name), *base[name]) for name in base}
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
    return path, deltas


@pytest.mark.parametrize("algo, kwargs, fmt", [
    ("loha", {"use_tucker": True}, "lycoris"),
    ("lokr", {"factor": 4, "decompose_both": True, "use_tucker": True}, "lycoris"),
    ("locon", {"use_tucker": True}, "kohya"),
])
def test_lycoris_files_read_and_resize_to_kohya_lora(tmp_path, algo, kwargs, fmt):
    path, deltas = _lycoris_adapter(tmp_path, algo, **kwargs)
    core = {"loha": "hada_t1", "lokr": "lokr_t2", "locon": "lora_mid.weight"}[algo]
    assert any(key.endswith(core) for key in load_file(path))  # the conv's Tucker core
    document = analyze(path, progress=False)
    assert document["format"] == fmt
    modules = {m["name"]: m for m in document["snapshots"][-1]["modules"]}
    if algo == "locon":  # plain LoRA after folding the core: both views, the core named in a note
        assert any("lora_mid" in note for note in document["snapshots"][-1]["notes"])
        assert all(m["importance"] is not None for m in modules.values())
        for name, delta in deltas.items():
            dense = _svd(delta)[1]
            np.testing.assert_allclose(modules[name]["spectrum"], dense[: modules[name]["rank"]], rtol=1e-6,
                                       atol=1e-7 * dense[0])
    else:
        _check_spectra(document, deltas)

    k = 1
    resize(path, tmp_path / "out", rank=k)
    tensors = load_file(tmp_path / "out" / path.name)
    assert not any("hada" in key or "lokr" in key or "lora_mid" in key for key in tensors)
    for name, delta in deltas.items():
        down = tensors[f"{name}.lora_down.weight"].astype(np.float64)
        up = tensors[f"{name}.lora_up.weight"].astype(np.float64)
        if name.endswith("conv"):  # the kernel is known (a Tucker core): kohya's conv layout
            assert down.shape == (k, 16, 3, 3) and up.shape == (32, k, 1, 1)
        scale = float(tensors[f"{name}.alpha"]) / k
        ours = scale * up.reshape(up.shape[0], -1) @ down.reshape(k, -1)
        assert np.abs(ours - _truncation(delta, k)).max() <= 1e-5 * np.abs(delta).max()
    resized = analyze(tmp_path / "out" / path.name, progress=False)
    assert resized["format"] == "kohya"  # read back as a plain kohya LoRA
    if algo != "locon":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "out" / path.name), "np") as f:
            metadata = f.metadata()
        assert metadata["ss_network_module"] == "networks.lora" and json.loads(metadata["ss_network_args"]) == {}


def _write(path, tensors, alpha=True):
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    if alpha:
        names = {k.rsplit(".", 1)[0] for k in tensors}
        tensors.update({f"{n}.alpha": np.array(1.0, dtype=np.float32) for n in names})
    save_file(tensors, path)
    return path


BAD = {
    "lokr-3d-factor": ({"lora_unet_a.lokr_w1": np.ones((2, 3, 4)), "lora_unet_a.lokr_w2": np.ones((4, 4))},
                       "lokr_w1 as a matrix"),
    "lokr-ranks": ({"lora_unet_a.lokr_w1_a": np.ones((2, 2)), "lora_unet_a.lokr_w1_b": np.ones((3, 4)),
                    "lora_unet_a.lokr_w2": np.ones((4, 4))}, "with the same r"),
    "loha-ranks": ({"lora_unet_a.hada_w1_a": np.ones((8, 2)), "lora_unet_a.hada_w1_b": np.ones((2, 6)),
                    "lora_unet_a.hada_w2_a": np.ones((8, 3)), "lora_unet_a.hada_w2_b": np.ones((3, 6))}, "the same r"),
    "loha-missing": ({"lora_unet_a.hada_w1_a": np.ones((8, 2)), "lora_unet_a.hada_w1_b": np.ones((2, 6)),
                      "lora_unet_a.hada_w2_a": np.ones((8, 2))}, "has no hada_w2_b"),
    "lokr-missing": ({"lora_unet_a.lokr_w1": np.ones((2, 2))}, "has no lokr_w2"),
}


@pytest.mark.parametrize("case", ["lokr-3d-factor", "loha-ranks", "loha-missing"])
def test_bad_structured_input_is_one_error_line(tmp_path, case):
    tensors, expected = BAD[case]
    path = _write(tmp_path / "bad.safetensors", tensors)
    command = ["resize", path, "--rank", "1", "--out", tmp_path / "never"] if case == "loha-ranks" else ["analyze", path]
    result = run_cli(*command)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "never").exists()


def test_every_bad_structured_input_is_refused_by_the_reader(tmp_path):
    for case, (tensors, expected) in BAD.items():
        path = _write(tmp_path / f"{case}.safetensors", tensors)
        with pytest.raises(RankscopeError, match=re.escape(expected)):
            analyze(path, progress=False)


def test_a_structured_analysis_goes_through_every_view(tmp_path):
    """--out (plots, HTML, JSON), the text, the table, suggest and compare on modules without a per-rank view."""
    from rankscope.maths.compare import compare
    from rankscope.maths.suggest import suggest
    from rankscope.views.frames import to_frame
    from rankscope.views.outputs import write_analysis
    from rankscope.views.text import compare_lines, suggest_lines, summary_lines

    folder, _ = _peft_adapter(tmp_path, "lokr")
    document = analyze(folder, progress=False)
    assert any("per-rank view  undefined for the 3 LoHa / LoKr module(s)" in line for line in summary_lines(document))
    paths = write_analysis(document, tmp_path / "report")
    assert {p.name for p in paths} >= {"analysis.json", "energy.png", "heatmap.png", "report.html"}
    assert "deciles.png" not in {p.name for p in paths}  # no slot norms to draw
    from rankscope.io.validate import check_analysis

    check_analysis(json.loads((tmp_path / "report" / "analysis.json").read_text()), "analysis.json")  # compare reads it
    assert all(m["importance"] is None and m["energy_rank"]["0.95"] >= 1 for m in document["snapshots"][0]["modules"])
    result = suggest(folder, energy=0.9)
    assert suggest_lines(result)
    for row in result["modules"]:
        spectrum = np.asarray(next(m for m in document["snapshots"][0]["modules"] if m["name"] == row["name"])["spectrum"])
        energy = np.cumsum(spectrum ** 2) / (spectrum ** 2).sum()
        assert row["suggested"] == int(np.argmax(energy >= 0.9 - 1e-12)) + 1
    assert compare_lines(compare([document, document], ["a", "b"]))
    frame = to_frame(document)
    assert len(frame) == 3 and frame["top10_share"].isna().all() and frame["k95"].notna().all()
    no_spectrum = analyze(folder, spectrum=False, progress=False)["snapshots"][0]["summary"]["verdict"]["sentence"]
    assert "undefined for LoHa / LoKr" in no_spectrum and "nothing has been learned" not in no_spectrum


@pytest.mark.parametrize("case", ["gram", "rank-deficient", "r2-above-n"])
def test_loha_maths_on_every_path_matches_a_dense_svd(case):
    """The Gram path, the Householder fallback (a rank-deficient face-splitting factor: w1_a = w2_a makes the (i,j)
    and (j,i) columns equal) and r1·r2 above the module's size, each against the dense ΔW in float64."""
    from rankscope.maths import structured

    rng = np.random.default_rng(3)
    out, inner, r = (40, 30, 3) if case != "r2-above-n" else (6, 7, 3)
    B1, B2 = rng.standard_normal((out, r)), rng.standard_normal((out, r))
    A1, A2 = rng.standard_normal((r, inner)), rng.standard_normal((r, inner))
    if case == "rank-deficient":
        B2 = B1.copy()
    parts = {"B1": B1, "A1": A1, "B2": B2, "A2": A2}
    delta = (B1 @ A1) * (B2 @ A2)
    dense = _svd(delta)[1]
    ours = structured.spectrum("loha", parts, scale=-0.5)
    assert ours.size == min(r * r, out, inner)
    np.testing.assert_allclose(ours, 0.5 * dense[: ours.size], rtol=1e-9, atol=1e-10 * dense[0])
    for k in (1, 4):
        A, B, sigma = structured.truncated_factors("loha", parts, k)
        np.testing.assert_allclose(B @ A, _truncation(delta, k), atol=1e-9 * dense[0])
        np.testing.assert_allclose(sigma, dense[: sigma.size], rtol=1e-9, atol=1e-10 * dense[0])


def test_lokr_maths_with_both_halves_factored_matches_a_dense_svd():
    from rankscope.maths import structured

    rng = np.random.default_rng(4)
    parts = {"B1": rng.standard_normal((4, 2)), "A1": rng.standard_normal((2, 5)),
             "B2": rng.standard_normal((6, 2)), "A2": rng.standard_normal((2, 3))}
    delta = np.kron(parts["B1"] @ parts["A1"], parts["B2"] @ parts["A2"])
    dense = _svd(delta)[1]
    ours = structured.spectrum("lokr", parts, scale=2.0)
    assert ours.size == 4
    np.testing.assert_allclose(ours, 2.0 * dense[:4], rtol=1e-10)
    A, B, _ = structured.truncated_factors("lokr", parts, lambda sigma: 3)  # keep as the rule resize passes
    np.testing.assert_allclose(B @ A, _truncation(delta, 3), atol=1e-10 * dense[0])


_FUZZ_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
               "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")


def test_fuzzed_structured_files_load_or_fail_in_one_line(tmp_path):
    """Random part sets and shapes (missing parts, 0-sized, 1-D or 5-D factors, odd alphas, NaN): analyze and resize
    either work, with every spectrum as long as the module's rank, or raise RankscopeError with one line."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    long = os.environ.get("HYPOTHESIS_PROFILE") == "long"  # make fuzz
    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)
    files = st.dictionaries(st.sampled_from(_FUZZ_PARTS), shapes, min_size=1, max_size=7)

    @settings(max_examples=2000 if long else 30, deadline=None, derandomize=not long, database=None,
              suppress_health_check=list(HealthCheck))
    @given(files, st.sampled_from(["lora_unet_m", "base_model.model.m"]), st.booleans())
    def check(parts, prefix, nan):
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        rng = np.random.default_rng(0)
        tensors = {f"{prefix}.{part}": rng.standard_normal(shape).astype(np.float32) for part, shape in parts.items()}
        if nan and tensors:
            first = next(iter(tensors.values()))
            first.reshape(-1)[:1] = np.nan
        save_file(tensors, folder / "x.safetensors")
        try:
            document = analyze(folder / "x.safetensors", progress=False)
            for m in document["snapshots"][0]["modules"]:
                assert m.get("error") or len(m["spectrum"]) == m["rank"] >= 1
            resize(folder / "x.safetensors", folder / "out", rank=1)
        except RankscopeError as e:
            assert "\n" not in str(e) and str(e)

    check()


def test_loha_gram_products_by_blocks_and_the_condition_rule(monkeypatch):
    """The face-splitting Gram matrix and F·W from pair products, over several blocks (a block size forced small),
    against F built whole; and the Cholesky path's condition rule against the eigenvalues: a Gram matrix is
    refused exactly when its condition number is above GRAM_MAX_CONDITION, whether or not the cheap bound decides."""
    from rankscope.maths import importance as imp
    from rankscope.maths import structured

    monkeypatch.setattr(structured, "_BLOCK_VALUES", 100)
    rng = np.random.default_rng(5)
    X, Y, W = rng.standard_normal((3, 53)), rng.standard_normal((4, 53)), rng.standard_normal((12, 5))
    F = (X.T[:, :, None] * Y.T[:, None, :]).reshape(53, 12)  # F[o, (i,j)] = X[o,i] Y[o,j], the slow obvious way
    np.testing.assert_allclose(structured._face_split_gram(X, Y), F.T @ F, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(structured._face_split_times(X, Y, W), F @ W, rtol=1e-12, atol=1e-12)
    Q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    for condition in (10.0, 1e5, 5e6, 9e6, 3e7, 1e9):  # 5e6, 9e6: the bound is above the limit, the eigenvalues decide
        gram = (Q * np.geomspace(1.0, 1.0 / condition, 16)) @ Q.T
        found = structured._cholesky(gram)
        assert (found is not None) == (condition < imp.GRAM_MAX_CONDITION)
        if found is not None:
            np.testing.assert_allclose(found[0] @ found[0].T, gram, atol=1e-12)
            np.testing.assert_allclose(found[1] @ found[0], np.eye(16), atol=1e-6)
