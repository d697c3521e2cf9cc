"""``beamlora train --dry-run``: what a run would do, resolved without training and without writing anything.

The plan goes through the same steps as a run up to the point where weights would load (hardware checks, the
data read and split, the steps from ``epochs``), then builds the model from its config.json on PyTorch's meta
device (no memory, no weights: seconds even for a 7B model) and applies the LoRA configuration to it with PEFT
itself, so the target modules it lists are the ones a run adapts. The BeamLoRA schedule is computed by
:mod:`rankscope.maths.schedule`, the rules the controller follows.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from beamlora.config import TrainConfig
from beamlora.errors import BeamLoraError
from beamlora.resolve import Prepared, prepare
from rankscope.maths.schedule import is_operation_step, top_p
from rankscope.tasks import models


def schedule(config: TrainConfig) -> list[dict[str, Any]]:
    """Every BeamLoRA operation of a run: its step, its p, and the step of the historical snapshot it expands from."""
    c = config.beamlora_config(None)
    end, dynamic = c.resolved_end_step, c.ablation != "fixed-p"
    out = []
    for t in range(c.delta_t, c.total_steps + 1, c.delta_t):
        p = top_p(t, c.p_init, end, dynamic=dynamic)
        if is_operation_step(t, c.delta_t, end, c.total_steps) and p < 1.0:
            out.append({"step": t, "p": p,
                        "history_step": None if c.ablation == "no-expansion" else t - c.delta_t // 2})
    return out


def _meta_model(config: TrainConfig, prepared: Prepared) -> tuple[Any, Any, str]:
    """(model built on the meta device, its path, "causal" or "classification") from config.json alone."""
    import torch  # imported on use: --help and bad options never load torch or transformers
    import transformers

    kind = "causal" if config.task == "sft" else models.head_of(config.model)
    if kind == "causal":
        models.check_causal_lm(config.model)
    path, model_config = models.load_config(config.model)
    with torch.device("meta"):
        if kind == "causal":
            model = transformers.AutoModelForCausalLM.from_config(model_config, **models.dtype_kwargs(
                config.weights_dtype))
        else:
            model_config.num_labels = len(prepared.data.label_names)
            model = transformers.AutoModelForSequenceClassification.from_config(
                model_config, **models.dtype_kwargs(config.weights_dtype))
    return model, path, kind


def _lora_on(model: Any, config: TrainConfig, kind: str) -> tuple[Any, list[str] | str]:
    from peft import LoraConfig, get_peft_model  # imported on use

    targets = config.peft_targets or models.default_targets(model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                      task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
    try:
        return get_peft_model(model, lora), targets
    except ValueError as e:  # PEFT: "Target modules {...} not found in the base model"
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise BeamLoraError(f"--targets {shown}: {str(e).splitlines()[0]}") from None


def dry_run(config: TrainConfig) -> dict[str, Any]:
    """The plan of ``config`` as a JSON-ready document (see docs/training.md, "--dry-run")."""
    from rankscope.tasks.layers import lora_layers  # imported on use: it imports torch

    prepared = prepare(config)
    config = prepared.config
    model, path, kind = _meta_model(config, prepared)
    base_parameters = sum(p.numel() for p in model.parameters())
    peft_model, targets = _lora_on(model, config, kind)
    layers = [layer for layer in lora_layers(peft_model)]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if config.method == "beamlora":
        trainable += config.rank * len(layers)  # one score per rank and module
    model_config = model.config
    beam = None
    if config.method == "beamlora":
        c = config.beamlora_config(None)
        beam = {"p_init": c.p_init, "delta_t": c.delta_t, "end_step": c.resolved_end_step,
                "temperature": c.temperature, "scope": c.scope, "optimizer_state": c.optimizer_state,
                "ablation": c.ablation, "operations": schedule(config)}
    return {
        "task": config.task, "method": config.method, "out": config.out,
        "model": {"spec": config.model, "path": str(path), "kind": kind,
                  "architecture": type(model).__name__,
                  "model_type": getattr(model_config, "model_type", None),
                  "layers": getattr(model_config, "num_hidden_layers", None),
                  "hidden_size": getattr(model_config, "hidden_size", None),
                  "parameters": base_parameters, "weights_dtype": config.weights_dtype},
        "data": {"spec": config.data, "train_examples": prepared.train_examples, "held_out": config.held_out},
        "lora": {"rank": config.rank, "alpha": config.alpha, "targets": targets,
                 "modules": [layer.name for layer in layers], "module_count": len(layers),
                 "trainable_parameters": trainable},
        "batch": {"global": config.batch_size, "grad_accum": config.grad_accum, "processes": prepared.world_size,
                  "micro_batch": prepared.micro_batch},
        "steps": config.steps, "steps_per_epoch": prepared.steps_per_epoch,
        "epochs": config.steps / prepared.steps_per_epoch,
        "optimizer": {"name": "adamw", "lr": config.lr, "lr_scheduler": config.lr_scheduler,
                      "warmup_steps": config.warmup},
        "precision": config.precision, "device": prepared.device,
        "gradient_checkpointing": config.gradient_checkpointing,
        "beamlora": beam,
        "config": dataclasses.asdict(config),
    }


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan as the terminal shows it."""
    m, d, lora, b, o = plan["model"], plan["data"], plan["lora"], plan["batch"], plan["optimizer"]
    leaves = Counter(name.rsplit(".", 1)[-1] for name in lora["modules"])
    targets = lora["targets"] if isinstance(lora["targets"], str) else ",".join(lora["targets"])
    lines = [
        f"dry run: {plan['method']} {plan['task']}, nothing is trained or written",
        f"  model          {m['spec']} ({m['architecture']}, {m['layers']} layers, hidden {m['hidden_size']}, "
        f"{m['parameters']:,} parameters, weights {m['weights_dtype']})  {m['path']}",
        f"  data           {d['spec']}: {d['train_examples']} training examples, {d['held_out']} held out",
        f"  lora           r={lora['rank']}, alpha={lora['alpha']:g}, targets {targets}: {lora['module_count']} modules "
        f"({', '.join(f'{leaf} ×{n}' for leaf, n in leaves.items())}), {lora['trainable_parameters']:,} trainable",
        f"  batch          {b['global']} global = {b['micro_batch']} micro-batch × {b['grad_accum']} accumulated × "
        f"{b['processes']} process(es)",
        f"  steps          {plan['steps']} optimizer steps = {plan['epochs']:.4g} epochs of {plan['steps_per_epoch']}",
        f"  optimizer      AdamW lr {o['lr']:g}, {o['lr_scheduler']} schedule, {o['warmup_steps']} warm-up steps",
        f"  precision      {plan['precision']} on {plan['device']}"
        + (", gradient checkpointing" if plan["gradient_checkpointing"] else ""),
    ]
    beam = plan["beamlora"]
    if beam is not None:
        ops = beam["operations"]
        lines.append(f"  beamlora       p_init {beam['p_init']}, Δt {beam['delta_t']}, end_step {beam['end_step']}, "
                     f"T {beam['temperature']}, scope {beam['scope']}, ablation {beam['ablation']}: "
                     f"{len(ops)} operation(s)")
        lines += [f"    step {op['step']:>7}  p {op['p']:.4f}" for op in ops]
    lines.append(f"  run folder     {plan['out']} (not written)")
    return lines
