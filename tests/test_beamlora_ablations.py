"""The paper's Table 3 ablations: each test fails if its mode were ignored (tiny real models, real AdamW)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from helpers.lora import R, bert_lora, slow_cut, train

import beamlora
from beamlora import BeamLoraConfig, BeamLoraError
from rankscope.maths.schedule import top_p

P_INIT = 0.8


def operated_with_known_scores(ablation: str, seed: int = 0, score_seed: int = 0):
    """lr = 0 (nothing moves, so history = current values), known unequal scores set before the
    operation at step 10; returns the controller, the per-module softmax of the scores and A, B before."""
    model = bert_lora(targets=("query", "key", "value"))
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, p_init=P_INIT, temperature=1.0,
                                                       ablation=ablation, seed=seed))
    rng = np.random.default_rng(score_seed)
    scores = [rng.normal(0, 0.3 + 1.5 * (i % 3), R) for i in range(len(controller.layers))]
    before = {}

    def set_scores(t, _opt):
        if t == 10:
            with torch.no_grad():
                for layer, s in zip(controller.layers, scores):
                    layer.score.copy_(torch.tensor(s, dtype=torch.float32))
                    before[layer.name] = (layer.A.detach().clone(), layer.B.detach().clone())

    train(model, controller, 10, lr=0.0, before_step=set_scores)
    probs = []
    for s in scores:
        e = np.exp(np.float32(s).astype(np.float64) - np.float32(s).max())
        probs.append(e / e.sum())
    return controller, probs, before


def importance_ordered_plan(probs, p, limit):
    """What BeamLoRA itself would prune: the global cut (slow walk), capped to the least important `limit`."""
    flat = slow_cut([v for x in probs for v in x], p)
    plans = []
    for m, x in enumerate(probs):
        wanted = sorted((i - m * R for i in flat if m * R <= i < (m + 1) * R), key=lambda i: (x[i], i))
        plans.append(set(wanted[:limit]))
    return plans


# ---------------------------------------------------------------- config


def test_ablation_is_validated_and_only_for_beamlora():
    for bad in ("shuffle", "", None):
        with pytest.raises(BeamLoraError, match="ablation"):
            BeamLoraConfig(ablation=bad)
    for bad in (-1, 2**32, 2**40, 1.5, True):
        with pytest.raises(BeamLoraError, match=r"seed=.*0 … 4294967295"):
            BeamLoraConfig(seed=bad)
    assert BeamLoraConfig(seed=2**32 - 1).to_dict()["ablation"] == "none"

    from beamlora.train import TrainConfig

    with pytest.raises(BeamLoraError, match="expected method 'beamlora'"):
        TrainConfig(method="lora", ablation="random")


# ---------------------------------------------------------------- fixed-p


def test_fixed_p_keeps_p_at_p_init_at_every_operation():
    p_seen = {}
    for ablation in ("none", "fixed-p"):
        model = bert_lora()
        controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, p_init=0.9, ablation=ablation))
        train(model, controller, 100, lr=1e-3)
        steps = sorted({e["step"] for e in controller.events})
        assert steps == [10, 20, 30, 40, 50, 60]  # the same operation steps, end_step 66
        assert all(e["ablation"] == ablation for e in controller.events)
        p_seen[ablation] = {e["step"]: e["p"] for e in controller.events}
    assert all(p == 0.9 for p in p_seen["fixed-p"].values())
    # The cosine rises from p_init: without the ablation every operation's p is above 0.9.
    assert all(p_seen["none"][t] == top_p(t, 0.9, 66) > 0.9 for t in p_seen["none"])
    for t in range(0, 70):  # the schedule itself: p_init before end_step, 1 from it on
        assert top_p(t, 0.9, 66, dynamic=False) == (0.9 if t < 66 else 1.0)


# ---------------------------------------------------------------- random


def test_random_prunes_as_many_as_the_cut_but_chooses_at_random_from_the_seed():
    state = np.random.get_state()
    controller, probs, before = operated_with_known_scores("random", seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), state))  # the global RNG untouched
    p = top_p(10, P_INIT, 66)
    ordered = importance_ordered_plan(probs, p, limit=R // 2)
    events = controller.events
    assert [len(e["pruned"]) for e in events] == [len(s) for s in ordered]  # the counts of the cut and cap
    assert sum(len(s) for s in ordered) >= 6
    assert any(set(e["pruned"]) != s for e, s in zip(events, ordered))  # ... but not the same slots

    # Reproducible from (seed, step) alone: the draw, module by module, with a fresh Generator.
    rng = np.random.default_rng([5, 10])
    for e in events:
        k = len(e["pruned"])
        if k == 0:
            assert e["sources"] == []
            continue
        slots = rng.choice(R, size=k, replace=False)
        kept = np.setdiff1d(np.arange(R), slots)
        assert e["pruned"] == slots.tolist() and e["sources"] == rng.permutation(kept)[:k].tolist()
        assert not set(e["sources"]) & set(e["pruned"]) and e["ablation"] == "random"
    # ... and applied: with lr 0 the history equals the current values, so each slot now holds its source.
    for layer, e in zip(controller.layers, events):
        A, B = before[layer.name]
        for dst, src in zip(e["pruned"], e["sources"]):
            assert torch.equal(layer.A[dst], A[src]) and torch.equal(layer.B[:, dst], B[:, src])

    again, _, _ = operated_with_known_scores("random", seed=5)
    other, _, _ = operated_with_known_scores("random", seed=6)
    assert again.events == events
    assert [e["pruned"] for e in other.events] != [e["pruned"] for e in events]
    assert [len(e["pruned"]) for e in other.events] == [len(e["pruned"]) for e in events]


def test_without_ablation_the_same_scores_give_the_importance_ordered_plan():
    controller, probs, _ = operated_with_known_scores("none")
    ordered = importance_ordered_plan(probs, top_p(10, P_INIT, 66), limit=R // 2)
    assert [set(e["pruned"]) for e in controller.events] == ordered


# ---------------------------------------------------------------- no-expansion


@pytest.mark.parametrize("optimizer_class", [
    functools.partial(torch.optim.AdamW, weight_decay=0.1),
    functools.partial(torch.optim.Adam, weight_decay=0.1, amsgrad=True),
], ids=["adamw-decay", "adam-l2-amsgrad"])
def test_no_expansion_zeroes_pruned_slots_for_good(optimizer_class):
    model = bert_lora(targets=("query", "key", "value"))
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, p_init=0.85, ablation="no-expansion",
                                                       temperature=0.5))
    optimizer = train(model, controller, 100, lr=2e-2, optimizer_class=optimizer_class)
    events = controller.events
    assert events and all(e["ablation"] == "no-expansion" and e["sources"] == [] for e in events)
    operated_steps = sorted({e["step"] for e in events if e["pruned"]})
    assert len(operated_steps) >= 2 and operated_steps[-1] <= 60  # 40 or more training steps after the last one
    assert controller.history is None  # no historical snapshot is ever taken
    for layer in controller.layers:
        mine = [e for e in events if e["module"] == layer.name]
        dead: set[int] = set()
        for e in mine:
            assert not set(e["pruned"]) & dead  # a dead slot is never pruned again
            dead |= set(e["pruned"])
        assert dead == controller.dead.get(layer.name, set())
        assert len(dead) < R  # every module keeps a live slot
        idx = sorted(dead)
        assert not layer.A[idx].any() and not layer.B[:, idx].any()  # exactly zero after 40+ more steps
        for param, rows in ((layer.A, lambda t: t[idx]), (layer.B, lambda t: t[:, idx])):
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in optimizer.state[param]:
                    assert not rows(optimizer.state[param][key]).any()
        live = sorted(set(range(R)) - dead)
        assert layer.A[live].abs().sum(dim=1).min() > 0 and layer.B[:, live].abs().sum(dim=0).min() > 0
    assert sum(len(d) for d in controller.dead.values()) >= 4

    # A resumed controller knows the dead slots from the events.
    fresh = beamlora.attach(bert_lora(targets=("query", "key", "value")), controller.config)
    fresh.load_state_dict(controller.state_dict())
    assert fresh.dead == controller.dead


def test_with_expansion_the_same_run_refills_its_pruned_slots():
    """The control: the same run without the ablation leaves no all-zero slot."""
    model = bert_lora(targets=("query", "key", "value"))
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=10, total_steps=100, p_init=0.85, temperature=0.5))
    train(model, controller, 100, lr=2e-2, optimizer_class=functools.partial(torch.optim.AdamW, weight_decay=0.1))
    assert sum(len(e["pruned"]) for e in controller.events) >= 4
    for layer in controller.layers:
        assert layer.A.abs().sum(dim=1).min() > 0 and layer.B.abs().sum(dim=0).min() > 0
        assert all(e["sources"] or not e["pruned"] for e in controller.events)


def test_no_expansion_cap_counts_live_slots_only():
    from rankscope.maths.schedule import plan_operation

    # One module, 8 slots, 5 already dead; a cut that wants everything: the cap allows floor(0.5 · 3) = 1.
    values = np.full(8, 1 / 8)
    live = np.array([True, False, True, False, False, True, False, False])
    (slots, sources), = plan_operation([values], 0.01, "module", 0.5, live=[live])
    assert len(slots) == 1 and live[slots].all() and set(sources) <= {0, 2, 5} - set(slots)
    assert math.floor(0.5 * live.sum()) == 1
