"""BeamLoRA on stock PEFT: one test per faithfulness point of the method, on tiny real models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers.lora import R, batch, bert_lora, slow_cut, tiny_bert, tiny_gpt2, train
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

import beamlora
from beamlora import BeamLoraConfig, BeamLoraError
from rankscope.maths.schedule import top_p


def tiny_gpt2_lora(seed: int = 0) -> PeftModel:
    model = get_peft_model(tiny_gpt2(seed),
                           LoraConfig(r=R, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"]).logits


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("make", [bert_lora, tiny_gpt2_lora], ids=["bert-linear", "gpt2-conv1d"])
def test_zero_scores_give_plain_lora_outputs_exactly(make):
    model = make()
    inputs = batch(1)
    plain = logits(model, inputs)
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100))
    assert all(torch.equal(layer.weights(), torch.ones(R)) for layer in controller.layers)
    assert torch.equal(logits(model, inputs), plain)


def test_forward_is_lora_with_w_between_B_and_A():
    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, temperature=0.5))
    torch.manual_seed(3)
    layer = controller.layers[0]
    with torch.no_grad():
        layer.score.normal_()
    x = torch.randn(5, 32)
    s = layer.score.detach().double()
    w = R * torch.softmax(s / 0.5, dim=0)  # the definition, in float64
    A, B = layer.A.detach().double(), layer.B.detach().double()
    scaling = layer.module.scaling[layer.adapter]
    expected = x.double() @ layer.module.base_layer.weight.double().T + layer.module.base_layer.bias.double() \
        + scaling * (x.double() @ A.T * w) @ B.T
    torch.testing.assert_close(layer.module(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_scores_are_trainable_and_not_saved_as_lora_tensors(tmp_path):
    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(any(p is layer.score for p in trainable) for layer in controller.layers)
    controller.export(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k or "classifier" in k for k in keys)


# ---------------------------------------------------------------- schedule


def test_top_p_follows_the_cosine_and_reaches_one():
    for p_init, end in [(0.95, 600), (0.9, 7)]:
        for t in range(0, end + 3):
            expected = 1.0 if t >= end else p_init + 0.5 * (1 - p_init) * (1 - math.cos(math.pi * t / end))
            assert top_p(t, p_init, end) == pytest.approx(expected, abs=1e-15)
        assert top_p(0, p_init, end) == p_init and top_p(end, p_init, end) == 1.0


@pytest.mark.parametrize("delta_t,total,end,expected", [
    (10, 100, None, [10, 20, 30, 40, 50, 60]),  # end_step = 66: nothing after it
    (10, 45, 45, [10, 20, 30]),  # 40 would leave fewer than Δt steps
    (7, 60, 30, [7, 14, 21, 28]),
])
def test_operations_only_before_end_step_and_not_in_the_last_delta_t(delta_t, total, end, expected):
    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=delta_t, total_steps=total, end_step=end, p_init=0.9))
    assert controller.operation_steps() == expected
    train(model, controller, total, lr=1e-3)
    assert sorted({e["step"] for e in controller.events}) == expected
    for e in controller.events:
        assert e["p"] == top_p(e["step"], 0.9, controller.end_step)


# ---------------------------------------------------------------- assess and prune


def frozen_operation(scope: str, max_fraction: float, seed: int = 0):
    """Steps with lr = 0 (so nothing moves), known scores set just before the operation at step 10."""
    model = bert_lora(targets=("query", "key", "value"))
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, p_init=0.8, scope=scope,
                                                       max_fraction=max_fraction, temperature=1.0))
    rng = np.random.default_rng(seed)
    # Unequal modules: some nearly flat, some with one dominant rank.
    scores = [rng.normal(0, 0.3 + 1.5 * (i % 3), R) for i in range(len(controller.layers))]

    def set_scores(t, _opt):
        if t == 10:
            with torch.no_grad():
                for layer, s in zip(controller.layers, scores):
                    layer.score.copy_(torch.tensor(s, dtype=torch.float32))

    train(model, controller, 10, lr=0.0, before_step=set_scores)
    probs = [np.exp(np.float32(s).astype(np.float64) - np.float32(s).max()) for s in scores]
    probs = [x / x.sum() for x in probs]
    return controller, probs


def test_global_scope_cuts_cumulative_mass_over_all_modules():
    controller, probs = frozen_operation("global", max_fraction=0.99)
    p = top_p(10, 0.8, 66)
    flat = [v for x in probs for v in x]
    expected = slow_cut(flat, p)
    got = {i * R + j for i, e in enumerate(controller.events) for j in e["pruned"]}
    assert got == expected
    counts = {len(e["pruned"]) for e in controller.events}
    assert len(counts) > 1  # different modules lose different numbers of ranks
    for e, x in zip(controller.events, probs):
        np.testing.assert_allclose(e["importance"], R * x, rtol=1e-6)


def test_module_scope_cuts_inside_each_module_and_caps_at_max_fraction():
    controller, probs = frozen_operation("module", max_fraction=0.99)
    p = top_p(10, 0.8, 66)
    for e, x in zip(controller.events, probs):
        assert set(e["pruned"]) == slow_cut(list(x), p)

    capped, probs = frozen_operation("module", max_fraction=0.25)
    limit = math.floor(0.25 * R)
    hit_cap = False
    for e, x in zip(capped.events, probs):
        wanted = slow_cut(list(x), p)
        assert len(e["pruned"]) == min(len(wanted), limit)
        hit_cap |= len(wanted) > limit
        # The cap keeps the least important of the chosen slots.
        assert set(e["pruned"]) == set(sorted(wanted, key=lambda i: (x[i], i))[:limit]) if len(wanted) > limit \
            else set(e["pruned"]) == wanted
    assert hit_cap


def test_sources_are_kept_ranks_never_pruned_slots():
    controller, probs = frozen_operation("global", max_fraction=0.5, seed=4)
    operated = 0
    for e, x in zip(controller.events, probs):
        assert len(e["pruned"]) <= R // 2 and len(e["sources"]) == len(e["pruned"])
        assert not set(e["sources"]) & set(e["pruned"])
        kept = sorted(set(range(R)) - set(e["pruned"]), key=lambda i: (-x[i], i))
        assert sorted(e["sources"]) == sorted(kept[:len(e["pruned"])])  # the most important kept ranks
        operated += bool(e["pruned"])
    assert operated >= 2


# ---------------------------------------------------------------- expand


@pytest.mark.parametrize("mode,optimizer_class", [("history", torch.optim.AdamW), ("history", torch.optim.Adam),
                                                  ("official", torch.optim.AdamW), ("reset", torch.optim.AdamW)])
def test_expansion_copies_historical_parameters_and_moments(mode, optimizer_class):
    model = bert_lora()
    config = BeamLoraConfig(delta_t=10, total_steps=100, p_init=0.9, optimizer_state=mode, temperature=0.05)
    controller = beamlora.attach(model, config)
    seen: dict = {}

    def spy(t, optimizer):
        if t == 5:  # the historical snapshot: Δt/2 before the operation
            seen["history"] = {layer.name: {
                "A": layer.A.detach().clone(), "B": layer.B.detach().clone(),
                **{f"{side}.{k}": optimizer.state[param][k].clone()
                   for side, param in (("A", layer.A), ("B", layer.B)) for k in ("exp_avg", "exp_avg_sq")}}
                for layer in controller.layers}
        if t == 10:  # just before the operation
            seen["before"] = {layer.name: {
                "A": layer.A.detach().clone(), "B": layer.B.detach().clone(), "s": layer.score.detach().clone(),
                **{f"{side}.{k}": optimizer.state[param][k].clone()
                   for side, param in (("A", layer.A), ("B", layer.B)) for k in ("exp_avg", "exp_avg_sq")}}
                for layer in controller.layers}
            seen["optimizer"] = optimizer

    train(model, controller, 10, lr=5e-2, before_step=spy, optimizer_class=optimizer_class)
    optimizer = seen["optimizer"]
    operated = [e for e in controller.events if e["pruned"]]
    assert operated, "the operation at step 10 pruned nothing"
    for e in controller.events:
        layer = next(l for l in controller.layers if l.name == e["module"])
        hist, before = seen["history"][layer.name], seen["before"][layer.name]
        untouched = sorted(set(range(R)) - set(e["pruned"]))
        assert torch.equal(layer.A[untouched], before["A"][untouched])
        for dst, src in zip(e["pruned"], e["sources"]):
            assert not torch.equal(hist["A"][src], before["A"][src])  # history really is older
            assert torch.equal(layer.A[dst], hist["A"][src])
            assert torch.equal(layer.B[:, dst], hist["B"][:, src])
            assert torch.equal(layer.A[src], before["A"][src])  # sources keep their current values
            for k in ("exp_avg", "exp_avg_sq"):
                state_A, state_B = optimizer.state[layer.A][k], optimizer.state[layer.B][k]
                if mode == "history":
                    assert torch.equal(state_A[dst], hist[f"A.{k}"][src])
                    assert torch.equal(state_B[:, dst], hist[f"B.{k}"][:, src])
                elif mode == "official":  # the boolean-mask copy_ writes into a temporary: nothing changes
                    assert torch.equal(state_A[dst], before[f"A.{k}"][dst])
                    assert torch.equal(state_B[:, dst], before[f"B.{k}"][:, dst])
                else:
                    assert not state_A[dst].any() and not state_B[:, dst].any()
            mean = (before["s"][dst] + before["s"][src]) / 2
            assert layer.score[dst] == mean and layer.score[src] == mean
        for k in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[layer.score][k].any()


def test_optimizer_without_adam_moments_or_without_scores_is_refused():
    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=4, total_steps=40))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**batch(0)).loss.backward()
    sgd.step()
    controller.step(sgd)
    with pytest.raises(BeamLoraError, match="exp_avg.*Adam"):
        controller.step(sgd)  # step 2: the historical snapshot needs Adam moments

    model = bert_lora()
    early = torch.optim.AdamW(model.parameters(), lr=0.1)  # created before attach: no scores in it
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=4, total_steps=40))
    with pytest.raises(BeamLoraError, match="create the optimizer after"):
        controller.step(early)


def test_bad_config_and_models_are_refused():
    for kwargs in [dict(p_init=1.5), dict(scope="layer"), dict(optimizer_state="copy"), dict(max_fraction=1.0),
                   dict(delta_t=1), dict(end_step=500, total_steps=100)]:
        with pytest.raises(BeamLoraError):
            BeamLoraConfig(**kwargs)
    with pytest.raises(BeamLoraError, match="DoRA|variant"):
        beamlora.attach(get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], use_dora=True)))
    with pytest.raises(BeamLoraError, match="PeftModel"):
        beamlora.attach(tiny_bert())


# ---------------------------------------------------------------- export, snapshots, reproducibility


@pytest.mark.parametrize("make", [bert_lora, tiny_gpt2_lora], ids=["bert-linear", "gpt2-conv1d"])
def test_export_loads_in_vanilla_peft_with_the_same_outputs(make, tmp_path):
    model = make()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in controller.layers:
            layer.score.normal_(0, 0.05)  # w far from 1: folding must matter
    inputs = batch(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = logits(model, inputs)
    controller.export(tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # A restored bit for bit
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any("beam" in k or "gate" in k for k in config)
    assert not (tmp_path / "adapter" / "beamlora_scores.safetensors").exists()
    base = tiny_bert() if make is bert_lora else tiny_gpt2()
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits(plain, inputs) - expected).abs().max().item() <= 1e-5
    unfolded = (logits(make(), inputs) - expected).abs().max().item()
    assert unfolded > 1e-3  # without folding w the outputs would differ


def test_snapshots_events_and_rankscope_reads_the_run(tmp_path):
    import rankscope

    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=40, end_step=30, p_init=0.9,
                                                       snapshot_every=10, output_dir=tmp_path))
    train(model, controller, 40)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["events.jsonl", "step-000010", "step-000020", "step-000030", "step-000040"]
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines == controller.events and {e["step"] for e in lines} == {10, 20}
    assert set(lines[0]) >= {"step", "p", "module", "pruned", "sources", "importance"}
    series = rankscope.load(tmp_path)
    assert series.steps == [10, 20, 30, 40] and len(series.events()) == len(lines)
    last = series[-1]
    for layer in controller.layers:
        module = last[layer.name]
        np.testing.assert_array_equal(module.scores, layer.score.detach().double().numpy())
        np.testing.assert_array_equal(module.A, layer.folded_A().numpy())


def test_same_seed_same_data_gives_bitwise_identical_adapters(tmp_path):
    blobs = []
    for run in range(2):
        model = bert_lora(seed=7)
        controller = beamlora.attach(model, BeamLoraConfig(delta_t=6, total_steps=30, p_init=0.9))
        train(model, controller, 30, seed=3)
        controller.export(tmp_path / f"run{run}")
        blobs.append((tmp_path / f"run{run}" / "adapter_model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


def test_a_crash_while_writing_leaves_no_half_snapshot_and_the_weights_intact(tmp_path, monkeypatch):
    model = bert_lora()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, output_dir=tmp_path))
    with torch.no_grad():
        for layer in controller.layers:
            layer.score.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_save = type(model).save_pretrained

    def save_then_crash(self, folder, **kwargs):
        real_save(self, folder, **kwargs)  # the adapter file is really written...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(type(model), "save_pretrained", save_then_crash)
    with pytest.raises(OSError):
        controller.save_snapshot(10)
    assert list(tmp_path.iterdir()) == []  # neither step-000010 nor its temporary folder
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # w unfolded again
