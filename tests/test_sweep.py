"""`rankscope.sweep` on tiny models with constructed adapters whose rank importances are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import rankscope
from rankscope import RankscopeError
from rankscope.adapters.sweep import drop_count, ranks_to_drop, resolve_adapter, sweep
from rankscope.maths.importance import truncated_factors
from rankscope.tasks.layers import lora_layers
from rankscope.views.outputs import write_sweep

R = 8
STRONG = 4  # ranks per module that carry the update; the other R - STRONG are negligible
FRACTIONS = (0, 0.25, 0.5, 0.75, 1.0)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        max_position_embeddings=16, num_labels=6, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def graded_peft(targets=("query", "value"), r: int = R, seed: int = 0):
    """A PEFT model whose LoRA ranks are known: STRONG ranks of B are O(1), the rest 1e-5, at shuffled slots."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    strong = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                A.copy_(torch.randn(A.shape, generator=gen) / math.sqrt(A.shape[1]))
                slots = torch.randperm(r, generator=gen)[:STRONG]
                column_scale = torch.full((r,), 1e-5)
                column_scale[slots] = torch.linspace(1.0, 0.4, STRONG)
                B.copy_(torch.randn(B.shape, generator=gen) * column_scale)
                strong[name] = set(slots.tolist())
    return model.eval(), strong


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (16, 10), generator=torch.Generator().manual_seed(seed))


def neg_mse_to(model) -> callable:
    """Evaluation: minus the MSE between the model's last hidden states and the full adapter's (0 = unchanged)."""
    ids = inputs()

    def hidden(m) -> torch.Tensor:
        return m(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    with torch.no_grad():
        reference = hidden(model).clone()

    @torch.no_grad()
    def neg_mse(m) -> float:
        return -float(((hidden(m) - reference) ** 2).mean())

    return neg_mse


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------- pure choice of ranks


def test_ranks_to_drop_counts_orders_and_nesting():
    importance = np.array([5.0, 1.0, 3.0, 1.0, 9.0, 0.0, 2.0, 7.0])
    assert sorted(ranks_to_drop(importance, 0.25, "least").tolist()) == [1, 5]  # 0.0 then the first 1.0 (ties by index)
    assert ranks_to_drop(importance, 0.5, "least").tolist() == [1, 3, 5, 6]
    assert ranks_to_drop(importance, 0.25, "most").tolist() == [4, 7]
    assert ranks_to_drop(importance, 0.0, "most").size == 0
    assert ranks_to_drop(importance, 1.0, "least").tolist() == list(range(8))
    assert [drop_count(8, f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)] == [1, 2, 4, 6, 7]  # round(f·r), halves up
    assert drop_count(10, 0.3) == 3 and drop_count(5, 0.5) == 3 and drop_count(16, 0.15) == 2
    # random: the same seed at growing fractions drops nested sets of exactly round(f·r) ranks
    previous: set[int] = set()
    for f in FRACTIONS:
        chosen = ranks_to_drop(importance, f, "random", np.random.default_rng([3, 0]))
        assert len(chosen) == drop_count(8, f) and previous <= set(chosen.tolist())
        previous = set(chosen.tolist())
    with pytest.raises(RankscopeError, match="unknown order 'biggest'"):
        ranks_to_drop(importance, 0.5, "biggest")


def test_truncated_factors_match_float64_svd_of_the_explicit_update():
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(R, 40)).astype(np.float32), rng.normal(size=(24, R)).astype(np.float32)
    full = B.astype(np.float64) @ A
    u, s, vt = np.linalg.svd(full)
    for keep in range(R + 1):
        A2, B2, sigma = truncated_factors(A, B, keep)
        assert A2.shape == (keep, 40) and B2.shape == (24, keep)
        np.testing.assert_allclose(sigma, s[:R], rtol=1e-10)
        best = (u[:, :keep] * s[:keep]) @ vt[:keep]  # Eckart-Young: the best rank-keep approximation
        np.testing.assert_allclose(B2 @ A2, best, atol=1e-10 * s[0])
        # The singular values are split evenly: both factors of direction i have norm √σ_i.
        np.testing.assert_allclose(np.linalg.norm(B2, axis=0), np.sqrt(s[:keep]), rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(A2, axis=1), np.sqrt(s[:keep]), rtol=1e-10)
    A2, B2, _ = truncated_factors(A, B, R)
    np.testing.assert_allclose(B2 @ A2, full, atol=1e-10 * s[0])  # keeping all r directions reproduces the update


