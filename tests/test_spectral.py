"""The spectral view beside the per-rank one: energy ranks, stable and spectral effective ranks, the
summaries, the verdict, dynamics, compare and ``rankscope suggest``.

The independent computation is a dense float64 SVD of the whole ΔW, built the slow obvious way.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import rankscope
from rankscope.maths import importance as imp
from rankscope.maths.compare import compare
from rankscope.maths.dynamics import dynamics
from rankscope.maths.suggest import suggest
from rankscope.views.text import compare_lines, dynamics_summary_lines, suggest_lines, summary_lines

REPO = Path(__file__).resolve().parents[1]


def slow_energy_rank(s: np.ndarray, share: float) -> int:
    energy = np.asarray(s, np.float64) ** 2
    if energy.sum() == 0:
        return 0
    return next(k for k in range(1, energy.size + 1) if energy[:k].sum() >= share * energy.sum() * (1 - 1e-12))


def dense_singular_values(module) -> np.ndarray:
    """σ of scale · B diag(c) A, from the explicit d×k matrix (only the first r can be non-zero)."""
    A, B = np.asarray(module.A, np.float64), np.asarray(module.B, np.float64)
    c = np.ones(module.rank) if module.coefficients is None else module.coefficients
    return np.linalg.svd(module.scale * (B * c) @ A, compute_uv=False)[:module.rank]


def hadamard(r: int) -> np.ndarray:
    """Sylvester's orthogonal r×r matrix with every entry ±1/√r (r a power of two)."""
    h = np.ones((1, 1))
    while h.shape[0] < r:
        h = np.block([[h, h], [h, -h]])
    assert h.shape[0] == r
    return h / math.sqrt(r)


def with_spectrum(r: int, n_in: int, n_out: int, sigma: np.ndarray, rng, balance: bool = True):
    """(A, B) whose product has exactly the singular values ``sigma``. With ``balance`` the slots are mixed
    by a Hadamard matrix M (B A = (B M)(Mᵀ A): the same ΔW), which gives every slot the same norms
    ‖b_i‖² = ‖a_i‖² = Σσ / r: the per-rank view is flat whatever the spectrum, as after a LoRA run."""
    u, _ = np.linalg.qr(rng.normal(size=(n_out, r)))
    v, _ = np.linalg.qr(rng.normal(size=(n_in, r)))
    B, A = u * np.sqrt(sigma), (v * np.sqrt(sigma)).T
    if balance:
        m = hadamard(r)
        B, A = B @ m, m.T @ A
    return A.astype(np.float32), B.astype(np.float32)


def write_peft(folder: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float,
               extra_config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(A)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(B)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, **(extra_config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def concentrated_adapter(folder: Path, seed: int = 0, r: int = 16, decay: float = 0.35) -> Path:
    """12 modules whose ΔW lives in a few directions while every slot has nearly the same norm."""
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(6):
        for kind in ("q_proj", "v_proj"):
            sigma = decay ** np.arange(r) * (1 + 0.05 * rng.uniform(size=r))
            modules[f"model.layers.{layer}.self_attn.{kind}"] = with_spectrum(r, 24, 20, np.sort(sigma)[::-1], rng)
    return write_peft(folder, modules, r, 2 * r)


def full_rank_adapter(folder: Path, seed: int = 1, r: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    modules = {f"model.layers.{i}.mlp.up_proj": with_spectrum(r, 16, 16, 1 + 0.01 * rng.uniform(size=r), rng)
               for i in range(8)}
    return write_peft(folder, modules, r, r)


# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize("sigma", [np.array([3.0, 2.0, 1.0, 0.5]), np.ones(8), np.array([1.0, 0, 0, 0]),
                                   np.geomspace(1, 1e-6, 16), np.array([2.0, 2.0])])
def test_spectral_measures_match_their_definitions(sigma):
    for share in (0.5, 0.9, 0.95, 0.99, 1.0):
        assert imp.energy_rank(sigma, share) == slow_energy_rank(sigma, share)
    assert imp.energy_ranks(sigma) == {k: slow_energy_rank(sigma, float(k)) for k in ("0.9", "0.95", "0.99")}
    assert imp.stable_rank(sigma) == pytest.approx((sigma ** 2).sum() / sigma.max() ** 2)
    p = sigma[sigma > 0] / sigma.sum()
    assert imp.spectral_effective_rank(sigma) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    for k in range(sigma.size + 1):
        kept = (sigma[:k] ** 2).sum() / (sigma ** 2).sum()
        assert imp.truncation_error(sigma, k) == pytest.approx(math.sqrt(max(0.0, 1 - kept)), abs=1e-12)
    for error in (0.01, 0.1, 0.3):  # the smallest k whose truncation error is within the bound
        k = imp.rank_for_error(sigma, error)
        assert imp.truncation_error(sigma, k) <= error + 1e-12
        assert k == 0 or imp.truncation_error(sigma, k - 1) > error


def test_truncation_error_is_the_frobenius_error_of_the_truncated_svd():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 40))
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    for k in range(7):
        truncated = (u[:, :k] * s[:k]) @ vt[:k]
        expected = np.linalg.norm(delta - truncated) / np.linalg.norm(delta)
        assert imp.truncation_error(s[:6], k) == pytest.approx(expected, abs=1e-12)


