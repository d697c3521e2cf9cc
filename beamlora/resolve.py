"""What a ``beamlora train`` run will do, settled before any model loads: the device and precision the hardware
allows, the data and its size, the steps (from ``epochs`` where given), the micro-batch, and the
``TrainingArguments`` that carry them into Trainer.

Every check here fails with one :class:`BeamLoraError` line, before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beamlora.config import TrainConfig, resolve_steps, steps_per_epoch
from beamlora.errors import BeamLoraError
from beamlora.tasks import task_data


@dataclass
class Prepared:
    """A run's settings with everything that depends on the machine and the data resolved."""

    config: TrainConfig  # steps fixed (from epochs where given)
    data: Any  # what task_data read
    device: str  # "cpu", "cuda" or "mps"
    world_size: int  # processes of a distributed launch (1 without one)
    micro_batch: int  # examples per process and forward pass: batch_size / (grad_accum · world_size)
    train_examples: int  # the training split's size
    steps_per_epoch: int  # optimizer steps in one pass over it


def world_size() -> int:
    """Processes of this launch (torchrun / accelerate set WORLD_SIZE), 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_device(config: TrainConfig) -> str:
    """The device ``config.device`` names on this machine, with ``precision`` and ``weights_dtype`` checked against it.

    bf16 runs on CUDA GPUs that support it (Ampere and later) and on CPUs (torch's CPU autocast handles bf16);
    fp16 autocast needs a GPU (Trainer's fp16 uses CUDA's loss scaling), so on a CPU it is refused.
    """
    import torch  # imported on use: resolving a device needs torch, the CLI's --help does not

    wanted = config.device
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if wanted == "auto":
        device = "cuda" if cuda else "cpu"
    elif wanted == "cuda" and not cuda:
        raise BeamLoraError("--device cuda but torch finds no CUDA device "
                            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                            "expected a CUDA GPU, or --device cpu")
    elif wanted == "mps" and not mps:
        raise BeamLoraError("--device mps but torch finds no MPS device (Apple silicon, macOS 12.3+); expected one, "
                            "or --device cpu")
    else:
        device = wanted
    for option, value in (("--precision", config.precision), ("--weights-dtype", config.weights_dtype)):
        if value == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise BeamLoraError(f"{option} bf16 but the GPU ({torch.cuda.get_device_name()}) does not support bfloat16; "
                                "expected an Ampere or later GPU, or fp16 / fp32")
    if config.precision == "fp16" and device == "cpu":
        raise BeamLoraError("--precision fp16 on the CPU: fp16 mixed precision needs a GPU (its loss scaling is "
                            "CUDA's); expected --precision bf16 (CPU autocast) or fp32, or --device cuda")
    return device


def micro_batch(config: TrainConfig, processes: int) -> int:
    """Examples per process and forward pass: the global batch over grad_accum and the processes."""
    parts = config.grad_accum * processes
    if config.batch_size % parts:
        raise BeamLoraError(f"--batch-size {config.batch_size} is the global batch, split over --grad-accum "
                            f"{config.grad_accum} × {processes} process(es); expected a multiple of {parts}")
    return config.batch_size // parts


def train_examples(config: TrainConfig, data: Any) -> int:
    """The training split's size: what is left of the data once the held-out examples are set aside."""
    return len(data.train) if config.task == "sft" else len(data) - config.held_out


def prepare(config: TrainConfig) -> Prepared:
    """Read the data, fix the steps, check the hardware: everything a run settles before its model loads."""
    processes = world_size()
    micro = micro_batch(config, processes)
    data = task_data(config)
    n = train_examples(config, data)
    resolved = resolve_steps(config, n)
    device = resolve_device(config)  # the first use of torch: the checks above fail without loading it
    return Prepared(resolved, data, device, processes, micro, n, steps_per_epoch(n, config.batch_size))


def training_arguments(prepared: Prepared, output_dir: Path, checkpoint_every: int, progress: bool) -> Any:
    """transformers ``TrainingArguments`` for the run: the one place TrainConfig's options meet Trainer's."""
    from transformers import TrainingArguments  # imported on use: transformers loads only when training starts

    config = prepared.config
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=config.steps, per_device_train_batch_size=prepared.micro_batch,
        save_only_model=config.fsdp,  # FSDP2: each process saves its own shards and moments (beamlora.distributed)
        # Several processes: Trainer multiplies the loss by N where the model takes num_items_in_batch, right for a
        # causal LM's token-summed loss (sft) but N times too large for a classifier's batch mean.
        average_tokens_across_devices=config.task == "sft",
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup, weight_decay=0.0, bf16=config.precision == "bf16",
        fp16=config.precision == "fp16", **{checkpointing: config.gradient_checkpointing,
                                           f"{checkpointing}_kwargs": {"use_reentrant": False}},
        seed=config.seed, data_seed=config.seed, save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or None, logging_steps=max(1, min(10, config.steps // 10)), report_to=[],
        disable_tqdm=not progress, use_cpu=prepared.device == "cpu", dataloader_num_workers=0,
        remove_unused_columns=False)