# ----------------------------------------------------------------------------- sweeps on a tiny BERT


@pytest.fixture()
def graded(tmp_path):
    model, strong = graded_peft()
    model.save_pretrained(tmp_path / "adapter")
    return model, strong, tmp_path / "adapter"


def test_least_first_stays_flat_most_first_falls(graded):
    model, strong, adapter = graded
    result = rankscope.sweep(model, adapter, neg_mse_to(model), fractions=FRACTIONS, seeds=2, progress=False)
    assert result.metric == "neg_mse" and result.baseline == 0.0 and result.modules == 4 and result.ranks == [R]
    least = dict(result.curve("least"))
    most = dict(result.curve("most"))
    collapse = -most[1.0]  # everything pruned: the base model
    assert collapse > 0
    # Half of every module's ranks are negligible: dropping them first changes nothing that matters.
    assert -least[0.25] < 1e-6 * collapse and -least[0.5] < 1e-6 * collapse
    assert -least[0.75] > 1e-3 * collapse  # past the negligible half, strong ranks go
    # Dropping the strongest quarter already costs a large part of the whole adapter's effect.
    assert -most[0.25] > 0.2 * collapse and -most[0.5] > 0.5 * collapse
    for f in (0.25, 0.5, 0.75):
        assert most[f] < result.value("random", f) < least[f] or f == 0.75
    # Spectral truncation of a rank-4 update (plus noise) to 4 or more directions keeps it.
    spectral = dict(result.curve("spectral"))
    assert -spectral[0.5] < 1e-6 * collapse and -spectral[0.75] > 1e-3 * collapse
    # Every order agrees at the ends: nothing pruned = baseline, everything pruned = the base model.
    for order in ("least", "most", "random", "spectral"):
        assert result.value(order, 0.0) == result.baseline and result.value(order, 1.0) == most[1.0]
    assert len([p for p in result.points if p.order == "random"]) == 2 * len(FRACTIONS)
    assert {p.seed for p in result.points if p.order == "random"} == {0, 1}
    assert all(p.seed is None for p in result.points if p.order != "random")


def test_least_important_ranks_are_the_constructed_weak_ones(graded):
    model, strong, adapter = graded
    seen = []

    def record(m) -> float:
        alive = {}
        for name, module in m.named_modules():
            if isinstance(module, LoraLayer):
                B = module.lora_B["default"].weight
                alive[name] = {i for i in range(R) if B[:, i].any()}
        seen.append(alive)
        return 0.0

    sweep(model, adapter, record, fractions=[0.5], orders=["least", "most"], spectral=False, progress=False, energies=())
    _, least_half, most_half, _ = seen  # baseline, least 50%, most 50%, the final check
    assert least_half == strong  # the weak half was zeroed, the strong half survives in every module
    assert all(most_half[name] == set(range(R)) - strong[name] for name in strong)