def test_zero_update_has_energy_rank_zero_and_undefined_ratios():
    zero = np.zeros(8)
    assert imp.energy_ranks(zero) == {"0.9": 0, "0.95": 0, "0.99": 0}
    assert math.isnan(imp.stable_rank(zero)) and math.isnan(imp.spectral_effective_rank(zero))
    np.testing.assert_array_equal(imp.energy_curve(zero), np.zeros(imp.ENERGY_GRID.size))
    np.testing.assert_allclose(imp.energy_curve(np.ones(4)), imp.ENERGY_GRID)  # equal σ: the diagonal


# ----------------------------------------------------------------------------- the document


def test_summary_bands_and_words_agree_with_a_dense_svd(tmp_path):
    folder = concentrated_adapter(tmp_path / "a")
    checkpoint = rankscope.load(folder)
    document = rankscope.analyze(folder)
    snapshot = document["snapshots"][0]
    k95, stable, effective = [], [], []
    for module, entry in zip(checkpoint.modules, snapshot["modules"]):
        s = dense_singular_values(module)
        assert entry["energy_rank"] == {k: slow_energy_rank(s, float(k)) for k in ("0.9", "0.95", "0.99")}
        assert entry["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-9)
        p = s / s.sum()
        assert entry["spectral_effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
        k95.append(slow_energy_rank(s, 0.95) / 16)
        stable.append((s ** 2).sum() / s[0] ** 2 / 16)
        effective.append(math.exp(-(p * np.log(p)).sum()) / 16)
    summary = snapshot["summary"]
    for key, values in (("energy_rank_ratio", k95), ("stable_rank_ratio", stable),
                        ("spectral_effective_rank_ratio", effective)):
        assert summary[key]["median"] == pytest.approx(np.median(values), rel=1e-9)
        assert summary[key]["q25"] == pytest.approx(np.quantile(values, 0.25), rel=1e-9)
    for group in list(summary["by_kind"].values()) + list(summary["by_layer"].values()):
        assert 0 < group["energy_rank_ratio"] <= 1 and group["stable_rank_ratio"] > 0
    # Slots were mixed by a random rotation: the per-rank view is flat, the spectrum is not.
    assert summary["effective_rank_ratio"]["median"] > 0.9 and summary["energy_rank_ratio"]["median"] <= 0.25
    verdict = summary["verdict"]
    assert (verdict["spectral"], verdict["per_rank"]) == ("concentrated", "even")
    assert "barely separated" not in verdict["sentence"] and "directions" in verdict["sentence"]
    lines = "\n".join(summary_lines(document))
    k = summary["energy_ranks"]["0.95"]
    assert "per-rank view" in lines and "spectral view" in lines
    assert f"directions     k95 median {k['median']:g} of 16" in lines


def test_full_rank_adapter_says_a_larger_r_may_help(tmp_path):
    document = rankscope.analyze(full_rank_adapter(tmp_path / "full"))
    summary = document["snapshots"][0]["summary"]
    assert summary["full_rank_modules"] == 8 and summary["verdict"]["spectral"] == "full"
    assert "larger r may help" in summary["verdict"]["sentence"]


def test_fresh_adapter_has_learned_nothing(tmp_path):
    rng = np.random.default_rng(2)
    modules = {f"m.{i}.q": (rng.normal(size=(4, 6)).astype(np.float32), np.zeros((5, 4), np.float32)) for i in range(3)}
    document = rankscope.analyze(write_peft(tmp_path / "fresh", modules, 4, 8))
    snapshot = document["snapshots"][0]
    assert all(m["energy_rank"] == {"0.9": 0, "0.95": 0, "0.99": 0} for m in snapshot["modules"])
    assert snapshot["summary"]["zero_modules"] == 3
    assert "nothing has been learned yet" in snapshot["summary"]["verdict"]["sentence"]
    json.loads(rankscope.report.to_json(document))  # NaN stable ranks become null: strict JSON


def test_nan_module_keeps_its_error_and_the_others_their_spectrum(tmp_path):
    rng = np.random.default_rng(3)
    good = with_spectrum(4, 8, 8, np.array([4.0, 1, 0.5, 0.1]), rng)
    bad = (good[0].copy(), good[1].copy())
    bad[1][0, 0] = np.inf
    document = rankscope.analyze(write_peft(tmp_path / "nan", {"m.0.q": good, "m.1.q": bad}, 4, 4))
    first, second = document["snapshots"][0]["modules"]
    assert first["energy_rank"]["0.95"] == slow_energy_rank(np.array([4.0, 1, 0.5, 0.1]), 0.95)
    assert second["importance"] is None and "energy_rank" not in second and "Inf" in second["error"]
    summary = document["snapshots"][0]["summary"]
    assert summary["spectral_modules"] == 1 and len(summary["errors"]) == 1


def test_all_nan_is_not_blamed_on_initialisation(tmp_path):
    A = np.full((2, 3), np.nan, np.float32)
    document = rankscope.analyze(write_peft(tmp_path / "allnan", {"m.0.q": (A, np.ones((3, 2), np.float32))}, 2, 2))
    sentence = document["snapshots"][0]["summary"]["verdict"]["sentence"]
    assert "NaN" in sentence and "initialisation" not in sentence


@pytest.mark.parametrize("fixture", ["peft-gpt2-conv1d", "peft-roberta-series/checkpoint-2400",
                                     "mlx-gemma-series/adapters.safetensors", "diffusers-legacy-sd15"])
def test_real_adapters_match_a_dense_svd(real_fixtures, fixture):
    checkpoint = rankscope.load(real_fixtures / fixture)
    snapshot = rankscope.analyze(real_fixtures / fixture)["snapshots"][0]
    entries = snapshot["modules"]
    # Dense SVDs of up to 1280×1280 updates are slow: eight modules spread over the adapter are checked.
    for index in np.linspace(0, len(entries) - 1, min(8, len(entries))).astype(int):
        s = dense_singular_values(checkpoint.modules[index])
        entry = entries[index]
        assert entry["energy_rank"] == {k: slow_energy_rank(s, float(k)) for k in ("0.9", "0.95", "0.99")}
        assert entry["stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-6)
    summary = snapshot["summary"]
    assert summary["energy_rank_ratio"]["median"] == np.median([m["energy_rank"]["0.95"] / m["rank"] for m in entries])
    assert summary["stable_rank_ratio"]["median"] == pytest.approx(np.median([m["stable_rank"] / m["rank"] for m in entries]))
    # Every real adapter here looks even slot by slot; the verdict must still tell the spectral story.
    sentence = summary["verdict"]["sentence"]
    assert "barely separated" not in sentence and "spectral view" in sentence


# ----------------------------------------------------------------------------- dynamics and compare


def test_spectral_stability_and_stable_from(tmp_path):
    """k95 falls from 16 to 2 of 16 over the first snapshots, then stays: steady from the step it settled."""
    rng = np.random.default_rng(4)
    decays = [1.0, 0.9, 0.7, 0.3, 0.3, 0.3]  # k95 16, 13, 5, 2, 2, 2
    for step, decay in zip(range(100, 700, 100), decays):
        sigma = decay ** np.arange(16)
        modules = {f"model.layers.{i}.q_proj": with_spectrum(16, 20, 20, sigma * (1 + 1e-3 * rng.uniform(size=16)), rng)
                   for i in range(4)}
        write_peft(tmp_path / "run" / f"checkpoint-{step}", modules, 16, 16)
    document = rankscope.analyze(tmp_path / "run")
    dyn = dynamics(document)
    k95 = [[m["energy_rank"]["0.95"] for m in s["modules"]] for s in document["snapshots"]]
    shares = [np.mean([abs(b - a) <= 1 for a, b in zip(x, y)]) for x, y in zip(k95, k95[1:])]
    assert [p["steady_share"] for p in dyn["spectral_stability"]] == pytest.approx(shares)
    assert dyn["spectral_stable_from"] == 400 and dyn["spectral_stable_from_index"] == 3
    medians = [s["energy_rank_ratio"]["median"] for s in dyn["spread"]]
    assert medians[0] > medians[-1] and medians[3:] == [medians[-1]] * 3
    text = "\n".join(dynamics_summary_lines(dyn))
    assert "k95 / r" in text and "steady (share ≥ 0.9) from step 400" in text


def test_compare_tests_the_spectral_measures(tmp_path):
    narrow = rankscope.analyze(concentrated_adapter(tmp_path / "narrow", seed=5, decay=0.3))
    wide = rankscope.analyze(concentrated_adapter(tmp_path / "wide", seed=6, decay=0.9))
    result = compare([narrow, wide], labels=["narrow", "wide"])
    (test,) = result["tests"]
    for metric in ("energy_rank_ratio", "stable_rank_ratio", "spectral_effective_rank_ratio"):
        assert test[metric]["more_even"] == "wide" and test[metric]["significant"] and test[metric]["view"] == "spectral"
    for run, document in zip(result["runs"], (narrow, wide)):
        values = [m["spectral_effective_rank"] / m["rank"] for m in document["snapshots"][0]["modules"]]
        assert run["spectral_effective_rank_ratio"]["median"] == pytest.approx(np.median(values), rel=1e-12)
    spectral = result["verdict"]["spectral"]
    assert spectral["most_even"] == "wide" and spectral["measure"] == "spectral_effective_rank_ratio"
    assert "spectral eff. rank / r" in spectral["sentence"]
    lines = compare_lines(result)
    assert lines[-1].startswith("  verdict  spectral view") and lines[-2].startswith("  verdict  per-rank view")


# ----------------------------------------------------------------------------- suggest


def test_suggest_ranks_errors_and_a_peft_config_that_keeps_each_scale(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(7)
    decays = {"q_proj": 0.2, "v_proj": 0.6}
    modules = {f"model.layers.{i}.self_attn.{kind}": with_spectrum(8, 32, 32, decay ** np.arange(8), rng)
               for i in range(2) for kind, decay in decays.items()}
    folder = write_peft(tmp_path / "a", modules, 8, 16, {"use_rslora": True})
    result = suggest(folder, energy=0.9)
    expected = {f"base_model.model.{name}": slow_energy_rank(decays[name[-6:]] ** np.arange(8), 0.9) for name in modules}
    assert {row["name"]: row["suggested"] for row in result["modules"]} == expected
    for row in result["modules"]:
        sigma = decays[row["name"][-6:]] ** np.arange(8)
        kept = (sigma[:row["suggested"]] ** 2).sum() / (sigma ** 2).sum()
        assert row["error"] == pytest.approx(math.sqrt(1 - kept), rel=1e-6)
    ks = sorted(expected.values())
    assert result["global_r"] == ks[math.ceil(0.9 * (len(ks) - 1))] and result["advice"] == "smaller"
    # The fragment, given to real PEFT, gives every module its suggested rank and its trained scale 16 / √8.
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    model = get_peft_model(llama, LoraConfig(target_modules=["q_proj", "v_proj"], **result["peft"]))
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            assert module.r["default"] == expected[name]
            assert module.scaling["default"] == pytest.approx(16 / math.sqrt(8))
    assert "LoraConfig(r=" in "\n".join(suggest_lines(result))


def test_suggest_says_larger_when_the_rank_is_used_up(tmp_path):
    result = suggest(full_rank_adapter(tmp_path / "full"))
    assert result["advice"] == "larger" and result["global_r"] == 8
    assert "larger r" in result["reasons"][0]


def test_suggest_cli_json_and_bad_energy(tmp_path):
    folder = concentrated_adapter(tmp_path / "a")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "rankscope.cli", "suggest", str(folder), "--json", "-"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == "rankscope/suggest-v1" and "PEFT" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "rankscope.cli", "suggest", str(tmp_path / "missing"), "--energy", "0"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "energy 0" in bad.stderr and "does not exist" not in bad.stderr  # checked before anything is read


def test_report_explains_the_two_views(tmp_path):
    from rankscope.views.outputs import write_analysis

    document = rankscope.analyze(concentrated_adapter(tmp_path / "a"))
    paths = write_analysis(document, tmp_path / "out")
    assert {p.name for p in paths} >= {"deciles.png", "energy.png", "heatmap.png", "report.html"}
    page = (tmp_path / "out" / "report.html").read_text()
    assert "per-rank view" in page.lower() and "spectral view" in page.lower() and "basis" in page
