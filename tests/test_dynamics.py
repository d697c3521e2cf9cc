"""`rankscope.dynamics`, `rankscope.recommend` and `rankscope.dynamics_plot` on runs whose rank ordering is known.

Synthetic runs: every module's importances are in a random order (changing every snapshot) until a
known step, and from that step on in one fixed order that separates more and more.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import spearmanr

import rankscope
from rankscope.io.documents import to_json
from rankscope.maths import importance as imp
from rankscope.maths.dynamics import dynamics, operations, spearman
from rankscope.maths.recommend import P_GRID, global_cut, recommend
from rankscope.views.text import dynamics_summary_lines

R = 8
MODULES = [f"layers.{i}.q" for i in range(6)]
STEPS = list(range(100, 1001, 100))


def module_entry(name: str, values, rank: int | None = None) -> dict:
    """One module of an analysis document, with the fields analysis.analyze_module computes."""
    if values is None:
        return {"name": name, "rank": rank or R, "scale": 1.0, "layer": name.rsplit(".", 1)[0], "kind": "q",
                "importance": None, "deciles": None, "error": "NaN"}
    x = np.asarray(values, dtype=np.float64)
    return {"name": name, "rank": x.size, "scale": 1.0, "layer": name.rsplit(".", 1)[0], "kind": "q",
            "importance": x.tolist(), "deciles": imp.deciles(x).tolist(), "top10_share": imp.top_share(x),
            "effective_rank": imp.effective_rank(x), "gini": imp.gini(x)}


def document(per_step: dict, events: list | None = None) -> dict:
    """An analysis document from {step: {module name: importances or None}}."""
    return {"schema": "rankscope/analysis-v1", "path": "synthetic", "format": "peft", "layout": "hf-trainer",
            "snapshots": [{"step": step, "modules": [module_entry(n, v) for n, v in mods.items()]}
                          for step, mods in per_step.items()],
            "events": events or []}


def settling_importances(stable_step: int, spread: float = 1.0, seed: int = 0, steps=STEPS) -> dict:
    """Random order (near-equal values) before stable_step; from it a fixed order whose gaps grow with time."""
    rng = np.random.default_rng(seed)
    fixed = {name: rng.permutation(R) for name in MODULES}  # final rank of each slot, per module
    run = {}
    for step in steps:
        mods = {}
        for name in MODULES:
            if step < stable_step:
                mods[name] = 1.0 + 0.02 * rng.permutation(R)
            else:
                growth = spread * (step - stable_step + 100) / 1000
                mods[name] = 1.0 + growth * fixed[name] / (R - 1)
        run[step] = mods
    return run


# --- Spearman and stability ----------------------------------------------------------------------------

def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    for size in (2, 3, 8, 64):
        for _ in range(20):
            a = rng.integers(0, 4, size).astype(float)  # many ties
            b = rng.normal(size=size)
            expected = spearmanr(a, b).statistic if np.ptp(a) > 0 else float("nan")
            got = spearman(a, b)
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: no ordering
    assert math.isnan(spearman([1.0], [2.0]))


@pytest.mark.parametrize("stable_step", [400, 700])
def test_stable_from_is_the_step_the_order_settles(stable_step):
    dyn = dynamics(document(settling_importances(stable_step)))
    assert dyn["stable_from"] == stable_step
    assert dyn["stable_from_index"] == STEPS.index(stable_step)
    for pair in dyn["stability"]:
        if pair["from_step"] >= stable_step:
            assert pair["median"] == pytest.approx(1.0)
    assert dyn["stability"][STEPS.index(stable_step) - 1]["median"] < 0.9


def test_stability_band_matches_slow_scipy_computation():
    run = settling_importances(500, seed=4)
    dyn = dynamics(document(run))
    for pair, (a, b) in zip(dyn["stability"], zip(STEPS, STEPS[1:])):
        rhos = [spearmanr(run[a][n], run[b][n]).statistic for n in MODULES]
        assert pair["modules"] == len(MODULES)
        assert pair["median"] == pytest.approx(float(np.median(rhos)), abs=1e-12)
        assert pair["q25"] == pytest.approx(float(np.quantile(rhos, 0.25)), abs=1e-12)
        assert pair["q75"] == pytest.approx(float(np.quantile(rhos, 0.75)), abs=1e-12)


def test_spread_per_step_and_trajectories():
    run = settling_importances(300, spread=3.0)
    doc = document(run)
    dyn = dynamics(doc)
    for spread, step in zip(dyn["spread"], STEPS):
        shares = [imp.top_share(np.asarray(run[step][n])) for n in MODULES]
        ratios = [imp.effective_rank(np.asarray(run[step][n])) / R for n in MODULES]
        assert spread["top10_share"]["median"] == pytest.approx(float(np.median(shares)))
        assert spread["effective_rank_ratio"]["q25"] == pytest.approx(float(np.quantile(ratios, 0.25)))
        assert spread["top10_share_uniform"]["median"] == pytest.approx(1 / R)
    traj = dyn["modules"][MODULES[2]]
    assert np.asarray(traj["importance"]).shape == (len(STEPS), R)
    assert np.allclose(traj["importance"][-1], run[STEPS[-1]][MODULES[2]])
    assert dyn["separation"]["separated"]
    assert dyn["separation"]["relative_excess"] > 0.3
    json.loads(to_json(dyn))  # JSON-ready


def test_null_missing_and_appearing_modules_and_single_snapshot():
    rng = np.random.default_rng(1)
    fixed = rng.random(R) + 0.5
    run = {
        100: {"a": fixed, "b": None, "c": np.zeros(R)},  # b broken, c all zero (B = 0): both skipped
        200: {"a": fixed * 2, "b": fixed, "c": np.zeros(R)},
        300: {"a": fixed * 3, "b": fixed * 2, "d": fixed[::-1].copy()},  # c disappears, d appears
    }
    dyn = dynamics(document(run))
    assert [p["modules"] for p in dyn["stability"]] == [1, 2]
    assert dyn["stable_from"] == 100
    assert set(dyn["modules"]) == {"a", "b", "d"}
    assert dyn["modules"]["b"]["steps"] == [200, 300]
    assert dyn["spread"][0]["top10_share"]["n"] == 1

    single = dynamics(document({500: {"a": fixed}}))
    assert single["stability"] == [] and single["stable_from"] is None and single["stable_from_index"] is None
    assert any("one snapshot" in line for line in dynamics_summary_lines(single))


def test_unknown_steps_use_snapshot_index():
    doc = document(settling_importances(300))
    for snapshot in doc["snapshots"]:
        snapshot["step"] = None
    dyn = dynamics(doc)
    assert dyn["x"] == [float(i) for i in range(len(STEPS))]
    assert dyn["stable_from"] is None and dyn["stable_from_index"] == STEPS.index(300)
    rec = recommend(doc, total_steps=3000)
    assert rec["delta_t"] == 334  # ceil(end_step 2000 / 6): stabilisation cannot be placed without steps
    assert any("no step numbers" in w for w in rec["warnings"])
    with pytest.raises(rankscope.RankscopeError):
        recommend(doc)


def test_operations_summary_per_step():
    events = [
        {"step": 60, "p": 0.95, "module": "a", "pruned": [1, 5], "sources": [0, 2]},
        {"step": 60, "p": 0.95, "module": "b", "pruned": [], "sources": []},
        {"step": 60, "p": 0.95, "module": "c", "pruned": 3, "sources": [0, 1, 2]},
        {"step": 120, "p": 0.97, "module": "a", "pruned": [4], "sources": [0]},
    ]
    ops = operations({"events": events})
    assert [o["step"] for o in ops] == [60, 120]
    assert ops[0]["pruned_total"] == 5 and ops[0]["modules_operated"] == 2 and ops[0]["p"] == 0.95
    assert ops[0]["pruned"] == {"a": 2, "c": 3}
    assert ops[0]["pruned_per_module"]["median"] == 2
    assert ops[1]["pruned_total"] == 1 and ops[1]["p"] == 0.97
    assert operations({"snapshots": []}) == []


# --- recommend -----------------------------------------------------------------------------------------

def slow_global_cut(importances, p):
    """The cut written out rank by rank: scale modules to mean 1, walk down the sorted list."""
    items = []
    for m, x in enumerate(importances):
        for v in x / np.mean(x):
            items.append((float(v), m))
    items.sort(key=lambda t: -t[0])
    total = sum(v for v, _ in items)
    counts, running, crossed = [0] * len(importances), 0.0, False
    for v, m in items:
        running += v
        if crossed or running / total >= p - 1e-12:
            crossed = True
            counts[m] += 1
    return counts


def test_global_cut_matches_slow_walk_and_flat_count():
    rng = np.random.default_rng(7)
    importances = [rng.gamma(2.0, size=r) for r in (8, 8, 16, 4, 64)]
    for p in P_GRID:
        assert global_cut(importances, p).tolist() == slow_global_cut(importances, p)
    flat = [np.full(8, 3.0) for _ in range(64)]  # N = 512 equal ranks
    for p in P_GRID:
        assert global_cut(flat, p).sum() == 512 - math.ceil(p * 512 - 1e-9) + 1  # (1 - p)·N plus the crossing one


def stationary_run(values_by_module: dict, steps=(200, 400, 600, 800, 1000)) -> dict:
    return document({s: values_by_module for s in steps})


def test_more_unequal_importances_get_a_higher_p_init():
    rng = np.random.default_rng(2)
    names = [f"layers.{i}.q" for i in range(32)]
    flat = {n: 1.0 + 0.01 * rng.random(16) for n in names}
    unequal = {n: rng.permutation(0.95 ** np.arange(16)) for n in names}  # largest / smallest = 2.2
    rec_flat, rec_unequal = recommend(stationary_run(flat)), recommend(stationary_run(unequal))
    assert rec_flat["p_init"] == 0.95  # nearly flat: 1 − 5%, as the paper's operating point
    assert rec_unequal["p_init"] > rec_flat["p_init"]
    for rec in (rec_flat, rec_unequal):
        # The stated rule: smallest p whose cut prunes ≤ 5% of the ranks besides the crossing one.
        n = rec["total_ranks"]
        ok = [c["p"] for c in rec["candidates"] if c["pruned_total"] - 1 <= 0.05 * n]
        assert rec["p_init"] == min(ok)
        chosen = next(c for c in rec["candidates"] if c["p"] == rec["p_init"])
        assert 1 <= chosen["pruned_total"] <= 0.05 * n + 1
    # At the same p the unequal run prunes more ranks: that is why its p_init is higher.
    at_95 = {id(r): next(c for c in r["candidates"] if c["p"] == 0.95)["pruned_total"] for r in (rec_flat, rec_unequal)}
    assert at_95[id(rec_unequal)] > at_95[id(rec_flat)]
    assert any("nearly flat" in r for r in rec_flat["reasons"])
    assert any("separated" in r for r in rec_unequal["reasons"])
    # Far more unequal: even the top of the grid prunes more than the target, and it says so.
    steep = recommend(stationary_run({n: rng.permutation(0.8 ** np.arange(16)) for n in names}))
    assert steep["p_init"] == P_GRID[-1] and any("even p = 0.99" in w for w in steep["warnings"])


def test_later_stabilisation_gives_a_later_first_operation():
    early = recommend(document(settling_importances(200, seed=5)))
    late = recommend(document(settling_importances(500, seed=5)))
    assert early["stable_from"] == 200 and late["stable_from"] == 500
    # total_steps defaults to 3 × 1000; end_step 2000; stable steps scale by 3 to 600 and 1500.
    assert early["total_steps"] == late["total_steps"] == 3000 and early["end_step"] == 2000
    assert early["delta_t"] == 600 and late["delta_t"] == 1500
    assert late["delta_t"] > early["delta_t"]
    assert late["schedule"][0]["step"] == 1500
    # Same run read as the head of a long run of the same length: no scaling.
    same = recommend(document(settling_importances(500, seed=5)), total_steps=1000, scale_stabilisation=False)
    assert same["end_step"] == 666 and same["delta_t"] == 500  # ⌊⅔ · 1000⌋, as the trainer floors it
    # Early stabilisation: the "five operations before end_step" rule decides (4000 / 6).
    very_early = recommend(document(settling_importances(100, seed=5)), total_steps=6000)
    assert very_early["delta_t"] == 667 and very_early["operations"] == 5
    assert [op["step"] for op in very_early["schedule"]] == [667, 1334, 2001, 2668, 3335]
    for rec in (early, late, same, very_early):
        assert rec["reasons"] and rec["delta_t"] >= 2
        json.loads(to_json(rec))


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 7, 10, 11, 100, 1000, 1001, 2999, 6000])
def test_recommended_delta_t_is_one_the_trainer_accepts_on_the_trainers_schedule(total_steps):
    from beamlora import BeamLoraConfig

    rec = recommend(document(settling_importances(100, seed=5)), total_steps=total_steps)
    end_step = 2 * total_steps // 3  # the trainer floors
    config = BeamLoraConfig(p_init=rec["p_init"], delta_t=rec["delta_t"], total_steps=total_steps)  # no error
    assert rec["end_step"] == end_step == config.resolved_end_step and rec["delta_t"] >= 2
    d = rec["delta_t"]
    ops = [t for t in range(1, total_steps + 1) if t % d == 0 and t < end_step and t + d <= total_steps]
    assert rec["operations"] == len(ops) and [op["step"] for op in rec["schedule"]] == ops
    if not ops:
        assert any("no operation fits" in w for w in rec["warnings"])
    if total_steps == 3:
        assert d == 2 and ops == []


def test_schedule_follows_the_cosine_threshold():
    rec = recommend(document(settling_importances(100, seed=5)), total_steps=6000)
    ps = [op["p"] for op in rec["schedule"]]
    for op in rec["schedule"]:
        t = op["step"]
        assert op["p"] == pytest.approx(rec["p_init"] + 0.5 * (1 - rec["p_init"]) * (1 - math.cos(math.pi * t / 4000)))
    assert ps == sorted(ps) and ps[-1] < 1.0  # no operation at end_step, where p reaches 1


def test_flat_short_run_warns():
    rng = np.random.default_rng(0)
    run = {s: {n: 1.0 + 0.005 * rng.random(R) for n in MODULES} for s in (100, 200)}
    rec = recommend(document(run))
    text = " ".join(rec["warnings"])
    assert "2 snapshot" in text and "not separated" in text and "never stabilised" in text
    assert rec["stable_from"] is None
    assert rec["delta_t"] == 67  # ceil(end_step 400 / 6): nothing to wait for
    lines = dynamics_summary_lines(dynamics(document(run)), rec)
    assert any(line.startswith("  warning") for line in lines) and any("p_init" in line for line in lines)


def test_settling_too_late_warns():
    rec = recommend(document(settling_importances(900)))
    assert rec["stable_from"] == 900
    assert any("no operation fits" in w for w in rec["warnings"])


# --- through real files --------------------------------------------------------------------------------

def write_peft_series(root, run: dict, seed: int = 0) -> None:
    """checkpoint-N/ folders whose per-rank norms equal the given importances (scale alpha/r = 1)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    for step, mods in run.items():
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": R, "lora_alpha": R, "target_modules": ["q"]}))
        tensors = {}
        for name, values in mods.items():
            A = rng.normal(size=(R, 12))
            A /= np.linalg.norm(A, axis=1, keepdims=True)  # unit rows: importance = column norm of B
            B = rng.normal(size=(10, R))
            B *= np.asarray(values) / np.linalg.norm(B, axis=0)
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.astype(np.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.astype(np.float32)
        save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_peft_series_on_disk(tmp_path):
    run = settling_importances(600, seed=9)
    write_peft_series(tmp_path / "run", run)
    doc = rankscope.analyze(tmp_path / "run", spectrum=False)
    assert [s["step"] for s in doc["snapshots"]] == STEPS
    dyn = dynamics(doc)
    assert dyn["stable_from"] == 600
    name = next(iter(dyn["modules"]))
    written = run[1000][next(m for m in MODULES if name.endswith(m))]
    assert np.allclose(dyn["modules"][name]["importance"][-1], written, rtol=1e-5)
    from rankscope.views.dynamics_plot import plot_dynamics

    paths = plot_dynamics(doc, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["rank_heatmap.png", "spread_over_time.png", "stability.png"]


@pytest.mark.parametrize("folder", ["peft-roberta-series", "mlx-gemma-series"])
def test_real_series_dynamics_recommend_and_plots(real_fixtures, tmp_path, folder):
    from rankscope.views.dynamics_plot import plot_dynamics, plot_rank_heatmap, plot_spread_over_time, plot_stability

    doc = rankscope.analyze(real_fixtures / folder, spectrum=False)
    dyn = dynamics(doc)
    assert dyn["snapshots"] == len(doc["snapshots"]) >= 5
    assert len(dyn["stability"]) == dyn["snapshots"] - 1
    assert all(-1 <= p["median"] <= 1 for p in dyn["stability"])
    assert not dyn["separation"]["separated"]  # both are short runs: nearly flat, as the method notes say
    rec = recommend(doc)
    assert rec["p_init"] in P_GRID and rec["delta_t"] >= 1
    assert any("not separated" in w for w in rec["warnings"])
    json.loads(to_json(dyn)), json.loads(to_json(rec))
    paths = plot_dynamics(doc, tmp_path)
    assert len(paths) == 3
    name = doc["snapshots"][-1]["modules"][0]["name"]
    paths += [plot_rank_heatmap(doc, name, tmp_path / "one.png"), plot_spread_over_time(dyn, tmp_path / "s.png"),
              plot_stability(dyn, tmp_path / "st.png")]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_marks_events_and_rejects_unknown_module(tmp_path):
    from rankscope.views.dynamics_plot import plot_rank_heatmap, plot_spread_over_time

    events = [{"step": 300, "p": 0.95, "module": MODULES[0], "pruned": [1], "sources": [2]},
              {"step": 600, "p": 0.98, "module": MODULES[0], "pruned": [], "sources": []}]
    doc = document(settling_importances(400), events)
    assert plot_rank_heatmap(doc, MODULES[0], tmp_path / "h.png").stat().st_size > 1000
    assert plot_spread_over_time(dynamics(doc), tmp_path / "s.png", doc["events"]).stat().st_size > 1000
    with pytest.raises(rankscope.RankscopeError):
        plot_rank_heatmap(doc, "no.such.module", tmp_path / "x.png")