def test_masking_restores_every_weight_and_the_metric_bit_for_bit(graded):
    model, _, adapter = graded
    evaluate = neg_mse_to(model)
    before = lora_params(model)
    baseline = evaluate(model)
    result = sweep(model, adapter, evaluate, fractions=(0, 0.1, 0.3, 0.5, 0.9, 1), seeds=2, progress=False)
    after = lora_params(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert evaluate(model) == baseline == result.baseline == result.restored_value
    assert all(p.value == baseline for p in result.points if p.fraction == 0)
    assert not result.notes
    # Identical masks (f=0 and f=1 of every order and seed) are evaluated once.
    assert result.evaluations < len(result.points) + 2
    assert not model.training


def test_spectral_points_keep_exactly_r_minus_k_directions_in_place(graded):
    model, _, adapter = graded

    def update_rank(m) -> float:  # the smallest numerical rank of any live update
        ranks = []
        for layer in lora_layers(m):
            s = np.linalg.svd((layer.B.double() @ layer.A.double()).numpy(), compute_uv=False)
            ranks.append(int((s > 1e-9).sum()))
        return float(min(ranks))

    fractions = (0, 0.125, 0.25, 0.5, 0.625, 1.0)
    result = sweep(model, adapter, update_rank, fractions=fractions, orders=[], progress=False, energies=())
    assert [p.order for p in result.points] == ["spectral"] * len(fractions)
    assert [p.value for p in result.points] == [R - drop_count(R, f) for f in fractions]


def test_compression_view_keeps_each_modules_energy_rank(graded, tmp_path):
    """Energy points keep, in every module, the fewest directions holding f of its energy (from a dense SVD),
    and report the share of LoRA parameters those directions need; the evaluation sees exactly that."""
    model, _, adapter = graded
    layers = lora_layers(model)
    full = sum(layer.rank * (layer.A.shape[1] + layer.B.shape[0]) for layer in layers)

    def live_params(m) -> float:  # what the masked model really holds, counted from its weights
        total = 0
        for layer in lora_layers(m):
            s = np.linalg.svd((layer.B.double() @ layer.A.double()).numpy(), compute_uv=False)
            total += int((s > 1e-9 * max(s[0], 1e-300)).sum()) * (layer.A.shape[1] + layer.B.shape[0])
        return total / full

    energies = (0.5, 0.9, 0.99)
    result = sweep(model, adapter, live_params, fractions=(0, 0.5), orders=["least"], spectral=False, progress=False,
                   energies=energies)
    points = [p for p in result.points if p.order == "energy"]
    assert [p.energy for p in points] == list(energies)
    for p in points:
        expected = 0
        for layer in layers:
            s = np.linalg.svd((layer.B.double() @ layer.A.double()).numpy(), compute_uv=False)[:layer.rank]
            e = s ** 2
            k = next(k for k in range(1, e.size + 1) if e[:k].sum() >= p.energy * e.sum() * (1 - 1e-12))
            expected += k * (layer.A.shape[1] + layer.B.shape[0])
        assert p.params_kept == pytest.approx(expected / full) and p.value == pytest.approx(p.params_kept)
    least = {p.fraction: p for p in result.points if p.order == "least"}
    assert least[0.5].params_kept == pytest.approx(0.5) and least[0].params_kept == 1.0
    paths = write_sweep(result, tmp_path / "out")
    assert [q.name for q in paths] == ["sweep.json", "sweep.csv", "sweep.png", "compression.png", "report.html"]
    assert "params_kept,energy" in (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0]
    assert "95%" not in result.summary_line() and "0.99" not in result.summary_line()  # only 95% is summarised


def test_importance_from_the_model_itself_matches_the_checkpoint(graded):
    model, _, adapter = graded
    evaluate = neg_mse_to(model)
    kwargs = dict(fractions=(0.25, 0.5, 0.75), orders=["least", "most"], spectral=False, progress=False)
    from_file = sweep(model, adapter, evaluate, **kwargs)
    from_model = sweep(model, None, evaluate, **kwargs)
    from_checkpoint = sweep(model, rankscope.load(adapter), evaluate, **kwargs)
    assert from_file.points == from_model.points == from_checkpoint.points
    assert from_model.adapter is None and from_file.adapter.endswith("adapter_model.safetensors")


def test_plain_model_with_injected_lora_and_gpt2_conv1d(tmp_path):
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    peft_model = get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "gpt2")
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss(m) -> float:
        return float(m(input_ids=ids, labels=ids).loss)

    result = sweep(peft_model, tmp_path / "gpt2", loss, fractions=(0, 0.5, 1), seeds=1, progress=False,
                   metric="loss", higher_is_better=False)
    assert result.modules == 2 and result.restored_value == result.baseline
    assert result.value("least", 1.0) != result.baseline
    # The same LoRA injected into a plain transformers model (no PeftModel): names map without the prefix.
    plain = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                                    GPT2LMHeadModel(gpt2.config).eval())
    plain.load_state_dict({k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()},
                          strict=False)
    assert len(lora_layers(plain)) == 2
    assert not sweep(plain, tmp_path / "gpt2", loss, fractions=(0.5,), progress=False).notes  # same weights as the file


# ----------------------------------------------------------------------------- adapters that do not fit


def test_adapter_with_other_shapes_names_the_first_module(tmp_path):
    other, _ = graded_peft(r=4)
    other.save_pretrained(tmp_path / "r4")
    model, _ = graded_peft(r=R)
    with pytest.raises(RankscopeError, match=r"module base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query "
                                             r"has rank 4, in 32, out 32, but the model's LoRA layer .* has rank 8"):
        sweep(model, tmp_path / "r4", lambda m: 0.0, progress=False)


def test_adapter_with_a_module_the_model_lacks(tmp_path):
    bigger, _ = graded_peft(targets=("query", "key", "value"))
    bigger.save_pretrained(tmp_path / "qkv")
    model, _ = graded_peft(targets=("query", "value"))
    with pytest.raises(RankscopeError, match=r"module base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.key "
                                             r"matches no LoRA layer in the model"):
        sweep(model, tmp_path / "qkv", lambda m: 0.0, progress=False)
    # ... and the other way round: a LoRA layer of the model that the adapter does not cover.
    model.save_pretrained(tmp_path / "qv")
    with pytest.raises(RankscopeError, match=r"LoRA layer base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.key "
                                             r"has no module in the adapter"):
        sweep(bigger, tmp_path / "qv", lambda m: 0.0, progress=False)


def test_bad_requests_are_one_line_errors(graded):
    model, _, adapter = graded
    with pytest.raises(RankscopeError, match="fraction 1.5 is outside"):
        sweep(model, adapter, lambda m: 0.0, fractions=(0, 1.5))
    with pytest.raises(RankscopeError, match="unknown order 'top'"):
        sweep(model, adapter, lambda m: 0.0, orders=["top"])
    with pytest.raises(RankscopeError, match="evaluate returned str"):
        sweep(model, adapter, lambda m: "good", progress=False)
    with pytest.raises(RankscopeError, match="has no LoRA layers"):
        sweep(tiny_bert(), None, lambda m: 0.0)


def test_run_folder_uses_final_or_step(tmp_path):
    model, _ = graded_peft()
    model.save_pretrained(tmp_path / "run" / "step-000010")
    with pytest.raises(RankscopeError, match="without a final adapter"):
        resolve_adapter(tmp_path / "run")
    assert resolve_adapter(tmp_path / "run", step=10).step == 10
    model.save_pretrained(tmp_path / "run")  # the final adapter at the top of the run folder
    assert resolve_adapter(tmp_path / "run").path == tmp_path / "run" / "adapter_model.safetensors"
    with pytest.raises(RankscopeError, match="no snapshot at step 7"):
        resolve_adapter(tmp_path / "run", step=7)


# ----------------------------------------------------------------------------- outputs


def test_outputs_json_csv_plot_and_summary(graded, tmp_path):
    model, _, adapter = graded
    result = sweep(model, adapter, neg_mse_to(model), fractions=FRACTIONS, seeds=2, progress=False)
    paths = write_sweep(result, tmp_path / "out")
    assert [p.name for p in paths] == ["sweep.json", "sweep.csv", "sweep.png", "compression.png", "report.html"]
    document = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert document["schema"] == "rankscope/sweep-v1" and document["metric"] == "neg_mse"
    assert document["baseline"] == result.baseline
    assert {p["order"] for p in document["points"]} == {"least", "most", "random", "spectral", "energy"}
    assert all(set(p) == {"order", "fraction", "seed", "value", "params_kept", "energy"} for p in document["points"])
    assert sorted(p["energy"] for p in document["points"] if p["order"] == "energy") == [0.8, 0.9, 0.95, 0.99]
    rows = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    assert rows[0] == "order,fraction,seed,value,params_kept,energy" and len(rows) == 1 + len(document["points"])
    for name in ("sweep.png", "compression.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    line = result.summary_line()
    assert line.startswith("pruning the least important 50% of ranks costs ") and "; the most important 25% costs" in line
    assert "; keeping 95% of each module's energy (" in line and "\n" not in line


def test_summary_in_accuracy_points():
    from rankscope.adapters.sweep import SweepPoint, SweepResult

    points = [SweepPoint("least", 0.5, None, 0.796), SweepPoint("most", 0.1, None, 0.49), SweepPoint("least", 0.0, None, 0.8),
              SweepPoint("most", 0.0, None, 0.8)]
    line = SweepResult("accuracy", 0.8, points).summary_line()
    assert line == ("pruning the least important 50% of ranks costs 0.4 points; the most important 10% costs 31 points "
                    "(accuracy 0.8 unpruned)")
